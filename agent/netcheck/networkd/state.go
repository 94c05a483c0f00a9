package networkd

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// StateDir is where networkd keeps its per-link state files.
const StateDir = "/run/systemd/netif"

// LinkState is networkd's record of one link, from
// /run/systemd/netif/links/<ifindex>. The file is documented as private, so
// only the few stable keys are read and anything else is kept raw.
type LinkState struct {
	Index int
	// AdminState: pending, initialized, configuring, configured, unmanaged,
	// failed, linger.
	AdminState  string
	OperState   string
	NetworkFile string
	// Path is the state file (node path).
	Path string
	Raw  map[string]string
}

// Managed reports whether networkd has taken the link over.
func (s *LinkState) Managed() bool {
	switch s.AdminState {
	case "", "unmanaged", "linger":
		return false
	}
	return true
}

// ReadLinkState reads networkd's state for ifindex below root. It returns
// fs.ErrNotExist (wrapped) when networkd has no record of the link.
func ReadLinkState(root string, ifindex int) (*LinkState, error) {
	node := filepath.Join(StateDir, "links", strconv.Itoa(ifindex))
	data, err := os.ReadFile(filepath.Join(root, node))
	if err != nil {
		return nil, err
	}
	st := &LinkState{Index: ifindex, Path: node, Raw: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		st.Raw[k] = v
	}
	st.AdminState = st.Raw["ADMIN_STATE"]
	st.OperState = st.Raw["OPER_STATE"]
	st.NetworkFile = st.Raw["NETWORK_FILE"]
	return st, sc.Err()
}

// StateAvailable reports whether networkd has written state below root
// (its links directory exists and is readable), and why not otherwise.
func StateAvailable(root string) (bool, error) {
	dir := filepath.Join(root, StateDir, "links")
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("reading networkd state %s: %w", dir, err)
	}
	return len(entries) > 0, nil
}

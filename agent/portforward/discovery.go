package portforward

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/agentd/agent/protocol"
)

// DiscoveryOptions configures a Discovery. The zero value works.
type DiscoveryOptions struct {
	Logger *slog.Logger
	// Proc is the proc file system root. Default "/proc".
	Proc string
	// SelfPID is the process whose sockets are left out of the list (the
	// agent's own). Default os.Getpid().
	SelfPID int
	// CacheFor reuses a scan for this long, so a burst of requests costs one
	// walk over /proc. Default 1 s; negative disables the cache.
	CacheFor time.Duration
}

// Discovery lists the TCP ports listening in the workspace.
type Discovery struct {
	log  *slog.Logger
	opts DiscoveryOptions

	mu      sync.Mutex
	cached  []protocol.ListeningPort
	scanned time.Time
}

// NewDiscovery returns a Discovery with opts' defaults filled in.
func NewDiscovery(opts DiscoveryOptions) *Discovery {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Proc == "" {
		opts.Proc = "/proc"
	}
	if opts.SelfPID == 0 {
		opts.SelfPID = os.Getpid()
	}
	if opts.CacheFor == 0 {
		opts.CacheFor = time.Second
	}
	return &Discovery{log: opts.Logger, opts: opts}
}

// List returns the forwardable TCP ports in LISTEN state, one entry per port
// (an IPv4 and an IPv6 socket on the same port are one entry), sorted by
// port. Ports the agent's own process listens on, and the reserved ports
// 1-9, are left out.
func (d *Discovery) List(ctx context.Context) ([]protocol.ListeningPort, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.opts.CacheFor > 0 && d.cached != nil && time.Since(d.scanned) < d.opts.CacheFor {
		return slices.Clone(d.cached), nil
	}
	ports, err := d.scan(ctx)
	if err != nil {
		return nil, err
	}
	d.cached, d.scanned = ports, time.Now()
	return slices.Clone(ports), nil
}

func (d *Discovery) scan(ctx context.Context) ([]protocol.ListeningPort, error) {
	var socks []socketEntry
	found := 0
	for _, name := range []string{"tcp", "tcp6"} {
		entries, err := readSocketTable(filepath.Join(d.opts.Proc, "net", name))
		if errors.Is(err, fs.ErrNotExist) {
			continue // no IPv6 in this kernel, for example
		}
		if err != nil {
			return nil, err
		}
		found++
		for _, e := range entries {
			if e.state == tcpListen && Forwardable(e.local.Port()) {
				socks = append(socks, e)
			}
		}
	}
	if found == 0 {
		return nil, fmt.Errorf("no TCP socket table under %s/net: is /proc mounted?", d.opts.Proc)
	}
	owners, err := d.socketOwners(ctx, socks)
	if err != nil {
		return nil, err
	}
	byPort := make(map[uint16]*protocol.ListeningPort)
	for _, s := range socks {
		owner, known := owners[s.inode]
		if known && owner.pid == d.opts.SelfPID {
			continue
		}
		p := byPort[s.local.Port()]
		if p == nil {
			p = &protocol.ListeningPort{Port: s.local.Port(), Network: "tcp"}
			byPort[s.local.Port()] = p
		}
		addr := s.local.Addr().String()
		if !slices.Contains(p.Addresses, addr) {
			p.Addresses = append(p.Addresses, addr)
		}
		if p.Process == "" && known {
			p.Process, p.PID = owner.name, owner.pid
		}
	}
	ports := make([]protocol.ListeningPort, 0, len(byPort))
	for _, p := range byPort {
		slices.Sort(p.Addresses)
		ports = append(ports, *p)
	}
	slices.SortFunc(ports, func(a, b protocol.ListeningPort) int { return int(a.Port) - int(b.Port) })
	return ports, nil
}

type processRef struct {
	pid  int
	name string
}

// socketOwners maps socket inodes to the processes holding them, by reading
// the /proc/PID/fd links the agent is allowed to read. Others' processes are
// simply not found, which leaves their ports without a process name.
func (d *Discovery) socketOwners(ctx context.Context, socks []socketEntry) (map[uint64]processRef, error) {
	want := make(map[uint64]bool, len(socks))
	for _, s := range socks {
		want[s.inode] = true
	}
	owners := make(map[uint64]processRef)
	if len(want) == 0 {
		return owners, nil
	}
	dirs, err := os.ReadDir(d.opts.Proc)
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	for _, dir := range dirs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		pid, err := strconv.Atoi(dir.Name())
		if err != nil || !dir.IsDir() {
			continue
		}
		fdDir := filepath.Join(d.opts.Proc, dir.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // gone, or not ours to read
		}
		var name string
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			inode, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64)
			if err != nil || !want[inode] {
				continue
			}
			if _, seen := owners[inode]; seen {
				continue
			}
			if name == "" {
				name = processName(d.opts.Proc, dir.Name())
			}
			owners[inode] = processRef{pid: pid, name: name}
		}
		if len(owners) == len(want) {
			break
		}
	}
	return owners, nil
}

func processName(proc, pid string) string {
	b, err := os.ReadFile(filepath.Join(proc, pid, "comm"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// ServeHTTP answers GET with the JSON array of listening ports. It is meant
// for the agent's tailnet-only API (mounted at /api/v1/ports).
func (d *Discovery) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "only GET lists the listening ports", http.StatusMethodNotAllowed)
		return
	}
	ports, err := d.List(r.Context())
	if err != nil {
		d.log.Warn("listing listening ports failed", "err", err)
		http.Error(w, "cannot list listening ports: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(ports); err != nil {
		d.log.Debug("writing listening ports failed", "err", err)
	}
}

// The kernel's TCP state numbers (include/net/tcp_states.h).
const (
	tcpListen = 0x0A
	// udpUnconnected is TCP_CLOSE, the state of a bound UDP socket.
	udpUnconnected = 0x07
)

type socketEntry struct {
	local netip.AddrPort
	state int
	inode uint64
}

// readSocketTable parses /proc/net/{tcp,tcp6,udp,udp6}.
func readSocketTable(path string) ([]socketEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseSocketTable(f)
}

func parseSocketTable(r io.Reader) ([]socketEntry, error) {
	var out []socketEntry
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	first := true
	for sc.Scan() {
		if first { // column headings
			first = false
			continue
		}
		fields := strings.Fields(sc.Text())
		// sl local rem st queues tr retrnsmt uid timeout inode ...
		if len(fields) < 10 {
			continue
		}
		local, err := parseHexAddrPort(fields[1])
		if err != nil {
			return nil, fmt.Errorf("socket table line %q: %w", sc.Text(), err)
		}
		state, err := strconv.ParseUint(fields[3], 16, 8)
		if err != nil {
			return nil, fmt.Errorf("socket table line %q: bad state: %w", sc.Text(), err)
		}
		inode, err := strconv.ParseUint(fields[9], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("socket table line %q: bad inode: %w", sc.Text(), err)
		}
		out = append(out, socketEntry{local: local, state: int(state), inode: inode})
	}
	return out, sc.Err()
}

// parseHexAddrPort decodes "0100007F:1F90". The kernel prints the address as
// 32-bit words in the machine's own byte order and the port as a number.
func parseHexAddrPort(s string) (netip.AddrPort, error) {
	hexAddr, hexPort, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q has no port", s)
	}
	raw, err := hex.DecodeString(hexAddr)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", hexAddr)
	}
	for i := 0; i < len(raw); i += 4 {
		binary.NativeEndian.PutUint32(raw[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	port, err := strconv.ParseUint(hexPort, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port %q", hexPort)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), nil
}

// udpBound reports whether an unconnected UDP socket is bound to port in the
// IPv4 and IPv6 tables, on a loopback or wildcard address.
func udpBound(procNet string, port uint16) (v4, v6 bool) {
	check := func(name string) bool {
		entries, err := readSocketTable(filepath.Join(procNet, name))
		if err != nil {
			return false
		}
		for _, e := range entries {
			a := e.local.Addr()
			if e.local.Port() == port && e.state == udpUnconnected && (a.IsLoopback() || a.IsUnspecified()) {
				return true
			}
		}
		return false
	}
	return check("udp"), check("udp6")
}

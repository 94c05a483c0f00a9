package node

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/agent/netcheck"
	"github.com/agentd/agent/agent/netcheck/internal/nclab"
	"github.com/agentd/agent/agent/netcheck/networkd"
	"github.com/agentd/agent/internal/netlab"
)

const networkdBinary = "/lib/systemd/systemd-networkd"

// networkdScript runs the real systemd-networkd in the namespace it is
// started in (ip netns exec gives it a private mount namespace): /sys read
// only so it does not wait for udev, its configuration and state
// directories bind-mounted from the test's root so it never sees or touches
// the machine's own.
const networkdScript = `set -e
root="$1"
mount -o remount,ro /sys
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/netif /run/systemd/network
mount --bind "$root/run/systemd/netif" /run/systemd/netif
mount --bind "$root/etc/systemd/network" /etc/systemd/network
mount --bind "$root/usr/lib/systemd/network" /usr/lib/systemd/network
exec ` + networkdBinary + `
`

func startNetworkd(t *testing.T, ns *netlab.Namespace, root string) *exec.Cmd {
	t.Helper()
	cmd := ns.Start("sh", "-c", networkdScript, "sh", root)
	return cmd
}

func stopNetworkd(cmd *exec.Cmd) {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	_ = cmd.Wait()
}

// waitState waits until networkd's state file for ifindex satisfies ok.
func waitState(t *testing.T, root string, idx int, what string, ok func(*networkd.LinkState) bool) *networkd.LinkState {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var last *networkd.LinkState
	for time.Now().Before(deadline) {
		if s, err := networkd.ReadLinkState(root, idx); err == nil {
			last = s
			if ok(s) {
				return s
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("networkd state of ifindex %d never became %s; last: %+v", idx, what, last)
	return nil
}

func ifindex(t *testing.T, ns *netlab.Namespace, name string) int {
	t.Helper()
	out := ns.IP("-o", "link", "show", name)
	n, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(out, ":", 2)[0]))
	if err != nil {
		t.Fatalf("ifindex of %s from %q: %v", name, out, err)
	}
	return n
}

// TestRealNetworkd runs Debian's systemd-networkd with a catch-all .network
// file in a node namespace: it takes over the container bridge and veth,
// --host reports it from networkd's own state files, and after --fix and a
// networkd restart the container interfaces are unmanaged and stay in their
// bridge with their address.
func TestRealNetworkd(t *testing.T) {
	if _, err := os.Stat(networkdBinary); err != nil {
		t.Skipf("systemd-networkd not installed at %s (apt-get install systemd)", networkdBinary)
	}
	if _, err := user.Lookup("systemd-network"); err != nil {
		t.Skip("the systemd-network user does not exist (install systemd)")
	}
	lab := netlab.New(t)
	node := lab.Namespace("node")
	pod := lab.Namespace("pod")
	node.Bridge("cni0", "10.88.0.1/24")
	lab.Link(node, "veth1", "", pod, "eth0", "10.88.0.2/24")
	node.Attach("veth1", "cni0")

	root := t.TempDir()
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"run/systemd/netif", "etc/systemd/network", "usr/lib/systemd/network"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// networkd drops to the systemd-network user and writes its state there.
	u, _ := user.Lookup("systemd-network")
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(filepath.Join(root, "run/systemd/netif"), uid, gid); err != nil {
		t.Fatal(err)
	}
	nclab.WriteFile(t, root, "etc/cni/net.d/10-lab.conflist", `{"cniVersion":"1.0.0","name":"lab","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.88.0.0/24"}}]}`)
	// A catch-all default .network, as distributions and admins write it
	// (current networkd ignores a file with no [Match] at all; older
	// versions applied that to every link, the 2016 CoreOS outage).
	nclab.WriteFile(t, root, "etc/systemd/network/zz-default.network", "[Match]\nName=*\n\n[Network]\nDHCP=no\n")
	// The networkd binary's presence under the root tells netcheck it is
	// installed; point at the real one.
	if err := os.MkdirAll(filepath.Join(root, "lib/systemd"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(networkdBinary, filepath.Join(root, "lib/systemd/systemd-networkd")); err != nil {
		t.Fatal(err)
	}

	vethIdx := ifindex(t, node, "veth1")
	brIdx := ifindex(t, node, "cni0")
	nd := startNetworkd(t, node, root)
	managed := func(s *networkd.LinkState) bool { return s.Managed() }
	st := waitState(t, root, vethIdx, "managed", managed)
	t.Logf("networkd took veth1: ADMIN_STATE=%s NETWORK_FILE=%s", st.AdminState, st.NetworkFile)
	waitState(t, root, brIdx, "managed", managed)

	o := helperOpts{Node: Options{Root: root}}
	r := runIn(t, node, o, false)
	f := wantFinding(t, r, "networkd.manages_container_link", netcheck.StatusBroken)
	if !strings.Contains(strings.Join(f.Evidence, "\n"), "zz-default.network") {
		t.Errorf("evidence does not name the .network file: %v", f.Evidence)
	}
	wantFinding(t, r, "networkd.would_manage", netcheck.StatusDegraded)
	if len(f.Remedy.Files) == 0 {
		t.Errorf("remedy lists no files to write")
	}
	t.Logf("before --fix:\n%s", describe(r))

	// --fix, then networkd reads the configuration again.
	runIn(t, node, helperOpts{Node: o.Node, Guard: true}, false)
	guard, err := os.ReadFile(filepath.Join(root, "etc/systemd/network", guardNetworkName))
	if err != nil {
		t.Fatalf("guard not written: %v", err)
	}
	if !strings.Contains(string(guard), "Unmanaged=yes") || !strings.Contains(string(guard), "veth*") {
		t.Errorf("guard file:\n%s", guard)
	}
	stopNetworkd(nd)
	// networkd may already have detached the veth and dropped the bridge
	// address; put them back, as a runtime restart would.
	node.Attach("veth1", "cni0")
	if out, _ := node.TryIP("-4", "addr", "show", "dev", "cni0"); !strings.Contains(out, "10.88.0.1/24") {
		node.Addr("cni0", "10.88.0.1/24")
	}
	startNetworkd(t, node, root)
	unmanaged := func(s *networkd.LinkState) bool { return s.AdminState == "unmanaged" }
	waitState(t, root, vethIdx, "unmanaged", unmanaged)
	waitState(t, root, brIdx, "unmanaged", unmanaged)
	// Give networkd time to misbehave if it were going to.
	time.Sleep(time.Second)
	if out := node.IP("-o", "link", "show", "veth1"); !strings.Contains(out, "master cni0") {
		t.Errorf("veth1 left its bridge under the guard: %s", out)
	}
	r = runIn(t, node, o, false)
	for _, code := range []string{"networkd.manages_container_link", "networkd.would_manage", "veth.no_master", "bridge.no_address"} {
		if r.Finding(code) != nil {
			t.Errorf("after --fix: %s still reported:\n%s", code, describe(r))
		}
	}
	t.Logf("after --fix:\n%s", describe(r))
}

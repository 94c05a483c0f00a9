package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/agent/netcheck"
	"github.com/agentd/agent/agent/netcheck/internal/nclab"
	"github.com/agentd/agent/internal/netlab"
)

// The test binary doubles as `agent netcheck` inside lab namespaces
// (nclab.Run): the node check, the guard, or with Workspace set the
// in-workspace check, so a test can see both sides of one fault.
func TestMain(m *testing.M) {
	if nclab.IsHelper() {
		os.Exit(helperMain())
	}
	code := m.Run()
	nclab.Cleanup()
	os.Exit(code)
}

type helperOpts struct {
	Node      Options           `json:"node"`
	Workspace *netcheck.Options `json:"workspace,omitempty"`
	Guard     bool              `json:"guard"`
	PlanOnly  bool              `json:"plan_only"`
	Patterns  []string          `json:"patterns"`
}

func helperMain() int {
	var ho helperOpts
	if err := json.Unmarshal(nclab.Opts(), &ho); err != nil {
		os.Stderr.WriteString("bad NETCHECK_OPTS: " + err.Error() + "\n")
		return 3
	}
	ctx := context.Background()
	if ho.Workspace != nil {
		_ = netcheck.Run(ctx, *ho.Workspace).WriteJSON(os.Stdout)
		return 0
	}
	if ho.Guard {
		plan, err := PlanGuard(ho.Node, GuardOptions{Patterns: ho.Patterns})
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			return 4
		}
		if !ho.PlanOnly {
			if err := plan.Apply(); err != nil {
				os.Stderr.WriteString(err.Error() + "\n")
				return 4
			}
		}
		_ = json.NewEncoder(os.Stdout).Encode(plan)
		return 0
	}
	_ = Run(ctx, ho.Node).WriteJSON(os.Stdout)
	return 0
}

// runIn runs the helper inside ns and returns its report (nil for the
// guard).
func runIn(t testing.TB, ns *netlab.Namespace, o helperOpts, unprivileged bool) *netcheck.Report {
	t.Helper()
	out, err := nclab.Run(t, ns, o, unprivileged)
	if err != nil {
		t.Fatalf("netcheck in %s: %v", ns.Label(), err)
	}
	if o.Guard {
		return nil
	}
	var r netcheck.Report
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("netcheck output is not a report: %v\n%s", err, out)
	}
	return &r
}

func hostOpts(pl *nclab.PodLab) helperOpts { return helperOpts{Node: Options{Root: pl.Root}} }

func podOpts(pl *nclab.PodLab) helperOpts {
	return helperOpts{Workspace: &netcheck.Options{CoordinatorURL: pl.CoordURL, Fingerprint: pl.Fingerprint}}
}

func describe(r *netcheck.Report) string {
	var b strings.Builder
	_ = r.WriteText(&b)
	return b.String()
}

func wantFinding(t testing.TB, r *netcheck.Report, code string, sev netcheck.Status) *netcheck.Finding {
	t.Helper()
	f := r.Finding(code)
	if f == nil {
		t.Fatalf("no %s finding; report:\n%s", code, describe(r))
	}
	if f.Severity != sev {
		t.Errorf("%s severity %s, want %s", code, f.Severity, sev)
	}
	if f.Remedy.Text == "" {
		t.Errorf("%s has no remedy", code)
	}
	return f
}

func TestHealthyNode(t *testing.T) {
	pl := nclab.New(t)
	h := runIn(t, pl.Node, hostOpts(pl), false)
	if h.Status != netcheck.StatusOK {
		t.Fatalf("healthy node reported %s:\n%s", h.Status, describe(h))
	}
}

// nodeFault is one fault class on the node that breaks the pods' round
// trip, and the finding the node check must name it by.
type nodeFault struct {
	name     string
	inject   func(pl *nclab.PodLab)
	hostCode string
}

var nodeFaults = []nodeFault{
	{"bridge deleted", func(pl *nclab.PodLab) { pl.Node.IP("link", "del", "cni0") }, "bridge.missing"},
	{"veth detached", func(pl *nclab.PodLab) { pl.Node.IP("link", "set", "veth1", "nomaster") }, "veth.no_master"},
	{"bridge address flushed", func(pl *nclab.PodLab) { pl.Node.IP("addr", "flush", "dev", "cni0") }, "bridge.no_address"},
	{"forwarding off", func(pl *nclab.PodLab) { pl.Node.Sysctl("net.ipv4.ip_forward", "0") }, "forwarding.disabled"},
	{"forward policy drop", func(pl *nclab.PodLab) {
		pl.Node.Nft("table inet hardening {\n chain forward {\n  type filter hook forward priority filter; policy drop;\n  ct state invalid drop\n }\n}\n")
	}, "firewall.forward_policy"},
	{"drop rule for the pod subnet", func(pl *nclab.PodLab) {
		pl.Node.Nft("table ip fw {\n chain filter_forward {\n  type filter hook forward priority filter; policy accept;\n  tcp dport 25 drop\n  ip saddr 10.88.0.0/24 counter drop\n }\n}\n")
	}, "firewall.forward_drop"},
	// Beyond the node nobody routes pod subnets back: without masquerade
	// the replies are lost.
	{"masquerade missing", func(pl *nclab.PodLab) {
		pl.Node.Nft("delete table ip netlab_nat\n")
		pl.Coord.IP("route", "del", "default")
	}, "firewall.no_masquerade"},
	{"pod subnet routed away", func(pl *nclab.PodLab) { pl.Node.Route("10.88.0.0/25 via " + nclab.CoordIP) }, "forwarding.pod_route"},
	{"bridge and veth mtu below the pods'", func(pl *nclab.PodLab) {
		pl.Node.SetMTU("veth1", 1300)
		pl.Node.SetMTU("cni0", 1300)
	}, "bridge.mtu_mismatch"},
}

// TestNodeFaults injects one node-side fault per subtest: the pod sees
// its network broken, the node check names the cause with commands, and
// once those commands are run (as printed) the node and the pod are
// healthy again.
func TestNodeFaults(t *testing.T) {
	for _, tt := range nodeFaults {
		t.Run(tt.name, func(t *testing.T) {
			// Each lab is its own set of namespaces; the broken pod's
			// report mostly waits for probe timeouts, so labs overlap well.
			t.Parallel()
			pl := nclab.New(t)
			tt.inject(pl)
			pod := runIn(t, pl.Pod, podOpts(pl), true)
			if pod.Status == netcheck.StatusOK {
				t.Fatalf("the fault did not break the pod; lab problem:\n%s", describe(pod))
			}
			h := runIn(t, pl.Node, hostOpts(pl), false)
			hf := wantFinding(t, h, tt.hostCode, netcheck.StatusBroken)
			if len(hf.Remedy.Commands) == 0 {
				t.Errorf("%s: no command in the remedy", tt.hostCode)
			}
			t.Logf("pod: %s; host: %s: %s; fix: %v", pod.Summary, hf.Code, hf.Problem, hf.Remedy.Commands)
			applyFixes(t, pl)
		})
	}
}

// applyFixes runs the node report's commands in the node until it is
// healthy (a fix may reveal the next problem, as a person would see it),
// then expects the pod to be healthy too.
func applyFixes(t *testing.T, pl *nclab.PodLab) {
	t.Helper()
	var h *netcheck.Report
	for round := 0; round < 3; round++ {
		h = runIn(t, pl.Node, hostOpts(pl), false)
		if h.Status == netcheck.StatusOK {
			break
		}
		for _, f := range h.Findings {
			for _, cmd := range f.Remedy.Commands {
				if strings.HasPrefix(cmd, "echo ") {
					continue // persisting a sysctl writes the machine's /etc
				}
				if out, err := pl.Node.Run(context.Background(), "sh", "-c", cmd); err != nil {
					t.Errorf("printed fix %q failed: %v\n%s", cmd, err, out)
				}
			}
		}
	}
	if h.Status != netcheck.StatusOK {
		t.Fatalf("node not healthy after applying its fixes:\n%s", describe(h))
	}
	var pod *netcheck.Report
	for try := 0; try < 3; try++ {
		if pod = runIn(t, pl.Pod, podOpts(pl), true); pod.Status == netcheck.StatusOK {
			return
		}
		time.Sleep(500 * time.Millisecond) // neighbour entries settle
	}
	t.Fatalf("pod not healthy after the node's fixes:\n%s", describe(pod))
}

// TestStaleCNIConfigNotBlamed: with podman's unused cni-podman0
// configuration left on the node, a veth detached from cni0 is blamed on
// cni0, with cni0 in the fix, and cni-podman0 is no headline.
func TestStaleCNIConfigNotBlamed(t *testing.T) {
	pl := nclab.New(t)
	nclab.WriteFile(t, pl.Root, "etc/cni/net.d/87-podman-bridge.conflist", `{"cniVersion":"0.4.0","name":"podman","plugins":[{"type":"bridge","bridge":"cni-podman0","isGateway":true,"ipMasq":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.89.0.0/16","gateway":"10.89.0.1"}]]}}]}`)
	pl.Node.IP("link", "set", "veth1", "nomaster")
	h := runIn(t, pl.Node, hostOpts(pl), false)
	if f := h.Finding("bridge.missing"); f != nil {
		t.Errorf("the unused cni-podman0 was blamed: %s", f.Problem)
	}
	f := wantFinding(t, h, "veth.no_master", netcheck.StatusBroken)
	if len(f.Remedy.Commands) != 1 || f.Remedy.Commands[0] != "ip link set veth1 master cni0 up" {
		t.Errorf("fix %q, want reattaching veth1 to cni0", f.Remedy.Commands)
	}
	if !strings.Contains(h.Summary, "veth1") {
		t.Errorf("headline %q should be the detached veth", h.Summary)
	}
	if n := h.Check("veths").Details["container_veths"]; n != float64(1) {
		t.Errorf("container veths %v, want 1 (the uplink veth eth0 is the node's own)", n)
	}
	applyFixes(t, pl)
}

// TestUnreadableConfig: a CNI configuration the checking user cannot read
// is a finding with its path and what to do, and the detached veth's fix
// does not guess a bridge.
func TestUnreadableConfig(t *testing.T) {
	pl := nclab.New(t)
	for _, d := range []string{filepath.Dir(pl.Root), pl.Root} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"etc", "etc/cni", "etc/cni/net.d"} {
		if err := os.Chmod(filepath.Join(pl.Root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(pl.Root, "etc/cni/net.d/10-lab.conflist"), 0o600); err != nil {
		t.Fatal(err)
	}
	nclab.WriteFile(t, pl.Root, "etc/cni/net.d/20-broken.conf", `{"type":"bridge",`)
	pl.Node.IP("link", "set", "veth1", "nomaster")
	h := runIn(t, pl.Node, hostOpts(pl), true)
	f := wantFinding(t, h, "config.unreadable", netcheck.StatusDegraded)
	if !strings.Contains(f.Problem, "/etc/cni/net.d/10-lab.conflist") || !strings.Contains(f.Remedy.Text, "root") {
		t.Errorf("unreadable config finding: %s / %s", f.Problem, f.Remedy.Text)
	}
	wantFinding(t, h, "config.unparsable", netcheck.StatusDegraded)
	v := wantFinding(t, h, "veth.no_master", netcheck.StatusBroken)
	if strings.Contains(strings.Join(v.Remedy.Commands, " "), "BRIDGE") || len(v.Remedy.Commands) > 0 {
		t.Errorf("fix guesses a bridge: %v", v.Remedy.Commands)
	}
	if !strings.Contains(v.Remedy.Text, "10-lab.conflist") {
		t.Errorf("fix should say which file kept it from naming the bridge: %s", v.Remedy.Text)
	}
}

// TestHostStaleCNIConfig: a CNI configuration whose bridge nobody uses (a
// podman that moved to netavark leaves cni-podman0's file behind) is not a
// missing bridge; once host-local IPAM holds an address on it, it is.
func TestHostStaleCNIConfig(t *testing.T) {
	pl := nclab.New(t)
	nclab.WriteFile(t, pl.Root, "etc/cni/net.d/87-podman-bridge.conflist", `{"cniVersion":"0.4.0","name":"podman","plugins":[{"type":"bridge","bridge":"cni-podman0","isGateway":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.89.0.0/16","gateway":"10.89.0.1"}]]}}]}`)
	nclab.WriteFile(t, pl.Root, "var/lib/cni/networks/podman/lock", "")
	nclab.WriteFile(t, pl.Root, "var/lib/cni/networks/podman/last_reserved_ip.0", "10.89.0.4")

	h := runIn(t, pl.Node, hostOpts(pl), false)
	if h.Status != netcheck.StatusOK {
		t.Fatalf("an unused CNI configuration made the node %s:\n%s", h.Status, describe(h))
	}
	if unused, _ := h.Check("bridges").Details["unused"].([]any); len(unused) != 1 || !strings.Contains(fmt.Sprint(unused[0]), "cni-podman0") {
		t.Errorf("bridges check should note cni-podman0 as not in use, details %v", h.Check("bridges").Details)
	}

	nclab.WriteFile(t, pl.Root, "var/lib/cni/networks/podman/10.89.0.5", "container-id\neth0")
	h = runIn(t, pl.Node, hostOpts(pl), false)
	f := wantFinding(t, h, "bridge.missing", netcheck.StatusBroken)
	if !strings.Contains(strings.Join(f.Evidence, "\n"), "10.89.0.5") {
		t.Errorf("evidence should name the lease that proves the bridge is in use: %q", f.Evidence)
	}
}

// TestDockerNodeWithoutSystemd: a node with Docker's docker0 instead of a
// CNI configuration and no systemd at all is checked without false alarms,
// and the report says what it could not check there.
func TestDockerNodeWithoutSystemd(t *testing.T) {
	lab := netlab.New(t)
	nodeNS := lab.Namespace("node")
	up := lab.Namespace("upstream")
	pod := lab.Namespace("pod")
	nodeNS.Bridge("docker0", "172.17.0.1/16")
	lab.Link(nodeNS, "veth3f2a1b0", "", pod, "eth0", "172.17.0.2/16")
	nodeNS.Attach("veth3f2a1b0", "docker0")
	pod.Route("default via 172.17.0.1")
	lab.Link(nodeNS, "eth0", "192.0.2.2/24", up, "eth0", "192.0.2.1/24")
	nodeNS.Route("default via 192.0.2.1")
	nodeNS.EnableForwarding()
	nodeNS.Masquerade("eth0", netlab.NATEndpointIndependent)

	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "run"), 0o755); err != nil {
		t.Fatal(err)
	}
	// dockerd's socket is how the check knows Docker runs here.
	ln, err := net.Listen("unix", filepath.Join(root, "run/docker.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })

	r := runIn(t, nodeNS, helperOpts{Node: Options{Root: root}}, false)
	if r.Status != netcheck.StatusOK {
		t.Fatalf("a healthy Docker node without systemd reported %s:\n%s", r.Status, describe(r))
	}
	if c := r.Check("bridges"); c == nil || !strings.Contains(c.Summary, "docker0") {
		t.Errorf("bridges check should cover docker0: %+v", c)
	}
	for _, id := range []string{"networkd", "networkd-state", "foreign-routes"} {
		c := r.Check(id)
		if c == nil || c.Status != netcheck.StatusSkipped || c.Summary == "" {
			t.Errorf("%s should be skipped saying why: %+v", id, c)
		}
	}
	for _, id := range []string{"forwarding", "firewall"} {
		if c := r.Check(id); c == nil || c.Status != netcheck.StatusOK {
			t.Errorf("%s on the Docker node: %+v", id, c)
		}
	}
	t.Logf("Docker node without systemd:\n%s", describe(r))

	// Masquerade is what Docker sets up; without it the node check says so.
	nodeNS.Nft("delete table ip netlab_nat\n")
	r = runIn(t, nodeNS, helperOpts{Node: Options{Root: root}}, false)
	wantFinding(t, r, "firewall.no_masquerade", netcheck.StatusBroken)
}

package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

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

// TestNodeFaults injects one host-side fault per subtest and expects the
// node check to name it with a command to run.
func TestNodeFaults(t *testing.T) {
	tests := []struct {
		name     string
		inject   func(pl *nclab.PodLab)
		hostCode string
	}{
		{"bridge deleted", func(pl *nclab.PodLab) { pl.Node.IP("link", "del", "cni0") }, "bridge.missing"},
		{"veth detached", func(pl *nclab.PodLab) { pl.Node.IP("link", "set", "veth1", "nomaster") }, "veth.no_master"},
		{"bridge address flushed", func(pl *nclab.PodLab) { pl.Node.IP("addr", "flush", "dev", "cni0") }, "bridge.no_address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pl := nclab.New(t)
			tt.inject(pl)
			h := runIn(t, pl.Node, hostOpts(pl), false)
			hf := wantFinding(t, h, tt.hostCode, netcheck.StatusBroken)
			if len(hf.Remedy.Commands) == 0 {
				t.Errorf("%s: no command in the remedy", tt.hostCode)
			}
			t.Logf("host: %s: %s; fix: %v", hf.Code, hf.Problem, hf.Remedy.Commands)
		})
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

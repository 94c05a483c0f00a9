package node

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentd/agent/agent/netcheck/internal/nclab"
	"github.com/agentd/agent/internal/netlab"
)

// guardIn plans (and unless PlanOnly applies) the guard inside ns; on
// failure it returns the helper's error line.
func guardIn(t *testing.T, ns *netlab.Namespace, o helperOpts) (*GuardPlan, string) {
	t.Helper()
	o.Guard = true
	out, err := nclab.Run(t, ns, o, false)
	if err != nil {
		var he *nclab.HelperError
		if errors.As(err, &he) {
			return nil, he.Stderr
		}
		t.Fatal(err)
	}
	var p GuardPlan
	if err := json.Unmarshal(out, &p); err != nil {
		t.Fatalf("guard output: %v\n%s", err, out)
	}
	return &p, ""
}

// TestGuard: the guard never covers the uplink (here a bridge called
// br-lan, which the usual br-* pattern would hit), refuses a pattern that
// matches it, sorts before an earlier catch-all file, and is idempotent.
func TestGuard(t *testing.T) {
	lab := netlab.New(t)
	node := lab.Namespace("node")
	up := lab.Namespace("upstream")
	node.Bridge("br-lan", "")
	lab.Link(node, "eth0", "", up, "eth0", "192.0.2.1/24")
	node.Attach("eth0", "br-lan")
	node.Addr("br-lan", "192.0.2.2/24")
	node.Route("default via 192.0.2.1")
	node.Bridge("br-5f3a", "172.18.0.1/16")
	pod := lab.Namespace("pod")
	lab.Link(node, "veth9", "", pod, "eth0", "172.18.0.2/16")
	node.Attach("veth9", "br-5f3a")

	root := t.TempDir()
	nclab.WriteFile(t, root, "usr/lib/systemd/network/05-all.network", "[Match]\nName=*\n[Network]\nDHCP=yes\n")
	o := helperOpts{Node: Options{Root: root}}

	if _, msg := guardIn(t, node, helperOpts{Node: o.Node, Patterns: []string{"br-*"}}); !strings.Contains(msg, "refusing pattern \"br-*\"") || !strings.Contains(msg, "br-lan") {
		t.Errorf("pattern matching the uplink: %q", msg)
	}

	dry := o
	dry.PlanOnly = true
	plan, msg := guardIn(t, node, dry)
	if plan == nil {
		t.Fatal(msg)
	}
	if strings.Join(plan.Protected, ",") != "br-lan,eth0" {
		t.Errorf("protected %v, want the uplink bridge and its port", plan.Protected)
	}
	globs := strings.Join(plan.Globs, " ")
	for _, want := range []string{"veth*", "br-5f3a", "docker*"} {
		if !strings.Contains(" "+globs+" ", " "+want+" ") {
			t.Errorf("globs %q lack %s", globs, want)
		}
	}
	if strings.Contains(" "+globs+" ", " br-* ") {
		t.Errorf("globs %q include br-*, which matches the uplink", globs)
	}
	wantNet := filepath.Join(guardDir, guardEarlyPrefix+guardNetworkName)
	if plan.Files[0].Path != wantNet || plan.Files[0].Change != "create" {
		t.Errorf("first file %s (%s), want %s created (05-all.network sorts before 10-)", plan.Files[0].Path, plan.Files[0].Change, wantNet)
	}
	if _, err := os.Stat(filepath.Join(root, wantNet)); !os.IsNotExist(err) {
		t.Fatalf("dry run wrote %s", wantNet)
	}

	plan, msg = guardIn(t, node, o)
	if plan == nil {
		t.Fatal(msg)
	}
	again, msg := guardIn(t, node, dry)
	if again == nil {
		t.Fatal(msg)
	}
	for _, f := range again.Files {
		if f.Change != "unchanged" {
			t.Errorf("second run: %s %s", f.Change, f.Path)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(root, guardDir))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
	r := runIn(t, node, o, false)
	if f := r.Finding("networkd.would_manage"); f != nil {
		t.Errorf("after the guard: %s %v", f.Problem, f.Evidence)
	}

	// A catch-all that sorts before even 00- cannot be guarded by file name.
	nclab.WriteFile(t, root, "etc/systemd/network/0-first.network", "[Match]\nName=*\n")
	if _, msg := guardIn(t, node, dry); !strings.Contains(msg, "0-first.network") {
		t.Errorf("catch-all sorting first: %q", msg)
	}
}

package tailnet_test

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

// sameBridge is a node whose container bridge holds both the workspace pod
// and the coordinator, so the coordinator stays reachable from the pod when
// the pod's way out (the bridge's gateway address) is gone:
//
//	node:  br0 10.77.0.1/24 (the pods' gateway)
//	         ├─ p1 ── pod   eth0 10.77.0.2, default via 10.77.0.1   (agent run)
//	         └─ p2 ── coord eth0 10.77.0.3                          (agent coordinator)
//	coord: lap0 198.51.100.1 ── laptop eth0 198.51.100.2, default via coord (agent ping/ssh)
//
// The laptop reaches the coordinator's 10.77.0.3 through the coordinator's
// second link; the coordinator forwards nothing, so laptop and pod meet
// through its DERP relay.
func newSameBridgeDeployment(t *testing.T) (*deployment, *netlab.Namespace) {
	t.Helper()
	lab := netlab.New(t)
	bin := buildAgent(t)
	node := lab.Namespace("node")
	node.Bridge("br0", "10.77.0.1/24")
	pod := lab.Namespace("pod")
	lab.Link(node, "p1", "", pod, "eth0", "10.77.0.2/24")
	node.Attach("p1", "br0")
	pod.Route("default via 10.77.0.1")
	coord := lab.Namespace("coord")
	lab.Link(node, "p2", "", coord, "eth0", "10.77.0.3/24")
	node.Attach("p2", "br0")
	laptop := lab.Namespace("laptop")
	lab.Link(coord, "lap0", "198.51.100.1/24", laptop, "eth0", "198.51.100.2/24")
	laptop.Route("default via 198.51.100.1")

	coordAddr := netip.MustParseAddr("10.77.0.3")
	d := &deployment{
		t:       t,
		bin:     bin,
		lab:     lab,
		sites:   &netlab.TwoSites{Coordinator: coord, CoordinatorAddr: coordAddr, Host1: pod, Host2: laptop},
		dataDir: t.TempDir(),
		home:    t.TempDir(),
	}
	d.url = "https://" + coordAddr.String() + ":" + coordPort
	d.startCoordinator()
	d.admin("user", "create", "alice")
	d.agentToken = d.createSecret("agent", "create", "ws1", "--owner", "alice")
	d.userToken = d.createSecret("token", "create", "--user", "alice")
	d.startAgent()
	return d, node
}

// createSecret runs an admin command that creates a token and returns it.
func (d *deployment) createSecret(args ...string) string {
	d.t.Helper()
	var created struct {
		Secret string `json:"secret"`
	}
	d.adminJSON(&created, args...)
	return created.Secret
}

const brokenPastEth0 = "network broken past eth0"

// The agent's netcheck verdict reaches the person connecting: first as a
// warning while the relay still carries traffic, then as the cause in the
// error once the workspace cannot be reached at all.
func TestBrokenWorkspaceNetworkReachesTheClient(t *testing.T) {
	d, node := newSameBridgeDeployment(t)
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()

	// Healthy: pongs, and no word of a broken network.
	out, stderr, err := d.client(ctx, d.userToken, "ping", "ws1", "-c", "2", "-i", "200ms")
	if err != nil || !strings.Contains(out, "pong from ws1") {
		t.Fatalf("agent ping before the fault: %v\n%s\n%s", err, out, stderr)
	}
	if strings.Contains(stderr, brokenPastEth0) {
		t.Fatalf("the client reports a broken network before the fault:\n%s", stderr)
	}

	// The node loses the bridge's address: the pod's gateway is gone, but
	// the coordinator on the same bridge still hears the agent.
	node.IP("addr", "flush", "dev", "br0")
	faulted := time.Now()
	for {
		out, stderr, err = d.client(ctx, d.userToken, "ping", "ws1", "-c", "1")
		if strings.Contains(stderr, brokenPastEth0) {
			break
		}
		if ctx.Err() != nil || time.Since(faulted) > 60*time.Second {
			t.Fatalf("the agent's broken verdict never reached the client:\n%s\n%s", out, stderr)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("verdict at the client %v after the fault:\n%s", time.Since(faulted).Round(100*time.Millisecond), stderr)
	// One warning about the broken network, a plain sentence naming the
	// workspace and the next step; no log records without --verbose. (A
	// degraded warning may come first: the lab's pod inherits the machine's
	// resolv.conf, whose nameserver it cannot reach.)
	if strings.Count(stderr, "reports its network broken") != 1 || !strings.Contains(stderr, `warning: workspace "ws1" reports its network broken`) ||
		!strings.Contains(stderr, `run "agent netcheck --host" on its node`) || strings.Contains(stderr, "level=") {
		t.Errorf("want one warning naming the workspace and the next step:\n%s", stderr)
	}
	// The relay through the coordinator may still carry the pings; a ping
	// that gets no pong names the verdict.
	if !strings.Contains(out, "via DERP(") && !strings.Contains(out, "no pong from ws1 within 5s: it reports its "+brokenPastEth0[:len("network broken")]) {
		t.Errorf("want a pong through the relay or a lost ping naming the verdict: %v\n%s", err, out)
	}
	if strings.Contains(out, "no pong") && !strings.Contains(out, brokenPastEth0) {
		t.Errorf("a lost ping does not name the verdict:\n%s", out)
	}

	// The host detaches the pod from the bridge: nothing reaches the pod
	// any more. The client's dial fails with the agent's last verdict, not
	// a bare timeout.
	node.IP("link", "set", "p1", "nomaster")
	start := time.Now()
	out, stderr, err = d.client(ctx, d.userToken, "ssh", "ws1", "--", "true")
	if err == nil {
		t.Fatalf("agent ssh reached a workspace cut off from everything:\n%s", out)
	}
	t.Logf("agent ssh failed after %v:\n%s", time.Since(start).Round(100*time.Millisecond), stderr)
	for _, want := range []string{`workspace "ws1"`, brokenPastEth0, "the gateway 10.77.0.1 does not answer", `"agent netcheck --host"`} {
		if !strings.Contains(stderr, want) {
			t.Errorf("agent ssh error does not contain %q:\n%s", want, stderr)
		}
	}
}

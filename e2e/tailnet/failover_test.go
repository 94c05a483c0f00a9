package tailnet_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

// gapReader serves one connection: it hashes what it reads, remembers the
// longest pause between reads inside a time window, and answers with the
// digest at EOF.
type gapReader struct {
	mu       sync.Mutex
	from, to time.Time // the window; zero to is open-ended
	maxGap   time.Duration
	gapAt    time.Time
}

func (g *gapReader) setWindow(from, to time.Time) {
	g.mu.Lock()
	g.from, g.to = from, to
	g.mu.Unlock()
}

func (g *gapReader) serve(c net.Conn) {
	defer c.Close()
	h := sha256.New()
	buf := make([]byte, 64<<10)
	last := time.Now()
	for {
		n, err := c.Read(buf)
		now := time.Now()
		h.Write(buf[:n])
		g.mu.Lock()
		if !g.from.IsZero() && now.After(g.from) && (g.to.IsZero() || last.Before(g.to)) && now.Sub(last) > g.maxGap {
			g.maxGap, g.gapAt = now.Sub(last), last
		}
		g.mu.Unlock()
		last = now
		if err != nil {
			break
		}
	}
	c.Write(h.Sum(nil))
}

// directTimes returns the times the client logged its path to the
// workspace turning direct.
func directTimes(log string) []time.Time {
	var out []time.Time
	sc := bufio.NewScanner(strings.NewReader(log))
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, `msg="peer path is direct"`) || !strings.HasPrefix(line, "time=") {
			continue
		}
		ts, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		if t, err := time.Parse(time.RFC3339Nano, ts); err == nil {
			out = append(out, t)
		}
	}
	return out
}

// A transfer on the direct path whose UDP dies for 10 s in the middle: the
// data stalls at most 3 s (DERP takes over), the path is direct again
// within 5 s of UDP's return, and every byte arrives.
func TestFailoverMidTransfer(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	f := measureFailover(t, d, 10*time.Second)
	t.Logf("longest data stall during the outage: %v (starting %v after the cut; target 3 s); direct again %v after UDP returned (target 5 s)",
		f.stall.Round(time.Millisecond), f.stallAfterCut.Round(time.Millisecond), f.redirect.Round(time.Millisecond))
	if f.stall > 3*time.Second {
		t.Errorf("data stalled %v when the direct path died, want at most 3 s", f.stall.Round(time.Millisecond))
	}
	if f.redirect == 0 || f.redirect > 5*time.Second {
		t.Errorf("path direct again %v after UDP returned (0: not at all within 7 s), want within 5 s:\n%s", f.redirect.Round(time.Millisecond), f.pfLog)
	}
}

// With UDP blocked at the workspace, the agent needs no STUN answer to
// choose its home relay (the coordinator's is the only one), so the first
// ssh works within 1.5 s of the agent's start.
func TestUDPBlockedFirstSSH(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	d.sites.Site1.Router.DropUDP()
	times := firstSSHAfterStart(t, d, 3)
	for run, took := range times {
		if took > 1500*time.Millisecond {
			t.Errorf("run %d: first ssh %v after the agent's start, want within 1.5 s", run+1, took)
		}
	}
	t.Logf("agent start to first ssh with UDP blocked at the workspace, 3 runs: %v (target 1.5 s)", times)
}

// After a coordinator outage of any length, the agent is back within 2 s
// of the coordinator's return: a new ssh, which needs the agent online,
// succeeds within 2 s of the coordinator serving again.
func TestCoordinatorReturn(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	// 12 s: long enough for a 30 s backoff cap to have grown past 8 s.
	took, agent, clientLog := coordinatorReturn(t, d, 12*time.Second)
	t.Logf("first ssh completed %v (agent attached %v) after the coordinator returned from a 12 s outage (target 2 s)",
		took.Round(time.Millisecond), agent.Round(time.Millisecond))
	if took > 2*time.Second {
		t.Errorf("first ssh %v after the coordinator returned, want within 2 s; the client's log:\n%s", took.Round(time.Millisecond), clientLog)
	}
}

// agent ping --until-direct explains a relayed path from both sides'
// measurements.
func TestWhyNotDirect(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mode  netlab.NATMode
		block func(d *deployment)
		want  []string
	}{
		{"HardNATBothSides", netlab.NATEndpointDependent, func(*deployment) {},
			[]string{"this side: the NAT maps each destination to another public port", "so: both NATs change ports per destination"}},
		{"UDPBlockedAtWorkspace", netlab.NATEndpointIndependent, func(d *deployment) { d.sites.Site1.Router.DropUDP() },
			[]string{"this side: UDP works", "ws1: announces only private addresses", "so: UDP is blocked on at least one side"}},
		{"FirewallBetween", netlab.NATEndpointIndependent, func(d *deployment) {
			// UDP from the laptop's router never reaches the workspace's
			// LAN; STUN still works on both sides.
			d.sites.Site1.Router.Nft(fmt.Sprintf("table ip whynot {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tip saddr %s meta l4proto udp drop\n\t}\n}\n", d.sites.Site2.Public))
		}, []string{"this side: UDP works", "checked against two STUN ports", "ws1: UDP works", "so: both sides reach the internet over UDP", "conntrack"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDeployment(t, tc.mode)
			d.stopAgent()
			tc.block(d)
			d.startAgent()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			// The agent's network check must have finished for its node to
			// carry what it found: wait for a first ping through the relay.
			out, stderr, err := d.client(ctx, d.userToken, "ping", "ws1", "--until-direct", "-c", "16", "-i", "250ms")
			if err == nil {
				t.Fatalf("agent ping --until-direct succeeded through a blocked path:\n%s", out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("explanation lacks %q:\n%s\n%s", w, out, stderr)
				}
			}
			t.Logf("\n%s", out)
		})
	}
}

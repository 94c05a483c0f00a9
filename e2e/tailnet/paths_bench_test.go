package tailnet_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

// Path benchmarks: the figures of issue 15 (time to direct, failover, return
// after a coordinator outage, first ssh with UDP blocked) measured with the
// real binaries in the namespace lab, each beside its reference. The tests
// in tailnet_test.go and failover_test.go assert the targets with the same
// measurements; scripts/bench's "paths" step runs these:
//
//	go test -run '^$' -bench '^BenchmarkPaths' -benchtime 1x ./e2e/tailnet/

// timeRuns calls measure runs times under one deadline and returns how long
// each call took.
func timeRuns(runs int, each time.Duration, measure func(ctx context.Context, run int)) []time.Duration {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(runs)*each)
	defer cancel()
	var times []time.Duration
	for run := 1; run <= runs; run++ {
		start := time.Now()
		measure(ctx, run)
		times = append(times, time.Since(start).Round(time.Millisecond))
	}
	return times
}

// timeToDirect starts a fresh client `runs` times and returns, for each, the
// time from its start to its first direct pong through the workspace's
// router; a client that is not direct within window fails tb.
func timeToDirect(tb testing.TB, d *deployment, runs int, window time.Duration) []time.Duration {
	tb.Helper()
	pings := fmt.Sprint(int(window / (100 * time.Millisecond)))
	return timeRuns(runs, window+10*time.Second, func(ctx context.Context, run int) {
		out, stderr, err := d.client(ctx, d.userToken, "ping", "ws1", "--until-direct", "-c", pings, "-i", "100ms")
		if err != nil {
			tb.Fatalf("run %d: agent ping --until-direct: %v\n%s\n%s\nUDP conntrack on the workspace's router:\n%s", run, err, out, stderr, conntrackUDP(d.sites.Site1.Router))
		}
		if want := "via " + d.sites.Site1.Public.String() + ":"; !strings.Contains(out, want) {
			tb.Fatalf("run %d: no direct pong through the workspace's router (%s):\n%s", run, want, out)
		}
	})
}

// failover is what measureFailover saw.
type failover struct {
	// stall is the longest pause in the data during the outage, starting
	// stallAfterCut after UDP was cut.
	stall, stallAfterCut time.Duration
	// redirect is the time from UDP's return to the client logging a
	// direct path again; 0 if it did not within 7 s.
	redirect time.Duration
	// pfLog is the port-forward's output, for failure messages.
	pfLog string
}

// measureFailover streams about 3 MB/s through `agent port-forward` on the
// direct path, drops UDP at the workspace's router for outage, lets it
// return, and checks every byte arrived (sha256 at the far side).
func measureFailover(tb testing.TB, d *deployment, outage time.Duration) failover {
	tb.Helper()
	_, pfOut := startPortForward(tb, d, "--log-level", "info")
	ports := &workspacePorts{ns: d.sites.Host1, next: forwardLo}
	ln, err := ports.listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	g := &gapReader{}
	go func() {
		c, err := ln.Accept()
		if err == nil {
			g.serve(c)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	conn, err := d.sites.Host2.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close()

	h := sha256.New()
	stop := make(chan struct{})
	sent := make(chan error, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-stop:
				sent <- conn.(*net.TCPConn).CloseWrite()
				return
			case <-time.After(20 * time.Millisecond):
			}
			rand.Read(buf)
			h.Write(buf)
			if _, err := conn.Write(buf); err != nil {
				sent <- err
				return
			}
		}
	}()

	deadline := time.Now().Add(20 * time.Second)
	for len(directTimes(pfOut.String())) == 0 {
		if time.Now().After(deadline) {
			tb.Fatalf("the transfer never went direct within 20 s:\n%s", pfOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)

	cut := time.Now()
	g.setWindow(cut, time.Time{})
	d.sites.Site1.Router.DropUDP()
	time.Sleep(outage)
	back := time.Now()
	d.sites.Site1.Router.AllowUDP()
	g.setWindow(cut, back)
	time.Sleep(7 * time.Second)
	close(stop)
	if err := <-sent; err != nil {
		tb.Fatalf("sending across the outage: %v", err)
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		tb.Fatalf("reading the digest: %v", err)
	}
	if want := h.Sum(nil); string(got) != string(want) {
		tb.Fatalf("bytes lost or corrupted across the outage: far side %x, sent %x", got, want)
	}

	g.mu.Lock()
	f := failover{stall: g.maxGap, stallAfterCut: g.gapAt.Sub(cut), pfLog: pfOut.String()}
	g.mu.Unlock()
	for _, dt := range directTimes(f.pfLog) {
		if dt.After(back) {
			f.redirect = dt.Sub(back)
			break
		}
	}
	return f
}

// firstSSHAfterStart restarts the agent `runs` times and returns, for
// each, the time from its start to a completed `agent ssh`.
func firstSSHAfterStart(tb testing.TB, d *deployment, runs int) []time.Duration {
	tb.Helper()
	var times []time.Duration
	for run := 1; run <= runs; run++ {
		d.stopAgent()
		times = append(times, timeRuns(1, 20*time.Second, func(ctx context.Context, _ int) {
			d.startAgent()
			// The command waits for the client's end of stdin, so it cannot
			// end before the client has finished starting it.
			out, stderr, err := d.client(ctx, d.userToken, "ssh", "ws1", "--", "cat; echo up")
			if err != nil || out != "up\n" {
				tb.Fatalf("run %d: agent ssh ws1 -- 'cat; echo up': err %v stdout %q stderr %q", run, err, out, stderr)
			}
		})...)
	}
	return times
}

// coordinatorReturn stops the coordinator for outage and returns how long
// after its return a new `agent ssh` completed and the agent was attached
// to it again (measured side by side).
//
// The ssh after the outage runs with --verbose; clientLog is its stderr,
// for saying where a slow return spent its time.
func coordinatorReturn(tb testing.TB, d *deployment, outage time.Duration) (ssh, agentBack time.Duration, clientLog string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), outage+60*time.Second)
	defer cancel()
	if out, stderr, err := d.client(ctx, d.userToken, "ssh", "ws1", "--", "cat; echo up"); err != nil || out != "up\n" {
		tb.Fatalf("ssh before the outage: err %v stdout %q stderr %q", err, out, stderr)
	}
	d.stopCoordinator()
	time.Sleep(outage)
	d.startCoordinator() // returns once the coordinator serves
	back := time.Now()
	agentAt := make(chan time.Duration, 1)
	go func() { agentAt <- d.agentAttachedAfter(ctx, back) }()
	out, stderr, err := d.client(ctx, d.userToken, "ssh", "--verbose", "ws1", "--", "cat; echo up")
	ssh = time.Since(back)
	if err != nil || out != "up\n" {
		tb.Fatalf("ssh after the outage: err %v stdout %q stderr %q", err, out, stderr)
	}
	agentBack = <-agentAt
	if agentBack < 0 {
		tb.Fatalf("agent ws1 did not attach to the returned coordinator: %v", ctx.Err())
	}
	return ssh, agentBack, stderr
}

// agentAttachedAfter polls the coordinator until ws1 is attached and
// returns the time since t; -1 if ctx ends first.
func (d *deployment) agentAttachedAfter(ctx context.Context, t time.Time) time.Duration {
	for ctx.Err() == nil {
		var info struct {
			Peers []struct {
				Role string `json:"role"`
				Name string `json:"name"`
			} `json:"peers"`
		}
		out, err := exec.CommandContext(ctx, d.bin, "admin", "--data-dir", d.dataDir, "--json", "info").Output()
		if err == nil && json.Unmarshal(out, &info) == nil {
			for _, p := range info.Peers {
				if p.Role == "agent" && p.Name == "ws1" {
					return time.Since(t)
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return -1
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func maxOf(ds []time.Duration) time.Duration { return slices.Max(ds) }

func medianOf(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkPathsTimeToDirect: 10 fresh clients, each from its start to its
// first direct pong, behind a conntrack NAT at the workspace (a router that
// accepts unsolicited UDP, as a Kubernetes node) and behind home routers on
// both sides (the existing topology).
func BenchmarkPathsTimeToDirect(b *testing.B) {
	for _, tc := range []struct {
		name string
		fw   netlab.Firewall
	}{{"topology=conntrack", netlab.AcceptUnsolicited}, {"topology=home", netlab.DropUnsolicited}} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				d := newDeploymentWith(b, netlab.NATEndpointIndependent, tc.fw)
				// A longer window than the test's, so a slow run is a
				// figure above the target rather than no figure.
				times := timeToDirect(b, d, 10, 10*time.Second)
				b.ReportMetric(ms(maxOf(times)), "max-ms")
				b.ReportMetric(ms(medianOf(times)), "median-ms")
				b.Logf("%s: client start to first direct pong, 10 runs: %v", tc.name, times)
			}
		})
	}
}

// BenchmarkPathsFailover: UDP dropped at the workspace's router for 10 s in
// the middle of a transfer on the direct path.
func BenchmarkPathsFailover(b *testing.B) {
	for b.Loop() {
		d := newDeployment(b, netlab.NATEndpointIndependent)
		f := measureFailover(b, d, 10*time.Second)
		if f.redirect == 0 {
			b.Fatalf("the path was not direct again within 7 s of UDP's return:\n%s", f.pfLog)
		}
		b.ReportMetric(ms(f.stall), "stall-ms")
		b.ReportMetric(ms(f.redirect), "redirect-ms")
		b.Logf("10 s UDP outage mid-transfer: longest stall %v (starting %v after the cut), direct again %v after UDP returned; sha256 matched",
			f.stall.Round(time.Millisecond), f.stallAfterCut.Round(time.Millisecond), f.redirect.Round(time.Millisecond))
	}
}

// BenchmarkPathsCoordinatorReturn: the coordinator stopped for 10 s and for
// 60 s; a new ssh after its return, beside the same ssh before the outage.
func BenchmarkPathsCoordinatorReturn(b *testing.B) {
	for _, outage := range []time.Duration{10 * time.Second, 60 * time.Second} {
		b.Run(fmt.Sprintf("outage=%v", outage), func(b *testing.B) {
			for b.Loop() {
				d := newDeployment(b, netlab.NATEndpointIndependent)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				start := time.Now()
				out, stderr, err := d.client(ctx, d.userToken, "ssh", "ws1", "--", "cat; echo up")
				steady := time.Since(start)
				cancel()
				if err != nil || out != "up\n" {
					b.Fatalf("ssh with the coordinator up: err %v stdout %q stderr %q", err, out, stderr)
				}
				ssh, agent, _ := coordinatorReturn(b, d, outage)
				b.ReportMetric(ms(ssh), "ssh-after-return-ms")
				b.ReportMetric(ms(agent), "agent-back-ms")
				b.ReportMetric(ms(steady), "ssh-steady-ms")
				b.Logf("%v outage: agent attached %v and a new ssh done %v after the coordinator's return; the same ssh with the coordinator up: %v",
					outage, agent.Round(time.Millisecond), ssh.Round(time.Millisecond), steady.Round(time.Millisecond))
			}
		})
	}
}

// BenchmarkPathsFirstSSH: from the agent's start to the first completed
// ssh, three runs with UDP blocked at the workspace's router and three with
// it open.
func BenchmarkPathsFirstSSH(b *testing.B) {
	for b.Loop() {
		d := newDeployment(b, netlab.NATEndpointIndependent)
		open := firstSSHAfterStart(b, d, 3)
		d.sites.Site1.Router.DropUDP()
		blocked := firstSSHAfterStart(b, d, 3)
		b.ReportMetric(ms(maxOf(blocked)), "udp-blocked-max-ms")
		b.ReportMetric(ms(maxOf(open)), "udp-open-max-ms")
		b.Logf("agent start to first ssh, 3 runs: UDP blocked %v, UDP open %v", blocked, open)
	}
}

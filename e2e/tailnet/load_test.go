package tailnet_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/syncbuf"
	"github.com/agentd/agent/internal/testkit/sshload"
)

// The suite's sizes; scripts/bench's load-ssh step runs the issue's
// (10,000 sequential, 1,000 concurrent). AGENT_LOAD_* raise them here too.
var suiteLoad = sshload.Sizes{Sequential: 100, Concurrent: 100, Burst: 50}

// suiteMargin: goroutines and fds within the 10 % of idle; RSS
// within 25 %. Left open: after bursts the agent keeps some 15 % more live
// heap than idle for longer than 5 s (not yet traced; scripts/bench's
// load-ssh step holds RSS to 10 % and shows it).
var suiteMargin = sshload.Margin{Count: 0.10, RSS: 0.25}

// TestSSHUnderLoad: many short `agent ssh ws1 -- true` one after the other
// and in bursts, against one agent. None may fail, the agent frees each
// client's connection within 1 s of its exit, its goroutines, fds and RSS
// come back near idle (read after a warm-up burst; see suiteMargin) within
// 5 s of the load's end, and its RSS stays under its soft memory limit
// throughout.
func TestSSHUnderLoad(t *testing.T) {
	sizes, err := sshload.SizesFromEnv(os.Getenv, suiteLoad)
	if err != nil {
		t.Fatal(err)
	}
	d := newDeployment(t, netlab.NATEndpointIndependent)
	probe := sshload.NewProbe(d.agent.Process.Pid, filepath.Join(d.dataDir, "agent-state", "status.sock"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	run := d.sshTrue(60 * time.Second)
	// The first run brings the agent's side of the path up.
	if err := run(ctx); err != nil {
		t.Fatal(err)
	}
	cold, err := probe.Idle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	load := sshload.Load{Run: run, Probe: probe}
	// Idle is read after one warm-up burst, so that it holds what the
	// agent grows once for good (its pools and tables at their burst
	// size); the check below is that the load leaves nothing more behind.
	if warm := load.Bursts(ctx, sizes.Burst, sizes.Burst); warm.Failures > 0 || warm.Lingered > 0 {
		t.Errorf("warm-up burst of %d: %s", sizes.Burst, warm.Summary())
	}
	idle, err := probe.Idle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("idle after one client: %v; after a warm-up burst of %d: %v", cold, sizes.Burst, idle)
	idleStacks, err := probe.Goroutines(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		name string
		do   func() sshload.Result
	}{
		{fmt.Sprintf("%d sequential", sizes.Sequential), func() sshload.Result { return load.Sequential(ctx, sizes.Sequential) }},
		{fmt.Sprintf("%d concurrent in bursts of %d", sizes.Concurrent, sizes.Burst), func() sshload.Result {
			return load.Bursts(ctx, sizes.Concurrent, sizes.Burst)
		}},
	} {
		res := step.do()
		t.Logf("%s: %s; agent's peak RSS %.1f MB", step.name, res.Summary(), float64(res.PeakRSSKB)*1024/1e6)
		if res.Failures > 0 || res.Lingered > 0 {
			t.Errorf("%s: want no failure and every session freed within 1 s: %s", step.name, res.Summary())
		}
		if limit := idle.MemoryLimit; limit > 0 && res.PeakRSSKB*1024 > limit {
			t.Errorf("%s: agent RSS reached %.1f MB, over its soft memory limit of %.1f MB", step.name, float64(res.PeakRSSKB)*1024/1e6, float64(limit)/1e6)
		}
		took, f, err := probe.WaitSettled(ctx, idle, suiteMargin, 5*time.Second)
		if err != nil {
			stacks, serr := probe.Goroutines(ctx)
			if serr != nil {
				stacks = serr.Error()
			} else {
				stacks = sshload.GoroutinesAbove(idleStacks, stacks)
			}
			t.Errorf("%s: the agent did not come back near idle within 5 s: %v (now %v; idle %v); goroutines above idle: %s", step.name, err, f, idle, stacks)
		} else {
			t.Logf("%s: back near idle after %v: %v (the issue's bar of 10%% RSS: %v)", step.name, took.Round(time.Millisecond), f,
				sshload.Within(f, idle, sshload.TenPercent))
		}
	}
	if idle.MemoryLimit <= 0 {
		t.Error(errors.New("the agent reports no soft memory limit (go_gc_gomemlimit_bytes); agent run sets one by default"))
	}
}

// TestSSHBurstsSlowShell: bursts of 100 concurrent `agent ssh ws1 -- true`
// against an agent whose sessions start a slow shell (0.4 s, like root's
// bash login shell), so that a burst's clients overlap at the agent. Every
// run must end. This shape once wedged the agent's WireGuard device for
// good: peers' receive routines answering TSMP pings waited for the TUN's
// outbound queue, whose reader waited for the device's peer lock, held by a
// peer removal (and by the engine's status snapshot) waiting for one of
// those receive routines. When a run hangs, the agent's goroutine dump
// (SIGQUIT) says where.
func TestSSHBurstsSlowShell(t *testing.T) {
	const bursts, size = 2, 100
	shell := filepath.Join(t.TempDir(), "slow-shell")
	if err := os.WriteFile(shell, []byte("#!/bin/sh\nsleep 0.4\nexec /bin/sh \"$@\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	d := newDeployment(t, netlab.NATEndpointIndependent)
	d.stopAgent()
	d.startAgentWith("--shell", shell)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Generous: a burst of 100 client processes shares 2 loaded cores with
	// the agent; a wedged device never answers at all.
	load := sshload.Load{Run: d.sshTrue(40 * time.Second)}
	for i := range bursts {
		start := time.Now()
		res := load.Bursts(ctx, size, size)
		t.Logf("burst %d of %d concurrent: %s (%v)", i+1, size, res.Summary(), time.Since(start).Round(time.Millisecond))
		if res.Failures > 0 {
			t.Errorf("burst %d: %d of %d runs failed: %s", i+1, res.Failures, res.Runs, res.Summary())
			t.Log(wedgeReport(d.agent))
			return
		}
	}
}

// sshTrue is one `agent ssh ws1 -- true` on the laptop, given up after
// timeout.
func (d *deployment) sshTrue(timeout time.Duration) sshload.Run {
	return func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		out, stderr, err := d.client(ctx, d.userToken, "ssh", "ws1", "--", "true")
		if err != nil {
			return fmt.Errorf("agent ssh ws1 -- true: %w: %s", err, strings.TrimSpace(out+stderr))
		}
		return nil
	}
}

// wedgeReport asks the agent for its goroutine dump (SIGQUIT ends it) and
// counts the goroutines waiting in the places of the known WireGuard
// deadlock; the whole dump is in the agent's output, printed on failure.
func wedgeReport(agent *exec.Cmd) string {
	out, ok := agent.Stdout.(*syncbuf.Buffer)
	if !ok {
		return "no agent output to read a goroutine dump from"
	}
	if err := agent.Process.Signal(syscall.SIGQUIT); err != nil {
		return fmt.Sprintf("SIGQUIT to the agent: %v", err)
	}
	done := make(chan struct{})
	go func() { agent.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
	dump := out.String()
	if i := strings.Index(dump, "SIGQUIT"); i >= 0 {
		dump = dump[i:]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "agent goroutine dump (SIGQUIT): %d goroutines", strings.Count(dump, "\ngoroutine "))
	for _, frame := range []string{
		"tstun.(*Wrapper).injectOutboundPong",
		"tstun.(*Wrapper).injectOutbound(",
		"device.(*Device).RoutineReadFromTUN",
		"device.(*Device).RemovePeer",
		"device.(*Device).RemoveMatchingPeers",
		"device.(*Peer).RoutineSequentialReceiver",
		"wgengine.(*userspaceEngine).getStatus",
	} {
		fmt.Fprintf(&b, "\n  %4d goroutines in %s", strings.Count(dump, frame), frame)
	}
	return b.String()
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/agentd/agent/internal/benchtable"
	"github.com/agentd/agent/internal/testkit/sshload"
)

// The load-ssh step: many `agent ssh ws -- true` against one `agent run`,
// one after the other and in bursts, next to OpenSSH's ssh through the same
// workspace (config-ssh's ProxyCommand) and to OpenSSH's sshd directly, in
// the same run. Like the deployment step it runs in a child in a private
// network namespace, on the deployment that step uses.

const loadSSHChildArg = "load-ssh-child"

// loadDefaults are the sizes; AGENT_LOAD_* change them.
var loadDefaults = sshload.Sizes{Sequential: 10000, SequentialReference: 1000, Concurrent: 1000, Burst: 100}

// loadSeries is one client's figures for one shape of load.
type loadSeries struct {
	Runs     int      `json:"runs"`
	Failures int      `json:"failures"`
	Errors   []string `json:"errors,omitempty"`
	P50MS    float64  `json:"p50_ms"`
	P99MS    float64  `json:"p99_ms"`
	FreedMS  float64  `json:"freed_max_ms,omitempty"` // slowest freeing of the agent's sessions
	Lingered int      `json:"lingered,omitempty"`     // times the agent took longer than 1 s
	Note     string   `json:"note,omitempty"`         // why it did not run
}

func seriesOf(r sshload.Result) loadSeries {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	return loadSeries{Runs: r.Runs, Failures: r.Failures, Errors: r.Errors, P50MS: ms(r.Percentile(50)),
		P99MS: ms(r.Percentile(99)), FreedMS: ms(r.FreedMax), Lingered: r.Lingered}
}

// loadShape is one shape of load (sequential or bursts) for each client.
type loadShape struct {
	Agent, Proxy, Direct loadSeries
	// After the agent's runs: how long until goroutines, fds and RSS were
	// back within 10 % of idle, and what was left if they were not.
	SettledMS  float64 `json:"settled_ms"`
	SettleErr  string  `json:"settle_err,omitempty"`
	PeakRSSKiB int64   `json:"peak_rss_kib"`
}

type loadResult struct {
	Sizes       sshload.Sizes
	ColdIdle    sshload.Figures // after the first client
	Idle        sshload.Figures // after a warm-up burst: the reference
	WarmUp      loadSeries      // that burst
	Sequential  loadShape
	Concurrent  loadShape
	MemoryLimit int64 `json:"memory_limit"`
}

var loadRowNames = []string{
	"load: agent ssh WS true, sequential, p50",
	"load: agent ssh WS true, sequential, p99",
	"load: agent ssh WS true, concurrent bursts, p50",
	"load: agent ssh WS true, concurrent bursts, p99",
	"load: agent run back near idle after the load",
	"load: agent run peak RSS under load",
}

// measureLoadSSH runs the load child in a private network namespace, as
// measureDeployment does, and turns its result into rows.
func measureLoadSSH(ctx context.Context, log io.Writer, bin string) []benchtable.Row {
	sizes, err := sshload.SizesFromEnv(os.Getenv, loadDefaults)
	if err != nil {
		return failRows(loadRowNames, err)
	}
	if os.Geteuid() != 0 {
		return skipRows(loadRowNames, "needs root: a private network namespace and OpenSSH's sshd as the reference")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		return skipRows(loadRowNames, "needs unshare (util-linux) for a private network namespace")
	}
	var res loadResult
	if err := runNamespaceChild(ctx, log, []string{"--net"}, sizes.Env(), "load measurements", &res, loadSSHChildArg, bin); err != nil {
		return failRows(loadRowNames, err)
	}
	return res.rows()
}

func (r loadResult) rows() []benchtable.Row {
	ms := func(v float64) benchtable.Value { return benchtable.Value{Value: v, Unit: "ms"} }
	mb := func(kib int64) benchtable.Value {
		return benchtable.Value{Value: float64(kib) * 1024 / 1e6, Unit: "MB"}
	}
	var rows []benchtable.Row
	for i, sh := range []struct {
		shape loadShape
		what  string
	}{
		{r.Sequential, fmt.Sprintf("%d one after the other (each reference %d, among them)", r.Sizes.Sequential, r.Sizes.SequentialReference)},
		{r.Concurrent, fmt.Sprintf("%d in bursts of %d", r.Sizes.Concurrent, r.Sizes.Burst)},
	} {
		s := sh.shape
		note := fmt.Sprintf("%s; failed: agent ssh %d, ssh via ProxyCommand %d, ssh to sshd %d; agent freed each client's session within %.0f ms (slowest)",
			sh.what, s.Agent.Failures, s.Proxy.Failures, s.Direct.Failures, s.Agent.FreedMS)
		p50, p99 := loadRowNames[2*i], loadRowNames[2*i+1]
		err := s.Agent.problem()
		if werr := r.WarmUp.problem(); err == nil && werr != nil && i == 1 {
			err = fmt.Errorf("warm-up burst: %w", werr)
		}
		if err != nil {
			rows = append(rows, benchtable.Failed(p50, fmt.Errorf("%s; p50 %.0f ms, p99 %.0f ms (via ProxyCommand %.0f, %.0f ms): %w",
				note, s.Agent.P50MS, s.Agent.P99MS, s.Proxy.P50MS, s.Proxy.P99MS, err)), benchtable.Failed(p99, err))
			continue
		}
		rows = append(rows,
			benchtable.Measured(p50, ms(s.Agent.P50MS), s.Proxy.reference("p50", s.Proxy.P50MS),
				note+fmt.Sprintf("; OpenSSH's sshd directly: p50 %.0f ms%s", s.Direct.P50MS, s.Direct.noteIf())),
			benchtable.Measured(p99, ms(s.Agent.P99MS), s.Proxy.reference("p99", s.Proxy.P99MS),
				fmt.Sprintf("OpenSSH's sshd directly: p99 %.0f ms", s.Direct.P99MS)))
	}
	target := benchtable.Reference{Name: "target", Value: &benchtable.Value{Value: 5000, Unit: "ms"}}
	settled := max(r.Sequential.SettledMS, r.Concurrent.SettledMS)
	if errs := strings.TrimSpace(r.Sequential.SettleErr + " " + r.Concurrent.SettleErr); errs != "" {
		rows = append(rows, benchtable.Failed(loadRowNames[4], fmt.Errorf("goroutines, fds or RSS not within 10%% of idle (%v) within 5 s: %s", r.Idle, errs)))
	} else {
		rows = append(rows, benchtable.Measured(loadRowNames[4], ms(settled), target,
			fmt.Sprintf("slowest return of goroutines, fds and RSS to within 10%% of idle after each load; idle after a warm-up burst: %v; after the first client: %v", r.Idle, r.ColdIdle)))
	}
	peak := max(r.Sequential.PeakRSSKiB, r.Concurrent.PeakRSSKiB)
	limit := benchtable.Reference{Name: "soft memory limit", Note: "the agent reported none"}
	if r.MemoryLimit > 0 {
		limit.Value = &benchtable.Value{Value: float64(r.MemoryLimit) / 1e6, Unit: "MB"}
	}
	sessions := r.Sizes.Sequential + r.Sizes.Concurrent
	if r.MemoryLimit <= 0 || peak*1024 > r.MemoryLimit {
		rows = append(rows, benchtable.Failed(loadRowNames[5], fmt.Errorf("peak RSS %v across %d sessions; soft limit %d bytes", mb(peak), sessions, r.MemoryLimit)))
	} else {
		rows = append(rows, benchtable.Measured(loadRowNames[5], mb(peak), limit,
			fmt.Sprintf("highest VmRSS read between runs across %d sessions (ProxyCommand runs included)", sessions)))
	}
	return rows
}

// problem is what makes the agent's series fail the bar.
func (s loadSeries) problem() error {
	switch {
	case s.Note != "":
		return errors.New(s.Note)
	case s.Failures > 0:
		return fmt.Errorf("%d of %d runs failed: %s", s.Failures, s.Runs, strings.Join(s.Errors, " | "))
	case s.Lingered > 0:
		return fmt.Errorf("the agent held a finished client's session longer than 1 s %d time(s) (slowest %.0f ms): %s", s.Lingered, s.FreedMS, strings.Join(s.Errors, " | "))
	}
	return nil
}

func (s loadSeries) reference(which string, v float64) benchtable.Reference {
	ref := benchtable.Reference{Name: "OpenSSH ssh through config-ssh's ProxyCommand, " + which}
	if s.Note != "" || s.Runs == 0 {
		ref.Note = s.Note
		return ref
	}
	ref.Value = &benchtable.Value{Value: v, Unit: "ms"}
	if s.Failures > 0 {
		ref.Note = fmt.Sprintf("%d of %d failed", s.Failures, s.Runs)
	}
	return ref
}

func (s loadSeries) noteIf() string {
	if s.Note != "" {
		return " (" + s.Note + ")"
	}
	return ""
}

// loadSSHChild runs inside the private network namespace and prints a
// loadResult as JSON.
func loadSSHChild(ctx context.Context, bin string) error {
	sizes, err := sshload.SizesFromEnv(os.Getenv, loadDefaults)
	if err != nil {
		return err
	}
	d, done, err := upDeployment(ctx, bin, "load0", "load1")
	if err != nil {
		return err
	}
	defer done()
	dir := d.dir
	probe := sshload.NewProbe(d.agent.Process.Pid, filepath.Join(dir, "agent", "status.sock"))
	res := loadResult{Sizes: sizes}
	if res.ColdIdle, err = probe.Idle(ctx); err != nil {
		return err
	}
	// Idle is read after one warm-up burst: what the agent grows once for
	// good (pools, tables at their burst size) is in it, and the check is
	// that the load leaves nothing more behind.
	// Its failures count against the agent like the others'.
	load := sshload.Load{Run: d.sshTrueRun, Probe: probe}
	warm := load.Bursts(ctx, sizes.Burst, sizes.Burst)
	res.WarmUp = seriesOf(warm)
	fmt.Fprintf(os.Stderr, "load-ssh: warm-up burst of %d: %s\n", sizes.Burst, warm.Summary())
	if res.Idle, err = probe.Idle(ctx); err != nil {
		return err
	}
	res.MemoryLimit = res.Idle.MemoryLimit
	// Its goroutines, to name what a load leaves above idle.
	idleStacks, idleStacksErr := probe.Goroutines(ctx)
	fmt.Fprintf(os.Stderr, "load-ssh: idle agent after one client: %v; after a warm-up burst: %v\n", res.ColdIdle, res.Idle)

	proxy, err := d.proxyCommandRun(ctx)
	if err != nil {
		return err
	}
	direct, stopSSHD, directErr := directSSHDRun(ctx, dir)
	if directErr == nil {
		defer stopSSHD()
	}
	clients := []struct {
		name  string
		run   sshload.Run
		probe *sshload.Probe
		err   error
		pick  func(*loadShape) *loadSeries
	}{
		{"agent ssh", d.sshTrueRun, probe, nil, func(s *loadShape) *loadSeries { return &s.Agent }},
		{"ssh via ProxyCommand", proxy, probe, nil, func(s *loadShape) *loadSeries { return &s.Proxy }},
		{"ssh to sshd", direct, nil, directErr, func(s *loadShape) *loadSeries { return &s.Direct }},
	}
	settle := func(shape *loadShape, after string) {
		took, f, err := probe.WaitSettled(ctx, res.Idle, sshload.TenPercent, 5*time.Second)
		fmt.Fprintf(os.Stderr, "load-ssh: after %s: %v until within 10%% of idle (%v)\n", after, took.Round(time.Millisecond), f)
		shape.SettledMS = max(shape.SettledMS, float64(took.Microseconds())/1000)
		if err != nil {
			shape.SettleErr += fmt.Sprintf("after %s: %v (now %v; goroutines: %s). ", after, err, f, stacksAbove(ctx, probe, idleStacks, idleStacksErr))
		}
	}
	// Bursts first: they are the harder load, and the sequential runs
	// (10,000 of the agent's) are the long part.
	for _, c := range clients {
		if c.err != nil {
			c.pick(&res.Concurrent).Note = c.err.Error()
			continue
		}
		start := time.Now()
		r := sshload.Load{Run: c.run, Probe: c.probe}.Bursts(ctx, sizes.Concurrent, sizes.Burst)
		fmt.Fprintf(os.Stderr, "load-ssh: %s, %d in bursts of %d: %s (%v)\n", c.name, sizes.Concurrent, sizes.Burst,
			r.Summary(), time.Since(start).Round(time.Second))
		*c.pick(&res.Concurrent) = seriesOf(r)
		res.Concurrent.PeakRSSKiB = max(res.Concurrent.PeakRSSKiB, r.PeakRSSKB)
		if c.probe != nil {
			settle(&res.Concurrent, c.name)
		}
	}
	// One after the other: the references' runs are spread among the
	// agent's, so a long run's drift in the machine's load hits all alike.
	var refs []sshload.Load
	var refClients []int
	for i, c := range clients[1:] {
		if c.err != nil {
			c.pick(&res.Sequential).Note = c.err.Error()
			continue
		}
		refs = append(refs, sshload.Load{Run: c.run, Probe: c.probe})
		refClients = append(refClients, i+1)
	}
	start := time.Now()
	agentRes, refRes := sshload.Load{Run: d.sshTrueRun, Probe: probe}.Interleaved(ctx, sizes.Sequential, refs, sizes.SequentialReference)
	fmt.Fprintf(os.Stderr, "load-ssh: agent ssh, %d one after the other: %s (%v, with the references' runs)\n", sizes.Sequential,
		agentRes.Summary(), time.Since(start).Round(time.Second))
	res.Sequential.Agent = seriesOf(agentRes)
	res.Sequential.PeakRSSKiB = agentRes.PeakRSSKB
	for i, r := range refRes {
		c := clients[refClients[i]]
		fmt.Fprintf(os.Stderr, "load-ssh: %s, %d one after the other among them: %s\n", c.name, sizes.SequentialReference, r.Summary())
		*c.pick(&res.Sequential) = seriesOf(r)
		res.Sequential.PeakRSSKiB = max(res.Sequential.PeakRSSKiB, r.PeakRSSKB)
	}
	settle(&res.Sequential, "the runs one after the other")
	return json.NewEncoder(os.Stdout).Encode(res)
}

// stacksAbove names the agent's goroutine stacks that grew since idle.
func stacksAbove(ctx context.Context, probe *sshload.Probe, idle string, idleErr error) string {
	if idleErr != nil {
		return idleErr.Error()
	}
	now, err := probe.Goroutines(ctx)
	if err != nil {
		return err.Error()
	}
	return sshload.GoroutinesAbove(idle, now)
}

// sshTrueRun is one `agent ssh ws -- true`, with the client's own 30 s
// --timeout.
func (d *deployment) sshTrueRun(ctx context.Context) error {
	return runClient(ctx, d.clientEnv, d.bin, "ssh", "ws", "--", "true")
}

// proxyCommandRun writes config-ssh's block into a config file of its own
// and returns a run of OpenSSH's `ssh ws.agent true` through it.
func (d *deployment) proxyCommandRun(ctx context.Context) (sshload.Run, error) {
	cfg := filepath.Join(d.dir, "ssh_config")
	cmd := exec.CommandContext(ctx, d.bin, "config-ssh", "--ssh-config", cfg)
	cmd.Env = d.clientEnv
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("agent config-ssh: %w: %s", err, out)
	}
	return func(ctx context.Context) error {
		return runClient(ctx, d.clientEnv, "ssh", "-F", cfg, "-o", "BatchMode=yes", "ws.agent", "true")
	}, nil
}

// directSSHDRun starts OpenSSH's sshd on loopback (MaxStartups raised, as
// our server has no such cap) and returns a run of `ssh root@127.0.0.1 true`.
func directSSHDRun(ctx context.Context, dir string) (sshload.Run, func(), error) {
	args, stop, err := referenceSSHD(ctx, filepath.Join(dir, "openssh-load"), "MaxStartups 2000", "MaxSessions 2000")
	if err != nil {
		return nil, nil, err
	}
	args = append(args, "true")
	return func(ctx context.Context) error { return runClient(ctx, os.Environ(), "ssh", args...) }, stop, nil
}

// runClient runs one client process to its end; the error carries its
// last line of output.
func runClient(ctx context.Context, env []string, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", filepath.Base(name), err, lastLines(out.String(), 1))
	}
	return nil
}

// loadSSHChildMain is main's entry for the child: os.Args is
// [benchrun, load-ssh-child, BIN].
func loadSSHChildMain(ctx context.Context, args []string) int {
	if len(args) != 3 {
		fmt.Fprintln(os.Stderr, "bench load-ssh: usage: benchrun", loadSSHChildArg, "AGENT_BINARY")
		return 2
	}
	if err := loadSSHChild(ctx, args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "bench load-ssh:", err)
		return 1
	}
	return 0
}

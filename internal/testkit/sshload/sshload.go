// Package sshload drives many short SSH runs against one agent and reads
// what they leave behind in it: latencies and failures of the runs, the
// agent's open SSH connections and sessions after each client exits, and
// its goroutines, file descriptors and RSS after the load. The load test
// in e2e/tailnet and the "load-ssh" step of scripts/bench both use it.
package sshload

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Sizes of a load run; the suite uses small ones, the bench the issue's.
type Sizes struct {
	Sequential int // runs one after the other
	// SequentialReference is how many of those runs each reference client
	// makes, interleaved with the measured client's (0: as many).
	SequentialReference int
	Concurrent          int // runs in bursts of Burst started together
	Burst               int
}

// SizesFromEnv reads AGENT_LOAD_SEQUENTIAL, AGENT_LOAD_SEQUENTIAL_REFERENCE,
// AGENT_LOAD_CONCURRENT and AGENT_LOAD_BURST over def.
func SizesFromEnv(getenv func(string) string, def Sizes) (Sizes, error) {
	s := def
	for _, f := range []struct {
		name string
		v    *int
	}{{"AGENT_LOAD_SEQUENTIAL", &s.Sequential}, {"AGENT_LOAD_SEQUENTIAL_REFERENCE", &s.SequentialReference},
		{"AGENT_LOAD_CONCURRENT", &s.Concurrent}, {"AGENT_LOAD_BURST", &s.Burst}} {
		v := getenv(f.name)
		if v == "" {
			continue
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return s, fmt.Errorf("%s=%q: want a count, e.g. %s=1000", f.name, v, f.name)
		}
		*f.v = n
	}
	if s.Burst <= 0 {
		return s, errors.New("AGENT_LOAD_BURST: want at least 1")
	}
	if s.SequentialReference <= 0 || s.SequentialReference > s.Sequential {
		s.SequentialReference = s.Sequential
	}
	return s, nil
}

// Env is the sizes as environment assignments, for a table's header.
func (s Sizes) Env() []string {
	return []string{
		"AGENT_LOAD_SEQUENTIAL=" + strconv.Itoa(s.Sequential),
		"AGENT_LOAD_SEQUENTIAL_REFERENCE=" + strconv.Itoa(s.SequentialReference),
		"AGENT_LOAD_CONCURRENT=" + strconv.Itoa(s.Concurrent),
		"AGENT_LOAD_BURST=" + strconv.Itoa(s.Burst),
	}
}

// Result is what a series of runs measured.
type Result struct {
	Runs      int
	Failures  int
	Errors    []string        // the first few failures, worded by the runner
	Latencies []time.Duration // of the runs that succeeded
	// FreedMax is the longest time the agent took to free its SSH
	// connections and sessions after clients exited (0 without a probe).
	FreedMax time.Duration
	// Lingered counts the checks where it took longer than the limit.
	Lingered  int
	PeakRSSKB int64 // highest agent RSS seen between runs, KiB
}

const keptErrors = 5

func (r *Result) fail(err error) {
	r.Failures++
	if len(r.Errors) < keptErrors {
		r.Errors = append(r.Errors, err.Error())
	}
}

// Percentile returns the p-th percentile (0-100) of the latencies.
func (r Result) Percentile(p float64) time.Duration {
	if len(r.Latencies) == 0 {
		return 0
	}
	s := slices.Clone(r.Latencies)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p / 100)
	return s[i]
}

// Summary is one line: runs, failures, p50, p99, the slowest freeing.
func (r Result) Summary() string {
	msg := fmt.Sprintf("%d runs, %d failed, p50 %v, p99 %v", r.Runs, r.Failures,
		r.Percentile(50).Round(time.Millisecond), r.Percentile(99).Round(time.Millisecond))
	if r.FreedMax > 0 {
		msg += fmt.Sprintf(", agent freed its sessions within %v (slowest)", r.FreedMax.Round(time.Millisecond))
	}
	if r.Lingered > 0 {
		msg += fmt.Sprintf(", %d time(s) late", r.Lingered)
	}
	if len(r.Errors) > 0 {
		msg += "; first failures: " + strings.Join(r.Errors, " | ")
	}
	return msg
}

// Run is one client run, e.g. `agent ssh ws -- true`; it returns when the
// client process has exited.
type Run func(ctx context.Context) error

// Load runs the runs; Probe, when set, is checked after each run (each
// burst) for the agent to free what the clients held.
type Load struct {
	Run      Run
	Probe    *Probe
	FreeWait time.Duration // how long the agent may take; default 1 s
}

func (l Load) freeWait() time.Duration {
	if l.FreeWait > 0 {
		return l.FreeWait
	}
	return time.Second
}

// Sequential runs n runs one after the other.
func (l Load) Sequential(ctx context.Context, n int) Result {
	return l.bursts(ctx, n, 1)
}

// Interleaved runs n runs of l one after the other and, spread evenly
// among them, refN runs of each reference (one of each after every n/refN
// of l's), so that over a long run all see the same machine. It returns
// l's result and each reference's.
func (l Load) Interleaved(ctx context.Context, n int, refs []Load, refN int) (Result, []Result) {
	var res Result
	refRes := make([]Result, len(refs))
	refDone := 0
	for done := 0; done < n && ctx.Err() == nil; done++ {
		res.add(l.bursts(ctx, 1, 1))
		// The references' share so far trails l's: refDone/refN <= (done+1)/n.
		for refDone < refN && refDone*n < (done+1)*refN && ctx.Err() == nil {
			for i, r := range refs {
				refRes[i].add(r.bursts(ctx, 1, 1))
			}
			refDone++
		}
	}
	if err := ctx.Err(); err != nil && res.Runs < n {
		res.fail(fmt.Errorf("stopped after %d of %d runs: %w", res.Runs, n, err))
	}
	return res, refRes
}

// add takes in one more series' figures.
func (r *Result) add(o Result) {
	r.Runs += o.Runs
	r.Failures += o.Failures
	for _, e := range o.Errors {
		if len(r.Errors) < keptErrors {
			r.Errors = append(r.Errors, e)
		}
	}
	r.Latencies = append(r.Latencies, o.Latencies...)
	r.FreedMax = max(r.FreedMax, o.FreedMax)
	r.Lingered += o.Lingered
	r.PeakRSSKB = max(r.PeakRSSKB, o.PeakRSSKB)
}

// Bursts runs n runs in bursts of size started together, each burst after
// the previous one has ended.
func (l Load) Bursts(ctx context.Context, n, size int) Result {
	return l.bursts(ctx, n, size)
}

func (l Load) bursts(ctx context.Context, n, size int) Result {
	var res Result
	var mu sync.Mutex
	for done := 0; done < n && ctx.Err() == nil; {
		k := min(size, n-done)
		var wg sync.WaitGroup
		for range k {
			wg.Add(1)
			go func() {
				defer wg.Done()
				start := time.Now()
				err := l.Run(ctx)
				elapsed := time.Since(start)
				mu.Lock()
				defer mu.Unlock()
				res.Runs++
				if err != nil {
					res.fail(err)
					return
				}
				res.Latencies = append(res.Latencies, elapsed)
			}()
		}
		wg.Wait()
		done += k
		if l.Probe == nil {
			continue
		}
		took, err := l.Probe.WaitFree(ctx, l.freeWait())
		res.FreedMax = max(res.FreedMax, took)
		if err != nil {
			res.Lingered++
			if len(res.Errors) < keptErrors {
				res.Errors = append(res.Errors, err.Error())
			}
		}
		if f, err := l.Probe.Read(ctx); err == nil {
			res.PeakRSSKB = max(res.PeakRSSKB, f.RSSKB)
		}
	}
	if err := ctx.Err(); err != nil && res.Runs < n {
		res.fail(fmt.Errorf("stopped after %d of %d runs: %w", res.Runs, n, err))
	}
	return res
}

// Probe reads an agent's figures: its metrics from the owner-only status
// socket, its file descriptors and RSS from /proc.
type Probe struct {
	PID          int
	StatusSocket string
	client       *http.Client
}

// NewProbe reads the agent with process ID pid and status socket path.
// Only Read needs the PID (for file descriptors and RSS).
func NewProbe(pid int, statusSocket string) *Probe {
	return &Probe{PID: pid, StatusSocket: statusSocket, client: &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", statusSocket)
		}},
	}}
}

// Figures is one reading of the agent.
type Figures struct {
	Goroutines     int
	FDs            int
	RSSKB          int64
	FileKB         int64 // of RSSKB, the binary's pages (RssFile), grown as code first runs
	SSHConnections int   // agent_connections_active{kind="ssh"}
	SSHSessions    int   // agent_sessions_active{kind="ssh"}
	MemoryLimit    int64 // the Go runtime's soft limit, bytes (go_gc_gomemlimit_bytes)
	HeapInuse      int64 // bytes, go_memstats_heap_inuse_bytes: what of RSS is live heap
}

func (f Figures) String() string {
	return fmt.Sprintf("%d goroutines, %d fds, RSS %.1f MB (the binary's pages %.1f MB; heap in use %.1f MB), %d SSH connections, %d SSH sessions",
		f.Goroutines, f.FDs, float64(f.RSSKB)*1024/1e6, float64(f.FileKB)*1024/1e6, float64(f.HeapInuse)/1e6, f.SSHConnections, f.SSHSessions)
}

// get GETs path from the status socket; the caller closes the body.
func (p *Probe) get(ctx context.Context, path, what string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("read the agent's %s from %s: %w", what, p.StatusSocket, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("read the agent's %s from %s: %s", what, p.StatusSocket, resp.Status)
	}
	return resp.Body, nil
}

// Metrics takes the part of a reading that comes from the agent's
// metrics: everything but FDs, RSSKB and FileKB (no PID needed).
func (p *Probe) Metrics(ctx context.Context) (Figures, error) {
	var f Figures
	body, err := p.get(ctx, "/metrics", "metrics")
	if err != nil {
		return f, err
	}
	defer body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(body)
	if err != nil {
		return f, fmt.Errorf("parse the agent's metrics: %w", err)
	}
	f.Goroutines = int(value(families["go_goroutines"], nil))
	ssh := map[string]string{"kind": "ssh"}
	f.SSHConnections = int(value(families["agent_connections_active"], ssh))
	f.SSHSessions = int(value(families["agent_sessions_active"], ssh))
	f.MemoryLimit = int64(value(families["go_gc_gomemlimit_bytes"], nil))
	f.HeapInuse = int64(value(families["go_memstats_heap_inuse_bytes"], nil))
	return f, nil
}

// Peers counts the peers the agent lists in its status.
func (p *Probe) Peers(ctx context.Context) (int, error) {
	body, err := p.get(ctx, "/status", "status")
	if err != nil {
		return 0, err
	}
	defer body.Close()
	var st struct {
		Peers []json.RawMessage `json:"peers"`
	}
	if err := json.NewDecoder(body).Decode(&st); err != nil {
		return 0, fmt.Errorf("parse the agent's status: %w", err)
	}
	return len(st.Peers), nil
}

// Read takes one reading.
func (p *Probe) Read(ctx context.Context) (Figures, error) {
	f, err := p.Metrics(ctx)
	if err != nil {
		return f, err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.PID))
	if err != nil {
		return f, fmt.Errorf("count the agent's file descriptors: %w", err)
	}
	f.FDs = len(fds)
	f.RSSKB, f.FileKB, err = RSS(p.PID)
	return f, err
}

// value is the value of the first series of fam whose labels include want.
func value(fam *dto.MetricFamily, want map[string]string) float64 {
	if fam == nil {
		return 0
	}
	for _, m := range fam.GetMetric() {
		match := 0
		for _, l := range m.GetLabel() {
			if v, ok := want[l.GetName()]; ok && v == l.GetValue() {
				match++
			}
		}
		if match != len(want) {
			continue
		}
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Untyped != nil:
			return m.Untyped.GetValue()
		}
	}
	return 0
}

// RSS reads a process's VmRSS and, of it, the file pages (RssFile), in KiB.
func RSS(pid int) (rss, file int64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, fmt.Errorf("read the agent's memory: %w", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		name, v, _ := strings.Cut(line, ":")
		var dst *int64
		switch name {
		case "VmRSS":
			dst = &rss
		case "RssFile":
			dst = &file
		default:
			continue
		}
		if *dst, err = strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64); err != nil {
			return 0, 0, fmt.Errorf("%s in /proc/%d/status: %w", name, pid, err)
		}
	}
	if rss == 0 {
		return 0, 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
	}
	return rss, file, nil
}

// WaitFree polls until the agent holds no SSH connection or session, and
// returns how long that took; an error if it still did after limit.
func (p *Probe) WaitFree(ctx context.Context, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	for {
		f, err := p.Read(ctx)
		took := time.Since(start)
		if err == nil && f.SSHConnections == 0 && f.SSHSessions == 0 {
			return took, nil
		}
		if took > limit || ctx.Err() != nil {
			if err != nil {
				return took, err
			}
			return took, fmt.Errorf("the agent still held %d SSH connection(s) and %d session(s) %v after the clients exited",
				f.SSHConnections, f.SSHSessions, took.Round(time.Millisecond))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// quietFor is how long Idle lets the agent rest before reading: past its
// memory release after the last connection (agent/sshd's idleRelease).
const quietFor = 4 * time.Second

// Idle waits for the agent to be quiet (no SSH connection for quietFor,
// then figures steady over a second) and returns that reading as its idle
// figures.
func (p *Probe) Idle(ctx context.Context) (Figures, error) {
	if _, err := p.WaitFree(ctx, 30*time.Second); err != nil {
		return Figures{}, err
	}
	select {
	case <-ctx.Done():
		return Figures{}, ctx.Err()
	case <-time.After(quietFor):
	}
	var last Figures
	for i := 0; ; i++ {
		f, err := p.Read(ctx)
		if err != nil {
			return f, err
		}
		if i > 0 && f.SSHConnections == 0 && f.Goroutines == last.Goroutines && f.FDs == last.FDs {
			return f, nil
		}
		if i > 30 {
			return f, fmt.Errorf("the agent did not settle for an idle reading in 30 s: %v", f)
		}
		last = f
		select {
		case <-ctx.Done():
			return f, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// Margin is how far above idle a reading may be, as fractions (0.10 is
// 10 %): Count for goroutines and fds, RSS for the resident memory.
type Margin struct{ Count, RSS float64 }

// TenPercent is the bar for all three.
var TenPercent = Margin{Count: 0.10, RSS: 0.10}

// Within reports whether f is within m of idle in goroutines, fds and RSS,
// and if not, what is above.
func Within(f, idle Figures, m Margin) error {
	var over []string
	check := func(name string, got, base, frac float64) {
		if got > base*(1+frac) {
			over = append(over, fmt.Sprintf("%s %.0f (idle %.0f, +%.0f%%; allowed +%.0f%%)", name, got, base, (got/base-1)*100, frac*100))
		}
	}
	check("goroutines", float64(f.Goroutines), float64(idle.Goroutines), m.Count)
	check("fds", float64(f.FDs), float64(idle.FDs), m.Count)
	check("RSS KiB", float64(f.RSSKB), float64(idle.RSSKB), m.RSS)
	if len(over) > 0 {
		return fmt.Errorf("above idle: %s", strings.Join(over, ", "))
	}
	return nil
}

// WaitSettled polls until Within(f, idle, m) holds and returns the time it
// took and the last reading; an error if it did not within limit.
func (p *Probe) WaitSettled(ctx context.Context, idle Figures, m Margin, limit time.Duration) (time.Duration, Figures, error) {
	start := time.Now()
	for {
		f, err := p.Read(ctx)
		took := time.Since(start)
		if err == nil {
			if err = Within(f, idle, m); err == nil {
				return took, f, nil
			}
		}
		if took > limit || ctx.Err() != nil {
			return took, f, fmt.Errorf("%v after the load: %w", took.Round(time.Millisecond), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

package netcheck

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/agent/netcheck/internal/nclab"
	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/metrics"
)

// The test binary doubles as the netcheck program run inside lab
// namespaces (nclab.Run): it runs one check with the options in
// NETCHECK_OPTS and prints the JSON report. A child process is the only
// way to have every goroutine of a run inside the namespace.
func TestMain(m *testing.M) {
	if nclab.IsHelper() {
		os.Exit(helperMain())
	}
	code := m.Run()
	nclab.Cleanup()
	os.Exit(code)
}

func helperMain() int {
	var o Options
	if err := json.Unmarshal(nclab.Opts(), &o); err != nil {
		os.Stderr.WriteString("bad NETCHECK_OPTS: " + err.Error() + "\n")
		return 3
	}
	_ = Run(context.Background(), o).WriteJSON(os.Stdout)
	return 0
}

// runIn runs netcheck inside ns and returns its report.
func runIn(t testing.TB, ns *netlab.Namespace, o Options, unprivileged bool) *Report {
	t.Helper()
	out, err := nclab.Run(t, ns, o, unprivileged)
	if err != nil {
		t.Fatalf("netcheck in %s: %v", ns.Label(), err)
	}
	var r Report
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("netcheck output is not a report: %v\n%s", err, out)
	}
	return &r
}

type podLab struct{ *nclab.PodLab }

func newPodLab(t testing.TB) *podLab { return &podLab{nclab.New(t)} }

// icmpBlock makes the node drop ICMP echo to itself (its bridge address).
const icmpBlock = "table inet icmpblock {\n chain input {\n  type filter hook input priority filter; policy accept;\n  icmp type echo-request drop\n }\n}\n"

func (pl *podLab) workspaceOpts() Options {
	return Options{CoordinatorURL: pl.CoordURL, Fingerprint: pl.Fingerprint}
}

func describe(r *Report) string {
	var b strings.Builder
	_ = r.WriteText(&b)
	return b.String()
}

func wantFinding(t testing.TB, r *Report, code string, sev Status) *Finding {
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

func TestHealthyLab(t *testing.T) {
	pl := newPodLab(t)
	r := runIn(t, pl.Pod, pl.workspaceOpts(), true)
	if r.Status != StatusOK || len(r.Findings) > 0 {
		t.Fatalf("healthy lab reported %s:\n%s", r.Status, describe(r))
	}
	for _, id := range []string{"link", "address", "route", "gateway", "mtu", "dns", "proxy", "https", "clock", "derp", "udp"} {
		c := r.Check(id)
		if c == nil || c.Status != StatusOK {
			t.Errorf("check %s: %+v", id, c)
		}
	}
	if m := r.Check("gateway").Details["method"]; m != string(icmpDatagram) {
		t.Errorf("gateway probed by %v, want the unprivileged ping socket", m)
	}
	if r.DurationMS > 2000 {
		t.Errorf("healthy report took %d ms, want under 2000", r.DurationMS)
	}
	t.Logf("healthy workspace report in %d ms:\n%s", r.DurationMS, describe(r))
}

// TestFaults injects one fault per subtest into a fresh lab and expects its
// own diagnosis from the pod (package node checks the node side of each).
func TestFaults(t *testing.T) {
	tests := []struct {
		name       string
		inject     func(t *testing.T, pl *podLab)
		podFinding string
		podSev     Status
	}{
		{"bridge deleted", func(t *testing.T, pl *podLab) { pl.Node.IP("link", "del", "cni0") }, "gateway.unreachable", StatusBroken},
		{"veth detached", func(t *testing.T, pl *podLab) { pl.Node.IP("link", "set", "veth1", "nomaster") }, "gateway.unreachable", StatusBroken},
		{"bridge address flushed", func(t *testing.T, pl *podLab) { pl.Node.IP("addr", "flush", "dev", "cni0") }, "gateway.unreachable", StatusBroken},
		{"mtu mismatch", func(t *testing.T, pl *podLab) {
			pl.Node.SetMTU("veth1", 1400)
			pl.Node.SetMTU("cni0", 1400)
		}, "mtu.blackhole", StatusDegraded},
		{"no default route", func(t *testing.T, pl *podLab) { pl.Pod.IP("route", "del", "default") }, "route.no_default", StatusBroken},
		{"dns unreachable", func(t *testing.T, pl *podLab) {
			pl.Pod.WriteEtc("resolv.conf", "nameserver 203.0.113.53\noptions timeout:1\n")
		}, "dns.unreachable", StatusBroken},
		{"udp dropped", func(t *testing.T, pl *podLab) { pl.Node.DropUDP(53) }, "udp.blocked", StatusDegraded},
		{"coordinator down", func(t *testing.T, pl *podLab) { pl.HTTPS.Close() }, "https.refused", StatusBroken},
		// The node drops ICMP echo to its bridge address; everything else
		// works. Odd, not broken.
		{"icmp to the gateway dropped", func(t *testing.T, pl *podLab) { pl.Node.Nft(icmpBlock) }, "gateway.icmp_filtered", StatusDegraded},
		// The first nameserver is dead, the second answers.
		{"first nameserver dead", func(t *testing.T, pl *podLab) {
			pl.Pod.WriteEtc("resolv.conf", "nameserver 203.0.113.53\nnameserver "+nclab.CoordIP+"\noptions timeout:1\n")
		}, "dns.partial", StatusDegraded},
		// The resolver answers, but only after 600 ms.
		{"slow resolver", func(t *testing.T, pl *podLab) { pl.DNSDelay.Store(int64(600 * time.Millisecond)) }, "dns.slow", StatusDegraded},
		// The path carries less than tunnels need: the advice must not be
		// to lower eth0 below that (which link.mtu_low would then reject).
		{"mtu below tunnel size", func(t *testing.T, pl *podLab) {
			pl.Node.SetMTU("veth1", 1300)
			pl.Node.SetMTU("cni0", 1300)
		}, "mtu.blackhole", StatusBroken},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pl := newPodLab(t)
			tt.inject(t, pl)
			r := runIn(t, pl.Pod, pl.workspaceOpts(), true)
			f := wantFinding(t, r, tt.podFinding, tt.podSev)
			if r.Status != tt.podSev {
				t.Errorf("report status %s, want %s", r.Status, tt.podSev)
			}
			if r.DurationMS > 3000 {
				t.Errorf("report took %d ms", r.DurationMS)
			}
			t.Logf("%s → %s: %s", tt.name, f.Code, f.Problem)
			if len(f.Remedy.Commands) > 0 {
				// The printed fix, run as printed (as root in the pod,
				// standing in for the CNI/runtime setting), heals it.
				for _, cmd := range f.Remedy.Commands {
					if out, err := pl.Pod.Run(context.Background(), "sh", "-c", cmd); err != nil {
						t.Errorf("printed fix %q: %v\n%s", cmd, err, out)
					}
				}
				if again := runIn(t, pl.Pod, pl.workspaceOpts(), true); again.Status != StatusOK {
					t.Errorf("after the printed fix %v:\n%s", f.Remedy.Commands, describe(again))
				}
			}
			switch tt.podFinding {
			case "gateway.unreachable":
				if !strings.HasPrefix(r.Summary, "workspace network broken past eth0") {
					t.Errorf("summary %q", r.Summary)
				}
			case "udp.blocked":
				if c := r.Check("derp"); c == nil || c.Status != StatusOK {
					t.Errorf("DERP should still work with UDP dropped: %+v", c)
				}
			case "mtu.blackhole":
				want := float64(1400)
				if tt.podSev == StatusBroken {
					want = 1280 // the largest probe size below 1300
					if len(f.Remedy.Commands) > 0 || !strings.Contains(f.Remedy.Text, "raise") {
						t.Errorf("below the tunnel size the fix must raise the path, not lower eth0: %+v", f.Remedy)
					}
				}
				if got := r.Check("mtu").Details["path_mtu_at_least"]; got != want {
					t.Errorf("path MTU lower bound %v, want %v", got, want)
				}
			case "gateway.icmp_filtered", "dns.partial", "dns.slow":
				for _, code := range []string{"gateway.unreachable", "https.timeout"} {
					if r.Finding(code) != nil {
						t.Errorf("%s reported with traffic working:\n%s", code, describe(r))
					}
				}
				if tt.podFinding == "dns.partial" && (!strings.Contains(f.Problem, "203.0.113.53") || !strings.Contains(r.Summary, "203.0.113.53")) {
					t.Errorf("the dead nameserver should be named and be the headline: %q / %q", f.Problem, r.Summary)
				}
			case "https.refused", "dns.unreachable":
				if r.Finding("gateway.unreachable") != nil {
					t.Errorf("%s blamed on the gateway:\n%s", tt.name, describe(r))
				}
			}
		})
	}
}

// TestPinMismatch: a wrong fingerprint is reported as such.
func TestPinMismatch(t *testing.T) {
	pl := newPodLab(t)
	o := pl.workspaceOpts()
	o.Fingerprint = strings.Repeat("ab", 32)
	r := runIn(t, pl.Pod, o, true)
	wantFinding(t, r, "https.fingerprint_mismatch", StatusBroken)
}

func TestWatchDetectsTeardown(t *testing.T) {
	pl := newPodLab(t)
	// Watch from inside the pod: run the helper as a long-lived process.
	bin := nclab.HelperBinary(t)
	o := pl.workspaceOpts()
	data, _ := json.Marshal(o)
	cmd := pl.Pod.Command(bin, "-test.run=^TestWatchHelper$")
	cmd.Env = append(os.Environ(), "NETCHECK_WATCH_OPTS="+string(data))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	dec := json.NewDecoder(stdout)
	var first Report
	if err := dec.Decode(&first); err != nil {
		t.Fatal(err)
	}
	if first.Status != StatusOK {
		t.Fatalf("first watch report: %s", first.Summary)
	}
	time.Sleep(300 * time.Millisecond)
	torn := time.Now()
	pl.Node.IP("link", "del", "cni0")
	var r Report
	for {
		if err := dec.Decode(&r); err != nil {
			t.Fatal(err)
		}
		if r.Status == StatusBroken {
			break
		}
	}
	took := time.Since(torn)
	if r.Finding("gateway.unreachable") == nil {
		t.Errorf("watch report after teardown:\n%s", describe(&r))
	}
	if took > 2*time.Second {
		t.Errorf("teardown detected after %v, want within 2 s", took)
	}
	t.Logf("bridge teardown detected by --watch in %v (%s report)", took.Round(time.Millisecond), r.Scope)
}

// TestWatchICMPFiltered: with ICMP echo to the gateway dropped and
// everything else working, --watch (whose quick probe is the gateway round
// trip) never reports broken; the running agent puts this on /readyz.
func TestWatchICMPFiltered(t *testing.T) {
	pl := newPodLab(t)
	pl.Node.Nft(icmpBlock)
	data, _ := json.Marshal(pl.workspaceOpts())
	cmd := pl.Pod.Command(nclab.HelperBinary(t), "-test.run=^TestWatchHelper$")
	cmd.Env = append(os.Environ(), "NETCHECK_WATCH_OPTS="+string(data))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	reports := make(chan Report)
	go func() {
		dec := json.NewDecoder(stdout)
		for {
			var r Report
			if dec.Decode(&r) != nil {
				close(reports)
				return
			}
			reports <- r
		}
	}()
	deadline := time.After(3 * time.Second)
	n := 0
	for {
		select {
		case r, ok := <-reports:
			if !ok {
				t.Fatal("watch ended")
			}
			n++
			if r.Status == StatusBroken {
				t.Fatalf("watch reported broken (%s report):\n%s", r.Scope, describe(&r))
			}
			if n == 1 && r.Finding("gateway.icmp_filtered") == nil {
				t.Errorf("first report should name the filtered ICMP:\n%s", describe(&r))
			}
		case <-deadline:
			if n == 0 {
				t.Fatal("no report")
			}
			if n > 2 {
				t.Errorf("%d reports in 3 s with nothing changing: the quick probe and the full report disagree", n)
			}
			return
		}
	}
}

// TestMetricsScrape runs the watch loop with its exporter in the pod,
// scrapes /metrics over HTTP as Prometheus would, tears the bridge down and
// scrapes again.
func TestMetricsScrape(t *testing.T) {
	pl := newPodLab(t)
	data, _ := json.Marshal(pl.workspaceOpts())
	cmd := pl.Pod.Command(nclab.HelperBinary(t), "-test.run=^TestWatchHelper$")
	cmd.Env = append(os.Environ(), "NETCHECK_WATCH_OPTS="+string(data), "NETCHECK_METRICS_ADDR=127.0.0.1:9153")
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	scrape := func() map[string]float64 {
		out, err := pl.Pod.Run(context.Background(), "curl", "-sf", "http://127.0.0.1:9153/metrics")
		if err != nil {
			return nil
		}
		return parseExposition(out)
	}
	waitFor := func(what string, ok func(m map[string]float64) bool) map[string]float64 {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		var m map[string]float64
		for time.Now().Before(deadline) {
			if m = scrape(); m != nil && ok(m) {
				return m
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("metrics never showed %s; last scrape: %v", what, m)
		return nil
	}
	const mode = `{mode="workspace"}`
	m := waitFor("a healthy verdict", func(m map[string]float64) bool {
		v, ok := m["agent_netcheck_verdict"+mode]
		return ok && v == 0
	})
	for _, k := range []string{`agent_netcheck_check_status{check="gateway",mode="workspace"}`, "agent_netcheck_seconds_since_healthy" + mode} {
		if v, ok := m[k]; !ok || v != 0 {
			t.Errorf("%s = %v (present %v), want 0", k, v, ok)
		}
	}
	if m["agent_netcheck_last_run_timestamp_seconds"+mode] < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last run timestamp %v is not recent", m["agent_netcheck_last_run_timestamp_seconds"+mode])
	}
	pl.Node.IP("link", "del", "cni0")
	m = waitFor("a broken verdict", func(m map[string]float64) bool { return m["agent_netcheck_verdict"+mode] == 2 })
	if m[`agent_netcheck_finding{code="gateway.unreachable",mode="workspace",severity="broken"}`] != 1 {
		t.Errorf("no gateway.unreachable finding series: %v", m)
	}
	waitFor("time since healthy growing", func(m map[string]float64) bool { return m["agent_netcheck_seconds_since_healthy"+mode] > 0.5 })
}

// parseExposition reads Prometheus text exposition into name{labels} →
// value (labels as the exporter writes them, sorted by name).
func parseExposition(text string) map[string]float64 {
	out := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(line[i+1:], &v); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// TestWatchHelper is the watch loop run by TestWatchDetectsTeardown in the
// pod namespace; on its own it does nothing.
func TestWatchHelper(t *testing.T) {
	raw := os.Getenv("NETCHECK_WATCH_OPTS")
	if raw == "" {
		t.Skip("helper for TestWatchDetectsTeardown")
	}
	var o Options
	if err := json.Unmarshal([]byte(raw), &o); err != nil {
		t.Fatal(err)
	}
	enc := json.NewEncoder(os.Stdout)
	exp := NewExporter(nil)
	if addr := os.Getenv("NETCHECK_METRICS_ADDR"); addr != "" {
		reg := metrics.NewRegistry()
		if err := reg.Register(exp); err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		go http.Serve(ln, reg.Handler())
	}
	err := Watch(context.Background(), o, WatchOptions{Interval: 500 * time.Millisecond}, func(r *Report) {
		exp.Observe(r)
		_ = enc.Encode(r)
	})
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}

package benchtable

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The samples in testdata are real `go test -bench` output of this
// project's benchmarks (and, for failures and skipped sub-benchmarks, of a
// small module made for the purpose), with and without -v.

func parseFile(t *testing.T, name string) Output {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out, err := Parse(f)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return out
}

func TestParseResults(t *testing.T) {
	tests := []struct {
		file, bench, metric string
		want                float64
		iterations          int
		pkg                 string
	}{
		{"tailnet.txt", "BenchmarkTransferDirect", "tailnet-MB/s", 29.84, 1, "github.com/agentd/agent/tailnet"},
		{"tailnet.txt", "BenchmarkTransferDERP", "loopback-MB/s", 1213, 1, "github.com/agentd/agent/tailnet"},
		{"tailnet.txt", "BenchmarkFirstPong", "ms-to-first-pong", 419.3, 1, "github.com/agentd/agent/tailnet"},
		// The benchmark prints text between its name and its figures.
		{"sshd.txt", "BenchmarkVsOpenSSH/stream", "agentd-MB/s", 57.30, 2, "github.com/agentd/agent/agent/sshd"},
		{"sshd.txt", "BenchmarkVsOpenSSH/scp", "openssh-MB/s", 26.25, 2, "github.com/agentd/agent/agent/sshd"},
		{"sshd.txt", "BenchmarkVsOpenSSH/setup", "ns/op", 4756728182, 2, "github.com/agentd/agent/agent/sshd"},
		{"netcheck-v.txt", "BenchmarkHealthyReport", "report_ms", 19, 1, "github.com/agentd/agent/agent/netcheck"},
		{"netcheck-v.txt", "BenchmarkWatchTeardownDetection", "detect_ms", 804, 1, "github.com/agentd/agent/agent/netcheck"},
		{"pf.txt", "BenchmarkIperf3", "full-path-Gbit/s", 6.949, 1, "github.com/agentd/agent/agent/portforward"},
		{"coord200.txt", "BenchmarkCoordinatorScale/agents=200", "reg-total-s", 0.5575, 1, "github.com/agentd/agent/coordinator"},
		{"coord200.txt", "BenchmarkWebSocketEchoScale/conns=202", "rss-KiB/conn", 49.29, 1, "github.com/agentd/agent/coordinator"},
		{"fail.txt", "BenchmarkSized/agents=100", "reg-total-s", 1.5, 1, "failbench"},
	}
	for _, tt := range tests {
		out := parseFile(t, tt.file)
		r, ok := out.Find(tt.bench)
		if !ok {
			t.Errorf("%s: no %s among %v", tt.file, tt.bench, names(out))
			continue
		}
		if got := r.Metrics[tt.metric]; got != tt.want || r.Iterations != tt.iterations || r.Package != tt.pkg {
			t.Errorf("%s %s: %s=%v N=%d pkg %q, want %v N=%d pkg %q", tt.file, tt.bench, tt.metric, got, r.Iterations, r.Package, tt.want, tt.iterations, tt.pkg)
		}
		if r.Skipped != "" || r.Failed != "" {
			t.Errorf("%s %s: skipped %q failed %q", tt.file, tt.bench, r.Skipped, r.Failed)
		}
	}
}

func names(o Output) []string {
	var n []string
	for _, r := range o.Results {
		n = append(n, r.Name)
	}
	return n
}

func TestParseSkipsAndFailures(t *testing.T) {
	out := parseFile(t, "netcheck-nonroot.txt")
	r, ok := out.Find("BenchmarkHealthyReport")
	if !ok || !strings.Contains(r.Skipped, "needs root to create network namespaces") || r.Metrics != nil {
		t.Errorf("netcheck as non-root: %+v", r)
	}
	out = parseFile(t, "sshd-nonroot.txt")
	if r, _ := out.Find("BenchmarkVsOpenSSH"); r.Skipped != "needs root to run OpenSSH's sshd as the reference" {
		t.Errorf("sshd as non-root: skipped %q", r.Skipped)
	}

	out = parseFile(t, "fail.txt")
	if r, _ := out.Find("BenchmarkBroken"); r.Failed != "server did not start: connection refused" || len(r.Log) != 2 {
		t.Errorf("failed benchmark: %+v", r)
	}
	if r, _ := out.Find("BenchmarkSized/agents=2000"); r.Skipped != "COORD_BENCH_AGENTS too large for this machine" {
		t.Errorf("skipped sub-benchmark: %+v", r)
	}
	if _, ok := out.Find("BenchmarkSized"); ok {
		t.Errorf("the parent of sub-benchmarks is listed as a result of its own: %v", names(out))
	}
}

func TestParseRejectsMalformedFigures(t *testing.T) {
	_, err := Parse(strings.NewReader("pkg: x\nBenchmarkA-2 \t 1\t 12 ns/op\t 1e+ MB/s\n"))
	if err == nil || !strings.Contains(err.Error(), "BenchmarkA") {
		t.Fatalf("malformed metric: err %v, want one naming the benchmark", err)
	}
}

func TestRows(t *testing.T) {
	sshd := parseFile(t, "sshd.txt")
	row := sshd.Compare("SSH stream",
		Pick{Bench: "BenchmarkVsOpenSSH/stream", Metric: "agentd-MB/s", Unit: "MB/s"},
		"OpenSSH sshd", Pick{Bench: "BenchmarkVsOpenSSH/stream", Metric: "openssh-MB/s", Unit: "MB/s"}, "64 MiB")
	if row.Status != StatusOK || row.Figure.Value != 57.30 || row.Reference.Value.Value != 25.63 || row.Ratio == nil || *row.Ratio < 2.23 || *row.Ratio > 2.24 {
		t.Errorf("SSH row: %+v", row)
	}

	pf := parseFile(t, "pf.txt")
	row = pf.Compare("iperf3 via tailnet",
		Pick{Bench: "BenchmarkTailnetForward", Line: regexp.MustCompile(`^iperf3 through .*: ([0-9.]+) Gbit/s`), Unit: "Gbit/s"},
		"raw tailnet TCP", Pick{Bench: "BenchmarkTailnetForward", Metric: "raw-tailnet-Gbit/s", Unit: "Gbit/s"}, "")
	if row.Status != StatusOK || row.Figure.Value != 0.96 || row.Reference.Value.Value != 0.5857 {
		t.Errorf("printed-line row: %+v", row)
	}

	nonroot := parseFile(t, "netcheck-nonroot.txt")
	row = nonroot.Compare("netcheck report", Pick{Bench: "BenchmarkHealthyReport", Metric: "report_ms", Unit: "ms"},
		"curl", Pick{Bench: "BenchmarkHealthyReport", Metric: "curl_ms", Unit: "ms"}, "")
	if row.Status != StatusSkipped || !strings.Contains(row.Note, "needs root") || row.Figure != nil {
		t.Errorf("skipped row: %+v", row)
	}

	fail := parseFile(t, "fail.txt")
	row = fail.Compare("broken", Pick{Bench: "BenchmarkBroken/sub", Metric: "x", Unit: "x"}, "ref", Pick{Bench: "BenchmarkBroken/sub", Metric: "y", Unit: "x"}, "")
	if row.Status != StatusFailed || !strings.Contains(row.Note, "connection refused") {
		t.Errorf("row under a failed parent: %+v", row)
	}
	// A reference that is missing leaves the figure standing.
	row = fail.Compare("sized", Pick{Bench: "BenchmarkSized/agents=100", Metric: "reg-total-s", Unit: "s"},
		"N=2000", Pick{Bench: "BenchmarkSized/agents=2000", Metric: "reg-total-s", Unit: "s"}, "")
	if row.Status != StatusOK || row.Reference.Value != nil || !strings.Contains(row.Reference.Note, "too large") || row.Ratio != nil {
		t.Errorf("row with a skipped reference: %+v", row)
	}
	row = sshd.Compare("missing", Pick{Bench: "BenchmarkNope", Metric: "x", Unit: "x"}, "r", Pick{Bench: "BenchmarkNope", Metric: "x", Unit: "x"}, "")
	if row.Status != StatusFailed || !strings.Contains(row.Note, "BenchmarkNope reported nothing") {
		t.Errorf("missing benchmark: %+v", row)
	}
}

func TestRender(t *testing.T) {
	forty := Value{Value: 40, Unit: "MB"}
	tab := Table{
		Title:  "Benchmarks 2026-11-22 abc1234",
		Header: []Fact{{"commit", "abc1234"}, {"load average", "1.41 1.73 4.32"}},
		Rows: []Row{
			Measured("agent RSS | idle", Value{Value: 21.456, Unit: "MB"}, Reference{Name: "target", Value: &forty}, ""),
			Skipped("netcheck report", "needs root"),
			Failed("coordinator", errors.New("child exited\nwith status 2")),
			Measured("ssh true", Value{Value: 312, Unit: "ms"}, Reference{Name: "OpenSSH", Note: "sshd not installed"}, "median of 5"),
		},
	}
	md := tab.Markdown()
	for _, want := range []string{
		"# Benchmarks 2026-11-22 abc1234\n",
		"- load average: 1.41 1.73 4.32\n",
		`| agent RSS \| idle | 21.5 MB | target: 40.0 MB | 0.536 |  |`,
		"| netcheck report | skipped |  |  | skipped: needs root |",
		"| coordinator | failed |  |  | failed: child exited with status 2 |",
		"| ssh true | 312 ms | OpenSSH: n/a (sshd not installed) |  | median of 5 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	for v, want := range map[float64]string{1133.4: "1133", 60.34: "60.3", 5: "5.00", 0.9: "0.900", 0.0531: "0.0531", 0: "0"} {
		if got := formatNumber(v); got != want {
			t.Errorf("formatNumber(%v) = %q, want %q", v, got, want)
		}
	}
	data, err := tab.JSON()
	if err != nil {
		t.Fatal(err)
	}
	var back Table
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Rows) != 4 || back.Rows[0].Ratio == nil || back.Rows[1].Status != StatusSkipped || back.Rows[0].Reference.Value.Value != 40 {
		t.Errorf("JSON round trip: %s", data)
	}
}

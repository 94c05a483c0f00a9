package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"time"

	"github.com/agentd/agent/internal/benchtable"
)

// goBench is one `go test -bench` invocation and the rows made from it.
type goBench struct {
	name      string
	pkg       string
	bench     string
	benchtime string
	// env are the variables this run sets (after the caller's own, so a
	// caller's value of the same name is overridden only where the run must
	// set it, e.g. TS_DEBUG_MTU).
	env     []string
	timeout time.Duration
	rows    func(benchtable.Output) []benchtable.Row
	// rowNames name the rows, for when the run itself fails.
	rowNames []string
}

// sizes are the knobs of the benchmarks, with defaults that keep the whole
// run within about ten minutes on a two-core machine.
type sizes struct {
	tailnetMiB     int
	sshdBytes      int64
	sshdLargeBytes int64
	iperfSecs      int
	forwardMiB     int
	coordAgents    int
}

func sizesFromEnv(getenv func(string) string) (sizes, error) {
	s := sizes{tailnetMiB: 256, sshdBytes: 256 << 20, sshdLargeBytes: 1 << 30, iperfSecs: 3, forwardMiB: 256, coordAgents: 10000}
	for _, knob := range []struct {
		name string
		dst  any
	}{
		{"TAILNET_BENCH_MIB", &s.tailnetMiB},
		{"SSHD_BENCH_BYTES", &s.sshdBytes},
		{"SSHD_BENCH_LARGE_BYTES", &s.sshdLargeBytes},
		{"AGENT_BENCH_SECONDS", &s.iperfSecs},
		{"AGENT_BENCH_MB", &s.forwardMiB},
		{"COORD_BENCH_AGENTS", &s.coordAgents},
	} {
		v := getenv(knob.name)
		if v == "" {
			continue
		}
		if _, err := fmt.Sscan(v, knob.dst); err != nil {
			return s, fmt.Errorf("%s=%q: want a positive whole number", knob.name, v)
		}
	}
	if s.coordAgents < 100 || s.coordAgents%100 != 0 {
		return s, fmt.Errorf("COORD_BENCH_AGENTS=%d: want a multiple of 100", s.coordAgents)
	}
	return s, nil
}

func (s sizes) env() []string {
	return []string{
		fmt.Sprintf("TAILNET_BENCH_MIB=%d", s.tailnetMiB),
		fmt.Sprintf("SSHD_BENCH_BYTES=%d", s.sshdBytes),
		fmt.Sprintf("SSHD_BENCH_LARGE_BYTES=%d", s.sshdLargeBytes),
		fmt.Sprintf("AGENT_BENCH_SECONDS=%d", s.iperfSecs),
		fmt.Sprintf("AGENT_BENCH_MB=%d", s.forwardMiB),
		fmt.Sprintf("COORD_BENCH_AGENTS=%d", s.coordAgents),
	}
}

func pick(bench, metric, unit string) benchtable.Pick {
	return benchtable.Pick{Bench: bench, Metric: metric, Unit: unit}
}

func goBenches(s sizes) []goBench {
	tailnetRows := func(o benchtable.Output) []benchtable.Row {
		mib := fmt.Sprintf("%d MiB", s.tailnetMiB)
		return []benchtable.Row{
			o.Compare("tailnet TCP, direct path", pick("BenchmarkTransferDirect", "tailnet-MB/s", "MB/s"),
				"loopback TCP", pick("BenchmarkTransferDirect", "loopback-MB/s", "MB/s"), mib),
			o.Compare("tailnet TCP, via DERP (DERP-only MTU 9000)", pick("BenchmarkTransferDERP", "tailnet-MB/s", "MB/s"),
				"loopback TCP", pick("BenchmarkTransferDERP", "loopback-MB/s", "MB/s"), mib),
			o.Compare("tailnet time to first pong", pick("BenchmarkFirstPong", "ms-to-first-pong", "ms"),
				"first direct pong", pick("BenchmarkFirstPong", "ms-to-direct-pong", "ms"), "from both conns created"),
		}
	}
	return []goBench{
		{
			name: "tailnet", pkg: "./tailnet/", bench: "^(BenchmarkTransferDirect|BenchmarkTransferDERP|BenchmarkFirstPong)$", benchtime: "1x",
			timeout: 4 * time.Minute, rows: tailnetRows,
			rowNames: []string{"tailnet TCP, direct path", "tailnet TCP, via DERP (DERP-only MTU 9000)", "tailnet time to first pong"},
		},
		{
			name: "tailnet DERP at MTU 1280", pkg: "./tailnet/", bench: "^BenchmarkTransferDERP$", benchtime: "1x",
			env: []string{"TS_DEBUG_MTU=1280"}, timeout: 4 * time.Minute,
			rows: func(o benchtable.Output) []benchtable.Row {
				return []benchtable.Row{o.Compare("tailnet TCP, via DERP at MTU 1280 (production)", pick("BenchmarkTransferDERP", "tailnet-MB/s", "MB/s"),
					"loopback TCP", pick("BenchmarkTransferDERP", "loopback-MB/s", "MB/s"), fmt.Sprintf("%d MiB", s.tailnetMiB))}
			},
			rowNames: []string{"tailnet TCP, via DERP at MTU 1280 (production)"},
		},
		{
			name: "SSH server", pkg: "./agent/sshd/", bench: "^BenchmarkVsOpenSSH$", benchtime: "2x", timeout: 10 * time.Minute,
			rows: func(o benchtable.Output) []benchtable.Row {
				size := fmt.Sprintf("%d MiB, best of 2", s.sshdBytes>>20)
				large := fmt.Sprintf("%d MiB, best of 2", s.sshdLargeBytes>>20)
				return []benchtable.Row{
					o.Compare("SSH stream (ssh host 'head -c N /dev/zero')", pick("BenchmarkVsOpenSSH/stream", "agentd-MB/s", "MB/s"),
						"OpenSSH sshd", pick("BenchmarkVsOpenSSH/stream", "openssh-MB/s", "MB/s"), size),
					o.Compare("scp upload (SFTP mode)", pick("BenchmarkVsOpenSSH/scp", "agentd-MB/s", "MB/s"),
						"OpenSSH sshd", pick("BenchmarkVsOpenSSH/scp", "openssh-MB/s", "MB/s"), size),
					o.Compare("SSH stream, large (ssh host 'head -c N /dev/zero')", pick("BenchmarkVsOpenSSH/stream-large", "agentd-MB/s", "MB/s"),
						"OpenSSH sshd", pick("BenchmarkVsOpenSSH/stream-large", "openssh-MB/s", "MB/s"), large),
					o.Compare("scp upload, large (SFTP mode)", pick("BenchmarkVsOpenSSH/scp-large", "agentd-MB/s", "MB/s"),
						"OpenSSH sshd", pick("BenchmarkVsOpenSSH/scp-large", "openssh-MB/s", "MB/s"), large),
					o.Compare("ssh host true (connection setup)", pick("BenchmarkVsOpenSSH/setup", "agentd-ms", "ms"),
						"OpenSSH sshd", pick("BenchmarkVsOpenSSH/setup", "openssh-ms", "ms"), "loopback TCP, no tailnet; mean of 5, best of 2"),
				}
			},
			rowNames: []string{"SSH stream (ssh host 'head -c N /dev/zero')", "scp upload (SFTP mode)",
				"SSH stream, large (ssh host 'head -c N /dev/zero')", "scp upload, large (SFTP mode)", "ssh host true (connection setup)"},
		},
		{
			name: "port forwarding", pkg: "./agent/portforward/", bench: "^(BenchmarkIperf3|BenchmarkTailnetForward)$", benchtime: "1x", timeout: 5 * time.Minute,
			rows: func(o benchtable.Output) []benchtable.Row {
				secs := fmt.Sprintf("%d s per run", s.iperfSecs)
				iperfLine := regexp.MustCompile(`^iperf3 through laptop listener \+ tailnet \+ agent forwarder: ([0-9.]+) Gbit/s`)
				return []benchtable.Row{
					o.Compare("iperf3 through the agent forwarder (loopback)", pick("BenchmarkIperf3", "agent-Gbit/s", "Gbit/s"),
						"plain loopback iperf3", pick("BenchmarkIperf3", "plain-Gbit/s", "Gbit/s"), secs),
					o.Compare("iperf3 through laptop listener + agent forwarder (loopback, no tailnet)", pick("BenchmarkIperf3", "full-path-Gbit/s", "Gbit/s"),
						"plain loopback iperf3", pick("BenchmarkIperf3", "plain-Gbit/s", "Gbit/s"), secs),
					o.Compare("tailnet TCP forwarded by the agent to 127.0.0.1", pick("BenchmarkTailnetForward", "forwarded-Gbit/s", "Gbit/s"),
						"raw tailnet TCP", pick("BenchmarkTailnetForward", "raw-tailnet-Gbit/s", "Gbit/s"), fmt.Sprintf("%d MiB, best of 2", s.forwardMiB)),
					o.Compare("iperf3 through laptop listener + tailnet + agent forwarder", benchtable.Pick{Bench: "BenchmarkTailnetForward", Line: iperfLine, Unit: "Gbit/s"},
						"raw tailnet TCP", pick("BenchmarkTailnetForward", "raw-tailnet-Gbit/s", "Gbit/s"), ""),
				}
			},
			rowNames: []string{"iperf3 through the agent forwarder (loopback)", "iperf3 through laptop listener + agent forwarder (loopback, no tailnet)",
				"tailnet TCP forwarded by the agent to 127.0.0.1", "iperf3 through laptop listener + tailnet + agent forwarder"},
		},
		coordScaleBench(s),
		{
			name: "netcheck", pkg: "./agent/netcheck/", bench: "^(BenchmarkHealthyReport|BenchmarkWatchTeardownDetection)$", benchtime: "3x", timeout: 3 * time.Minute,
			rows: func(o benchtable.Output) []benchtable.Row {
				return []benchtable.Row{
					o.Compare("netcheck report, healthy pod (netcheck's own time)", pick("BenchmarkHealthyReport", "report_ms", "ms"),
						"one HTTPS fetch by curl", pick("BenchmarkHealthyReport", "curl_ms", "ms"), "mean of 3"),
					o.Compare("netcheck report, healthy pod (with process start)", pick("BenchmarkHealthyReport", "process_ms", "ms"),
						"one HTTPS fetch by curl", pick("BenchmarkHealthyReport", "curl_ms", "ms"), "mean of 3"),
					o.Compare("netcheck --watch: bridge torn down to broken report", pick("BenchmarkWatchTeardownDetection", "detect_ms", "ms"),
						"probe interval", pick("BenchmarkWatchTeardownDetection", "interval_ms", "ms"), "mean of 3"),
				}
			},
			rowNames: []string{"netcheck report, healthy pod", "netcheck --watch teardown detection"},
		},
	}
}

// run runs the benchmark, appends its output to log, and returns its rows;
// a run that breaks fails only its own rows.
func (g goBench) run(ctx context.Context, log io.Writer, baseEnv []string) []benchtable.Row {
	ctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	args := []string{"test", "-v", "-run", "^$", "-bench", g.bench, "-benchtime", g.benchtime,
		"-timeout", g.timeout.String(), g.pkg}
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Env = append(append(os.Environ(), baseEnv...), g.env...)
	cmd.Stdout = io.MultiWriter(&out, log)
	cmd.Stderr = cmd.Stdout
	cmd.WaitDelay = 10 * time.Second
	fmt.Fprintf(log, "\n$ %s go %s\n", strings.Join(g.env, " "), strings.Join(args, " "))
	runErr := cmd.Run()
	parsed, err := benchtable.Parse(bytes.NewReader(out.Bytes()))
	if err != nil {
		return failRows(g.rowNames, err)
	}
	rows := g.rows(parsed)
	if runErr != nil {
		// Rows that have figures stand; the rest say how the run ended.
		why := fmt.Errorf("go test %s: %w: %s", g.pkg, runErr, lastLines(out.String(), 3))
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			why = fmt.Errorf("go test %s: no result within %s", g.pkg, g.timeout)
		}
		for i, r := range rows {
			if r.Status == benchtable.StatusFailed {
				rows[i] = benchtable.Failed(r.Name, why)
			}
		}
	}
	return rows
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}

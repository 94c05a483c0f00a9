package netcheck

import (
	"context"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/agentd/agent/agent/netcheck/internal/nclab"
)

// BenchmarkHealthyReport times a full workspace report in a healthy lab
// (run as an unprivileged process in the pod, as the CLI would be), next to
// the reference of one HTTPS fetch of the coordinator by curl from the same
// pod. Figures: report_ms (netcheck's own duration), process_ms (including
// process start), curl_ms.
func BenchmarkHealthyReport(b *testing.B) {
	pl := newPodLab(b)
	var reportMS, processMS, curlMS float64
	for b.Loop() {
		start := time.Now()
		r := runIn(b, pl.Pod, pl.workspaceOpts(), true)
		processMS += float64(time.Since(start).Microseconds()) / 1000
		if r.Status != StatusOK {
			b.Fatalf("healthy lab: %s", describe(r))
		}
		reportMS += float64(r.DurationMS)
		start = time.Now()
		if _, err := pl.Pod.Run(context.Background(), "curl", "-sk", "--resolve", nclab.CoordName+":443:"+nclab.CoordIP, pl.CoordURL); err != nil {
			b.Fatalf("reference curl: %v", err)
		}
		curlMS += float64(time.Since(start).Microseconds()) / 1000
	}
	n := float64(b.N)
	b.ReportMetric(reportMS/n, "report_ms")
	b.ReportMetric(processMS/n, "process_ms")
	b.ReportMetric(curlMS/n, "curl_ms")
}

// BenchmarkWatchTeardownDetection measures how long --watch (probe every
// 500 ms) takes to report a broken network after the pod's bridge is
// deleted on the node; the reference is the probe interval itself.
func BenchmarkWatchTeardownDetection(b *testing.B) {
	var total time.Duration
	for b.Loop() {
		b.StopTimer()
		pl := newPodLab(b)
		o := pl.workspaceOpts()
		data, _ := json.Marshal(o)
		cmd := pl.Pod.Command(nclab.HelperBinary(b), "-test.run=^TestWatchHelper$")
		cmd.Env = append(os.Environ(), "NETCHECK_WATCH_OPTS="+string(data))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		dec := json.NewDecoder(stdout)
		var r Report
		if err := dec.Decode(&r); err != nil || r.Status != StatusOK {
			b.Fatalf("first report: %v %s", err, r.Summary)
		}
		time.Sleep(200 * time.Millisecond)
		b.StartTimer()
		torn := time.Now()
		pl.Node.IP("link", "del", "cni0")
		for r.Status != StatusBroken {
			if err := dec.Decode(&r); err != nil {
				b.Fatal(err)
			}
		}
		total += time.Since(torn)
		b.StopTimer()
		cmd.Process.Kill()
		cmd.Wait()
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "detect_ms")
	b.ReportMetric(500, "interval_ms")
}

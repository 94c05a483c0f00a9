package netcheck

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// The watch loop's baseline for quick probes comes from the full report's
// quick checks only: DNS trouble the quick probe cannot see must not make
// a later gateway failure look like no change, and a full report's
// gateway failure must.
func TestQuickStatusFromFullReport(t *testing.T) {
	quick := &Report{Checks: []Check{{ID: "link", Status: StatusOK}, {ID: "gateway", Status: StatusOK}}}
	ids := checkIDs(quick)
	full := &Report{
		Checks: []Check{
			{ID: "link", Status: StatusOK}, {ID: "gateway", Status: StatusOK},
			{ID: "dns", Status: StatusDegraded}, {ID: "https", Status: StatusBroken},
		},
		Findings: []Finding{{Code: "dns.unreachable", Check: "dns", Severity: StatusDegraded}},
	}
	if got := quickStatus(full, ids); got != StatusOK {
		t.Errorf("quick view of a report broken only beyond the gateway = %s, want ok", got)
	}
	full.Findings = append(full.Findings, Finding{Code: "gateway.no_answer", Check: "gateway", Severity: StatusDegraded})
	if got := quickStatus(full, ids); got != StatusDegraded {
		t.Errorf("quick view with a gateway finding = %s, want degraded", got)
	}
	full.Checks[1].Status = StatusBroken
	if got := quickStatus(full, ids); got != StatusBroken {
		t.Errorf("quick view with the gateway check broken = %s, want broken", got)
	}
}

// --watch --json prints a document only when what the report says changes:
// the same verdict again (a later run, other timings) is no change; a new
// code or another severity is.
func TestChangeKey(t *testing.T) {
	base := func() *Report {
		return &Report{Status: StatusDegraded, Summary: "s", DurationMS: 10, Findings: []Finding{{Code: "dns.partial", Severity: StatusDegraded}}}
	}
	a, b := base(), base()
	b.DurationMS, b.Started = 900, b.Started.Add(time.Minute)
	if a.ChangeKey() != b.ChangeKey() {
		t.Error("the same verdict from a later run counts as a change")
	}
	b.Findings = append(b.Findings, Finding{Code: "udp.blocked", Severity: StatusDegraded})
	if a.ChangeKey() == b.ChangeKey() {
		t.Error("a new finding does not count as a change")
	}
	c := base()
	c.Findings[0].Severity = StatusBroken
	if a.ChangeKey() == c.ChangeKey() {
		t.Error("a finding's new severity does not count as a change")
	}
}

// The exporter's time since healthy grows while nothing healthy arrives,
// is 0 while healthy, and counts from the exporter's start before the
// first healthy report.
func TestExporterSinceHealthy(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	e := NewExporter(func() time.Time { return now })
	value := func(name string) float64 {
		t.Helper()
		ch := make(chan prometheus.Metric, 64)
		e.Collect(ch)
		close(ch)
		for m := range ch {
			if strings.Contains(m.Desc().String(), `"`+name+`"`) {
				var pb dto.Metric
				if err := m.Write(&pb); err != nil {
					t.Fatal(err)
				}
				if pb.Gauge != nil {
					return pb.Gauge.GetValue()
				}
				return pb.Counter.GetValue()
			}
		}
		t.Fatalf("no %s", name)
		return 0
	}
	e.Observe(&Report{Mode: "workspace", Scope: "full", Status: StatusBroken, Started: now})
	now = now.Add(30 * time.Second)
	if v := value("agent_netcheck_seconds_since_healthy"); v != 30 {
		t.Errorf("never healthy: %v s, want 30 (since start)", v)
	}
	e.Observe(&Report{Mode: "workspace", Scope: "full", Status: StatusOK, Started: now})
	if v := value("agent_netcheck_seconds_since_healthy"); v != 0 {
		t.Errorf("healthy: %v, want 0", v)
	}
	healthyAt := now
	now = now.Add(5 * time.Second)
	e.Observe(&Report{Mode: "workspace", Scope: "quick", Status: StatusBroken, Started: now})
	now = now.Add(10 * time.Second)
	if v := value("agent_netcheck_seconds_since_healthy"); v != 15 {
		t.Errorf("broken 15 s after the last healthy report: %v", v)
	}
	if v := value("agent_netcheck_last_healthy_timestamp_seconds"); v != float64(healthyAt.Unix()) {
		t.Errorf("last healthy %v, want %d", v, healthyAt.Unix())
	}
	if v := value("agent_netcheck_verdict"); v != 2 {
		t.Errorf("verdict %v, want 2", v)
	}
}

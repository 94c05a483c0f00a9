package netcheck

import "testing"

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

package netcheck

import (
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Exporter turns the reports of a watch loop into Prometheus metrics, for
// the netcheck DaemonSets (docs/netcheck.md lists the series and an alert
// rule). Values are computed at scrape time, so the time since the last
// healthy report keeps growing while nothing healthy arrives. Register it
// on a metrics.Registry and call Observe with every report.
type Exporter struct {
	now     func() time.Time
	started time.Time

	mu    sync.Mutex
	modes map[string]*exported
}

type exported struct {
	status      Status
	checks      map[string]Status
	findings    map[[2]string]bool // code, severity
	lastRun     time.Time
	lastHealthy time.Time
	runs        map[string]uint64 // by scope
}

// NewExporter returns an exporter; now may be nil (time.Now).
func NewExporter(now func() time.Time) *Exporter {
	if now == nil {
		now = time.Now
	}
	return &Exporter{now: now, started: now(), modes: map[string]*exported{}}
}

var (
	descVerdict = prometheus.NewDesc("agent_netcheck_verdict",
		"The latest verdict: 0 ok, 1 degraded, 2 broken.", []string{"mode"}, nil)
	descCheck = prometheus.NewDesc("agent_netcheck_check_status",
		"Each check's latest status: 0 ok, 1 degraded, 2 broken, -1 skipped (could not run here).", []string{"mode", "check"}, nil)
	descFinding = prometheus.NewDesc("agent_netcheck_finding",
		"1 for each finding of the latest full report (codes in docs/netcheck.md).", []string{"mode", "code", "severity"}, nil)
	descLastRun = prometheus.NewDesc("agent_netcheck_last_run_timestamp_seconds",
		"When the latest report was made (Unix time).", []string{"mode"}, nil)
	descLastHealthy = prometheus.NewDesc("agent_netcheck_last_healthy_timestamp_seconds",
		"When the latest healthy report was made (Unix time); absent until there is one.", []string{"mode"}, nil)
	descSinceHealthy = prometheus.NewDesc("agent_netcheck_seconds_since_healthy",
		"Seconds since the latest healthy report, or since the exporter started if there was none; 0 while healthy.", []string{"mode"}, nil)
	descRuns = prometheus.NewDesc("agent_netcheck_runs_total",
		"Reports made, by scope (full, or quick: the watch loop's fast probe).", []string{"mode", "scope"}, nil)
)

// Observe records a report.
func (e *Exporter) Observe(r *Report) {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.modes[r.Mode]
	if m == nil {
		m = &exported{checks: map[string]Status{}, runs: map[string]uint64{}}
		e.modes[r.Mode] = m
	}
	at := r.Started
	if at.IsZero() {
		at = e.now()
	}
	m.status, m.lastRun = r.Status, at
	m.runs[r.Scope]++
	if r.Status == StatusOK {
		m.lastHealthy = at
	}
	for _, c := range r.Checks {
		m.checks[c.ID] = c.Status
	}
	// A quick report leaves out checks; its findings are a subset, so the
	// full reports own the finding series.
	if r.Scope != "quick" {
		m.findings = map[[2]string]bool{}
	}
	for _, f := range r.Findings {
		if m.findings == nil {
			m.findings = map[[2]string]bool{}
		}
		m.findings[[2]string{f.Code, string(f.Severity)}] = true
	}
}

// Describe implements prometheus.Collector.
func (e *Exporter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descVerdict, descCheck, descFinding, descLastRun, descLastHealthy, descSinceHealthy, descRuns} {
		ch <- d
	}
}

func statusValue(s Status) float64 {
	switch s {
	case StatusOK:
		return 0
	case StatusDegraded:
		return 1
	case StatusBroken:
		return 2
	}
	return -1
}

// Collect implements prometheus.Collector.
func (e *Exporter) Collect(ch chan<- prometheus.Metric) {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.now()
	for mode, m := range e.modes {
		ch <- prometheus.MustNewConstMetric(descVerdict, prometheus.GaugeValue, statusValue(m.status), mode)
		ids := make([]string, 0, len(m.checks))
		for id := range m.checks {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		for _, id := range ids {
			ch <- prometheus.MustNewConstMetric(descCheck, prometheus.GaugeValue, statusValue(m.checks[id]), mode, id)
		}
		for k := range m.findings {
			ch <- prometheus.MustNewConstMetric(descFinding, prometheus.GaugeValue, 1, mode, k[0], k[1])
		}
		ch <- prometheus.MustNewConstMetric(descLastRun, prometheus.GaugeValue, float64(m.lastRun.UnixMilli())/1000, mode)
		since := now.Sub(e.started)
		if !m.lastHealthy.IsZero() {
			ch <- prometheus.MustNewConstMetric(descLastHealthy, prometheus.GaugeValue, float64(m.lastHealthy.UnixMilli())/1000, mode)
			since = now.Sub(m.lastHealthy)
		}
		if m.status == StatusOK {
			since = 0
		}
		ch <- prometheus.MustNewConstMetric(descSinceHealthy, prometheus.GaugeValue, max(since.Seconds(), 0), mode)
		for scope, n := range m.runs {
			ch <- prometheus.MustNewConstMetric(descRuns, prometheus.CounterValue, float64(n), mode, scope)
		}
	}
}

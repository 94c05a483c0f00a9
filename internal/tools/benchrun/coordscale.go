package main

import (
	"fmt"
	"time"

	"github.com/agentd/agent/internal/benchtable"
)

// coordScaleStores are the deployments of the scale benchmark, as its
// sub-benchmarks name them, with what the table calls them.
var coordScaleStores = []struct{ key, label string }{
	{"bbolt", "1 coordinator, bbolt"},
	{"postgres", "1 replica, PostgreSQL"},
	{"postgres-3", "3 replicas, one PostgreSQL"},
}

// coordScaleBench is the coordinator step: BenchmarkCoordinatorScale on
// each deployment at N/5 and N agents, BenchmarkCoordinatorRestart at N/5
// and N,
// and the bare WebSocket echo server as the memory reference.
func coordScaleBench(s sizes) goBench {
	n := s.coordAgents
	small := n / 5 / 100 * 100
	rowNames := []string{fmt.Sprintf("coordinator scale, %d agents", n), fmt.Sprintf("coordinator restart, %d agents", n)}
	if small > 0 {
		rowNames = append(rowNames, fmt.Sprintf("coordinator restart, %d agents", small))
	}
	return goBench{
		name: "coordinator scale", pkg: "./coordinator/", bench: "^(BenchmarkCoordinatorScale|BenchmarkCoordinatorRestart|BenchmarkWebSocketEchoScale)$",
		benchtime: "1x", timeout: 40 * time.Minute, rowNames: rowNames,
		rows: func(o benchtable.Output) []benchtable.Row {
			return coordScaleRows(o, n, small)
		},
	}
}

func coordScaleRows(o benchtable.Output, n, small int) []benchtable.Row {
	at := func(store string, agents int) string {
		return fmt.Sprintf("BenchmarkCoordinatorScale/store=%s/agents=%d", store, agents)
	}
	metrics := []struct{ name, metric, unit string }{
		{"registration per agent, all at once (total ÷ N)", "reg-per-agent-ms", "ms"},
		{"coordinator CPU per registration (all replicas)", "coord-cpu-ms/agent", "ms"},
		{"PostgreSQL CPU per registration", "db-cpu-ms/agent", "ms"},
		{"agent node update to its client, p50", "agent-update-p50-ms", "ms"},
		{"agent node update to its client, p99", "agent-update-p99-ms", "ms"},
		{"client node fan-out to its 100 agents, p99", "client-fanout-p99-ms", "ms"},
		{"Go heap per connection", "heap-KiB/conn", "KiB"},
		{"RSS per connection", "rss-KiB/conn", "KiB"},
	}
	var rows []benchtable.Row
	for _, m := range metrics {
		for _, st := range coordScaleStores {
			name := fmt.Sprintf("coordinator, %s, %d agents: %s", st.label, n, m.name)
			fig := pick(at(st.key, n), m.metric, m.unit)
			if st.key == "bbolt" && m.metric == "db-cpu-ms/agent" {
				continue // no database
			}
			// Growth: the same deployment at N/5 (a ratio near 1 for a
			// per-agent or per-connection figure is linear cost).
			if small > 0 {
				rows = append(rows, o.Compare(name, fig, fmt.Sprintf("same, %d agents", small), pick(at(st.key, small), m.metric, m.unit), "growth"))
			}
			switch {
			case m.metric == "db-cpu-ms/agent" && st.key == "postgres-3":
				rows = append(rows, o.Compare(name, fig, fmt.Sprintf("1 replica, %d agents", n), pick(at("postgres", n), m.metric, m.unit), "vs 1 replica"))
			case st.key != "bbolt" && m.metric != "db-cpu-ms/agent":
				rows = append(rows, o.Compare(name, fig, fmt.Sprintf("bbolt coordinator, %d agents", n), pick(at("bbolt", n), m.metric, m.unit), "vs bbolt"))
			}
		}
	}
	echo := fmt.Sprintf("BenchmarkWebSocketEchoScale/conns=%d", n+n/100)
	rows = append(rows,
		o.Compare(fmt.Sprintf("coordinator, bbolt, %d agents: Go heap per connection", n), pick(at("bbolt", n), "heap-KiB/conn", "KiB"),
			"bare TLS WebSocket echo server", pick(echo, "heap-KiB/conn", "KiB"), fmt.Sprintf("%d connections", n+n/100)),
		o.Compare(fmt.Sprintf("coordinator, bbolt, %d agents: RSS per connection", n), pick(at("bbolt", n), "rss-KiB/conn", "KiB"),
			"bare TLS WebSocket echo server", pick(echo, "rss-KiB/conn", "KiB"), fmt.Sprintf("%d connections", n+n/100)))

	for _, agents := range []int{small, n} {
		if agents > 0 {
			rows = append(rows, coordRestartRows(o, agents)...)
		}
	}
	return rows
}

// coordRestartRows are BenchmarkCoordinatorRestart's figures at one size:
// the return beside issue 15's 2 s and beside the same agents' first
// registration in the same run, and what the coordinator spent per agent.
func coordRestartRows(o benchtable.Output, n int) []benchtable.Row {
	restart := fmt.Sprintf("BenchmarkCoordinatorRestart/agents=%d", n)
	target := benchtable.Value{Value: 2000, Unit: "ms"}
	var rows []benchtable.Row
	for _, r := range []struct{ name, metric, cold, note string }{
		{"back after the coordinator's return, p50", "return-p50-ms", "cold-p50-ms", "5 s outage, graceful shutdown"},
		{"back after the coordinator's return, p99", "return-p99-ms", "cold-p99-ms", ""},
		{"back after the coordinator's return, max", "return-max-ms", "cold-max-ms", ""},
	} {
		name := fmt.Sprintf("coordinator restart, %d agents: %s", n, r.name)
		v, status, err := o.Value(pick(restart, r.metric, "ms"))
		if err != nil {
			rows = append(rows, benchtable.Row{Name: name, Status: status, Note: err.Error()})
			continue
		}
		rows = append(rows,
			benchtable.Measured(name, v, benchtable.Reference{Name: "target (issue 15)", Value: &target}, r.note),
			o.Compare(name, pick(restart, r.metric, "ms"), "the same agents' first registration, all at once", pick(restart, r.cold, "ms"), "same run"))
	}
	for _, r := range []struct{ name, metric, note string }{
		{"agent's first try after the return, p99 (the jitter alone)", "try-p99-ms", "from the backoff, before the coordinator serves it"},
		{"agent's first try after the return, max", "try-max-ms", ""},
	} {
		name := fmt.Sprintf("coordinator restart, %d agents: %s", n, r.name)
		v, status, err := o.Value(pick(restart, r.metric, "ms"))
		if err != nil {
			rows = append(rows, benchtable.Row{Name: name, Status: status, Note: err.Error()})
			continue
		}
		rows = append(rows, benchtable.Measured(name, v, benchtable.Reference{Name: "target (issue 15)", Value: &target}, r.note))
	}
	rows = append(rows, o.Compare(fmt.Sprintf("coordinator restart, %d agents: coordinator CPU per returning agent", n), pick(restart, "coord-cpu-us/agent", "µs"),
		"per agent at its first registration", pick(restart, "cold-coord-cpu-us/agent", "µs"), "user+system of the coordinator process alone, its start included"))
	busiest, status, err := o.Value(pick(restart, "busiest-100ms-pct", "%"))
	name := fmt.Sprintf("coordinator restart, %d agents: arrivals in the busiest 100 ms", n)
	if err != nil {
		rows = append(rows, benchtable.Row{Name: name, Status: status, Note: err.Error()})
	} else {
		all := benchtable.Value{Value: 100, Unit: "%"}
		rows = append(rows, benchtable.Measured(name, busiest, benchtable.Reference{Name: "all at once", Value: &all}, "histogram in the log"))
	}
	return rows
}

package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/agentd/agent/internal/benchtable"
)

// TestCoordScaleRows: every deployment's figure at N is set beside the
// same deployment at N/5 and (PostgreSQL) beside bbolt at N, and the
// restart rows at both sizes beside the 2 s target and the same agents'
// first registration.
func TestCoordScaleRows(t *testing.T) {
	var out strings.Builder
	for i, st := range []string{"bbolt", "postgres", "postgres-3"} {
		for j, n := range []int{400, 2000} {
			f := float64(1 + i + j*10)
			fmt.Fprintf(&out, "BenchmarkCoordinatorScale/store=%s/agents=%d-2\t1\t1 ns/op\t%g agent-update-p50-ms\t%g agent-update-p99-ms\t%g client-fanout-p99-ms\t%g coord-cpu-ms/agent\t%g db-cpu-ms/agent\t%g heap-KiB/conn\t%g reg-per-agent-ms\t%g rss-KiB/conn\n",
				st, n, f, f, f, f, f, f, f, f)
		}
	}
	out.WriteString("BenchmarkWebSocketEchoScale/conns=2020-2\t1\t1 ns/op\t30 heap-KiB/conn\t40 rss-KiB/conn\n")
	for _, n := range []int{400, 2000} {
		fmt.Fprintf(&out, "BenchmarkCoordinatorRestart/agents=%d-2\t1\t1 ns/op\t12 busiest-100ms-pct\t5 outage-s\t1500 return-max-ms\t700 return-p50-ms\t1400 return-p99-ms\t1190 try-max-ms\t900 try-p50-ms\t1150 try-p99-ms\t%d coord-cpu-us/agent\t800 cold-p50-ms\t1600 cold-p99-ms\t1700 cold-max-ms\t900 cold-coord-cpu-us/agent\n", n, n/4)
	}
	o, err := benchtable.Parse(strings.NewReader(out.String()))
	if err != nil {
		t.Fatal(err)
	}
	rows := coordScaleRows(o, 2000, 400)
	find := func(name, ref string) benchtable.Row {
		t.Helper()
		for _, r := range rows {
			if r.Name == name && r.Reference != nil && r.Reference.Name == ref {
				return r
			}
		}
		t.Fatalf("no row %q against %q", name, ref)
		return benchtable.Row{}
	}
	r := find("coordinator, 3 replicas, one PostgreSQL, 2000 agents: registration per agent, all at once (total ÷ N)", "same, 400 agents")
	if r.Figure.Value != 13 || r.Reference.Value.Value != 3 {
		t.Errorf("growth row %+v %+v", r.Figure, r.Reference.Value)
	}
	r = find("coordinator, 3 replicas, one PostgreSQL, 2000 agents: RSS per connection", "bbolt coordinator, 2000 agents")
	if r.Figure.Value != 13 || r.Reference.Value.Value != 11 {
		t.Errorf("vs bbolt row %+v %+v", r.Figure, r.Reference.Value)
	}
	r = find("coordinator, 3 replicas, one PostgreSQL, 2000 agents: PostgreSQL CPU per registration", "1 replica, 2000 agents")
	if r.Figure.Value != 13 || r.Reference.Value.Value != 12 {
		t.Errorf("database CPU row %+v %+v", r.Figure, r.Reference.Value)
	}
	for _, r := range rows {
		if strings.HasPrefix(r.Name, "coordinator, 1 coordinator, bbolt") && strings.Contains(r.Name, "PostgreSQL CPU") {
			t.Errorf("a database CPU row for bbolt: %q", r.Name)
		}
	}
	for _, n := range []string{"400", "2000"} {
		r = find("coordinator restart, "+n+" agents: back after the coordinator's return, p99", "target (issue 15)")
		if r.Figure.Value != 1400 || r.Reference.Value.Value != 2000 || r.Status != benchtable.StatusOK {
			t.Errorf("restart row %+v", r)
		}
		r = find("coordinator restart, "+n+" agents: back after the coordinator's return, p99", "the same agents' first registration, all at once")
		if r.Figure.Value != 1400 || r.Reference.Value.Value != 1600 {
			t.Errorf("restart row against the cold registration %+v", r)
		}
	}
	r = find("coordinator restart, 2000 agents: coordinator CPU per returning agent", "per agent at its first registration")
	if r.Figure.Value != 500 || r.Reference.Value.Value != 900 {
		t.Errorf("restart CPU row %+v %+v", r.Figure, r.Reference.Value)
	}
	for _, r := range rows {
		if r.Status != benchtable.StatusOK {
			t.Errorf("row %q: %s %s", r.Name, r.Status, r.Note)
		}
	}
}

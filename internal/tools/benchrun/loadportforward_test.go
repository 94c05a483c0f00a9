package main

import (
	"testing"

	"github.com/agentd/agent/internal/benchtable"
)

func TestLoadPFRows(t *testing.T) {
	lat := func(ms ...float64) []float64 { return ms }
	res := loadPFResult{
		Bursts: []loadPFBurst{
			{Burst: 100, Requests: 200, Forwarded: loadPFPath{LatencyMS: lat(10, 20, 30, 40)}, Direct: loadPFPath{LatencyMS: lat(5, 10, 15, 20)}},
			{Burst: 200, Requests: 200, Forwarded: loadPFPath{Failures: 1, FirstErr: "after 15000 ms: reset", LatencyMS: lat(40)}, Direct: loadPFPath{LatencyMS: lat(20)}},
		},
		FreedMS: 1500,
	}
	rows := loadPFRows(res)
	if len(rows) != len(loadPFRowNames(200)) {
		t.Fatalf("%d rows, want %d", len(rows), len(loadPFRowNames(200)))
	}
	for i, name := range loadPFRowNames(200) {
		if rows[i].Name != name {
			t.Errorf("row %d is %q, want %q", i, rows[i].Name, name)
		}
	}
	if rows[0].Status != benchtable.StatusOK || rows[1].Figure.Value != 30 || *rows[1].Ratio != 2 {
		t.Errorf("bursts of 100: %+v, p50 %+v", rows[0], rows[1])
	}
	if rows[3].Status != benchtable.StatusFailed || rows[3].Note != "first error: after 15000 ms: reset" {
		t.Errorf("a failed forwarded request must fail its row: %+v", rows[3])
	}
	if last := rows[len(rows)-1]; last.Status != benchtable.StatusFailed || last.Figure.Value != 1500 {
		t.Errorf("flows freed after 1.5 s must fail the 1 s target: %+v", last)
	}
}

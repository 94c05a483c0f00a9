package main

import (
	"os"
	"strings"
	"testing"

	"github.com/agentd/agent/internal/benchtable"
)

// testdata/paths.txt and vs-tsnet.txt are real output of the two
// benchmarks (paths.txt's conntrack lines from a run of the same
// measurement in TestConntrackNATDirectPath; vs-tsnet.txt a 32 MiB run on
// a machine loaded by several engineers).
func parsedTestdata(t *testing.T, name string) benchtable.Output {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	o, err := benchtable.Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func TestPathsRows(t *testing.T) {
	rows := pathsBench().rows(parsedTestdata(t, "paths.txt"))
	want := []struct {
		name      string
		figure    float64
		ref       float64
		noteParts []string
	}{
		{rowDirectConntrack, 254, 194, []string{"conntrack [254ms 167ms", "home [163ms"}},
		{rowFailoverStall, 1426, 3000, []string{"sha256 verified"}},
		{rowFailoverReturn, 1428, 5000, nil},
		{coordReturnRow("10 s"), 749.1, 74.25, []string{"attached again 14ms after"}},
		{coordReturnRow("60 s"), 1460, 59.12, []string{"attached again 793ms after"}},
		{rowUDPBlockedSSH, 164, 190, []string{"UDP blocked [164ms 153ms 139ms], UDP open [183ms"}},
	}
	if len(rows) != len(want) {
		t.Fatalf("%d rows, want %d: %+v", len(rows), len(want), rows)
	}
	for i, w := range want {
		r := rows[i]
		if r.Name != w.name || r.Status != benchtable.StatusOK || r.Figure.Value != w.figure || r.Reference.Value == nil || r.Reference.Value.Value != w.ref {
			t.Errorf("row %d: %+v (reference %+v), want %q %v against %v", i, r, r.Reference, w.name, w.figure, w.ref)
		}
		for _, p := range w.noteParts {
			if !strings.Contains(r.Note, p) {
				t.Errorf("row %q: note %q lacks %q", r.Name, r.Note, p)
			}
		}
	}

	tsnet := vsTsnetBench(32).rows(parsedTestdata(t, "vs-tsnet.txt"))
	if r := tsnet[0]; r.Figure.Value != 6.912 || r.Reference.Value.Value != 7.011 ||
		!strings.Contains(r.Note, "32 MiB per transfer over IPv6, medians of 5 alternating rounds: ours [7.9 7.9 6.9 5.7 4.0] MB/s, tsnet [9.4 7.1 5.6 7.0 4.9] MB/s; each round's ratio [0.84 1.12 1.22 0.82 0.81], median 0.84") {
		t.Errorf("tsnet row: %+v", r)
	}
}

func TestVsTsnetMiB(t *testing.T) {
	if n, err := vsTsnetMiB(func(string) string { return "" }); n != 512 || err != nil {
		t.Errorf("default: %d, %v", n, err)
	}
	if _, err := vsTsnetMiB(func(string) string { return "-3" }); err == nil || !strings.Contains(err.Error(), vsTsnetMiBEnv) {
		t.Errorf("-3: %v, want an error naming %s", err, vsTsnetMiBEnv)
	}
}

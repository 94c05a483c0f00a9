package main

import (
	"os"
	"strings"
	"testing"

	"github.com/agentd/agent/internal/benchtable"
)

// testdata/paths.txt and vs-tsnet.txt are real output of the two
// benchmarks (paths.txt's conntrack lines from a run of the same
// measurement in TestConntrackNATDirectPath; vs-tsnet.txt's per-round
// ratio added by hand from its rounds, as the benchmark now prints it).
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

	tsnet := vsTsnetBench(512).rows(parsedTestdata(t, "vs-tsnet.txt"))
	if r := tsnet[0]; r.Figure.Value != 44.87 || r.Reference.Value.Value != 19.23 || !strings.Contains(r.Note, "ours [53.4 31.0 44.9] MB/s, tsnet [45.5 19.2 15.6] MB/s; median of each round's ratio 1.61") {
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

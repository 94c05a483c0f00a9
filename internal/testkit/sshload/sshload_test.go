package sshload

import (
	"context"
	"errors"
	"runtime/pprof"
	"slices"
	"strings"
	"testing"
	"time"
)

// The references' runs are spread evenly among the measured client's, and
// each client's failures stay its own.
func TestInterleaved(t *testing.T) {
	var order []string
	run := func(name string, fail bool) Run {
		return func(context.Context) error {
			order = append(order, name)
			if fail {
				return errors.New(name + " failed")
			}
			return nil
		}
	}
	main := Load{Run: run("m", false)}
	refs := []Load{{Run: run("a", false)}, {Run: run("b", true)}}
	res, refRes := main.Interleaved(context.Background(), 10, refs, 2)
	if res.Runs != 10 || res.Failures != 0 || len(res.Latencies) != 10 {
		t.Errorf("measured client: %d runs, %d failed, %d latencies; want 10, 0, 10", res.Runs, res.Failures, len(res.Latencies))
	}
	if refRes[0].Runs != 2 || refRes[0].Failures != 0 || refRes[1].Runs != 2 || refRes[1].Failures != 2 {
		t.Errorf("references: %+v", refRes)
	}
	if got, want := strings.Join(order, ""), "mabmmmmmabmmmm"; got != want {
		t.Errorf("order %s, want %s", got, want)
	}

	order = nil
	_, refRes = main.Interleaved(context.Background(), 3, refs[:1], 3)
	if got, want := strings.Join(order, ""), "mamama"; got != want || refRes[0].Runs != 3 {
		t.Errorf("as many references as runs: order %s, want %s", got, want)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	res, _ = main.Interleaved(ctx, 5, refs, 5)
	if res.Failures != 1 || !slices.ContainsFunc(res.Errors, func(e string) bool { return strings.Contains(e, "stopped after 0 of 5") }) {
		t.Errorf("cancelled: %+v, want one failure saying it stopped", res)
	}
}

func TestSizesFromEnv(t *testing.T) {
	env := map[string]string{"AGENT_LOAD_SEQUENTIAL": "50"}
	s, err := SizesFromEnv(func(k string) string { return env[k] }, Sizes{Sequential: 10000, SequentialReference: 1000, Burst: 100})
	if err != nil || s.Sequential != 50 || s.SequentialReference != 50 {
		t.Errorf("fewer runs than the references' default: %+v, %v; want the references capped at 50", s, err)
	}
	env = map[string]string{"AGENT_LOAD_SEQUENTIAL_REFERENCE": "many"}
	if _, err := SizesFromEnv(func(k string) string { return env[k] }, Sizes{Burst: 1}); err == nil || !strings.Contains(err.Error(), "AGENT_LOAD_SEQUENTIAL_REFERENCE") {
		t.Errorf("a bad count: %v, want an error naming the variable", err)
	}
}

// parkedForTest blocks until release closes: a stack the dump must name.
func parkedForTest(release <-chan struct{}) { <-release }

func TestGoroutinesAboveNamesWhatGrew(t *testing.T) {
	dump := func() string {
		var b strings.Builder
		if err := pprof.Lookup("goroutine").WriteTo(&b, 1); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	idle := dump()
	release := make(chan struct{})
	defer close(release)
	for range 3 {
		go parkedForTest(release)
	}
	var now string
	for i := 0; ; i++ {
		now = dump()
		if strings.Count(now, "parkedForTest") > 0 && strings.Contains(GoroutinesAbove(idle, now), "+3 ") || i > 100 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	got := GoroutinesAbove(idle, now)
	if !strings.HasPrefix(got, "+3 sshload.parkedForTest") {
		t.Errorf("GoroutinesAbove = %q, want it to start with +3 sshload.parkedForTest", got)
	}
	if got := GoroutinesAbove(now, now); got != "no stack grew" {
		t.Errorf("the same dump twice: %q", got)
	}
}

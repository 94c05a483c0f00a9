package main

import (
	"context"
	"io"
	"math"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

func TestParseSize(t *testing.T) {
	good := map[string]int64{
		"96MiB": 96 << 20, "128MB": 128e6, "1GiB": 1 << 30, "1.5GiB": 3 << 29,
		"100000000": 1e8, "0": 0, " 64 MiB ": 64 << 20, "512KiB": 512 << 10, "10B": 10,
	}
	for in, want := range good {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "lots", "-1MiB", "12XB", "MiB", "1e400"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestApplyMemoryLimit(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	env := func(vars map[string]string) *cliEnv {
		return &cliEnv{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard, Getenv: func(k string) string { return vars[k] }}
	}

	if got, err := applyMemoryLimit(env(nil), defaultMemoryLimit); err != nil || got != 48<<20 || debug.SetMemoryLimit(-1) != 48<<20 {
		t.Errorf("default: limit %d, %v; runtime has %d", got, err, debug.SetMemoryLimit(-1))
	}
	if got, err := applyMemoryLimit(env(nil), "0"); err != nil || got != 0 || debug.SetMemoryLimit(-1) != math.MaxInt64 {
		t.Errorf("0 should lift the limit: %d, %v; runtime has %d", got, err, debug.SetMemoryLimit(-1))
	}
	// The runtime applied GOMEMLIMIT at start; the flag must not replace it.
	debug.SetMemoryLimit(200 << 20)
	if got, err := applyMemoryLimit(env(map[string]string{"GOMEMLIMIT": "200MiB"}), "96MiB"); err != nil || got != 200<<20 {
		t.Errorf("with GOMEMLIMIT set: %d, %v; want the runtime's 200 MiB kept", got, err)
	}
	if _, err := applyMemoryLimit(env(nil), "plenty"); err == nil || !strings.Contains(err.Error(), "--memory-limit") {
		t.Errorf("a bad size should name the flag: %v", err)
	}
}

// Every long-running mode has a soft memory limit by default, and its
// environment variable changes it.
func TestLongRunningModesHaveAMemoryLimit(t *testing.T) {
	for _, tc := range []struct {
		cmd, envVar, def string
		newCmd           func(*cliEnv) *cobra.Command
	}{
		{"run", "AGENT_MEMORY_LIMIT", defaultMemoryLimit, newRunCmd},
		{"dev", "AGENT_DEV_MEMORY_LIMIT", defaultDevMemoryLimit, newDevCmd},
		{"coordinator", "AGENT_COORDINATOR_MEMORY_LIMIT", defaultCoordinatorMemoryLimit, newCoordinatorCmd},
	} {
		vars := map[string]string{}
		env := &cliEnv{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard, Getenv: func(k string) string { return vars[k] }}
		f := tc.newCmd(env).Flags().Lookup("memory-limit")
		if f == nil {
			t.Errorf("agent %s has no --memory-limit", tc.cmd)
			continue
		}
		if n, err := parseSize(f.DefValue); err != nil || n == 0 || f.DefValue != tc.def {
			t.Errorf("agent %s: --memory-limit defaults to %q, want %q (a limit, not none)", tc.cmd, f.DefValue, tc.def)
		}
		vars[tc.envVar] = "300MiB"
		if got := tc.newCmd(env).Flags().Lookup("memory-limit").DefValue; got != "300MiB" {
			t.Errorf("agent %s: with %s=300MiB the default is %q", tc.cmd, tc.envVar, got)
		}
	}
}

// After a busy period the heap it left behind goes back to the system
// within two idle intervals, without waiting for Go's slow background
// scavenger.
func TestIdleMemoryIsReturned(t *testing.T) {
	released := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}}
	read := func() uint64 { metrics.Read(released); return released[0].Value.Uint64() }
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	const every = 100 * time.Millisecond
	go returnIdleMemory(ctx, every)

	busy() // 64 MiB of short-lived 64 KiB buffers, as a transfer leaves
	before := read()

	deadline := time.Now().Add(20 * every)
	for read() < before+32<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("%d MiB returned to the system %v after the busy period, want at least 32 MiB", (read()-before)>>20, 20*every)
		}
		time.Sleep(every / 4)
	}
}

// busy allocates and touches 64 MiB that is garbage once it returns.
//
//go:noinline
func busy() {
	keep := make([][]byte, 0, 1024)
	for range cap(keep) {
		b := make([]byte, 64<<10)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1 // touched, so the pages are really in use
		}
		keep = append(keep, b)
	}
}

package main

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"time"
)

// defaultMemoryLimit bounds the agent's heap under load. WireGuard-go takes
// a 64 KiB buffer for every packet in flight and pools them; with Go's
// default GC pacing a single large download lifted the agent from 34 MB to
// about 270 MB RSS. A workspace pod's memory limit is shared with the
// developer's own processes, so the agent should not take that much. The
// limit is what keeps RSS down (the runtime returns freed pages eagerly near
// it; a lower GOGC alone did not): during a 1 GiB transfer 96 MiB held the
// agent near 87 MB, 64 MiB near 60 MB, and 48 MiB near 52 MB, while 44, 40
// and 36 MiB gained nothing more (49-53 MB) and only made the collector run
// back to back over the ~33 MiB WireGuard keeps live. Throughput did not
// drop measurably (docs/bench.md). Agents with a larger working set (many
// forwarded connections) should raise --memory-limit.
const defaultMemoryLimit = "48MiB"

// defaultDevMemoryLimit is for "agent dev": a coordinator, its DERP relay and
// an agent in one process. Without a limit 2,000 SSH runs took it from 33 to
// 204 MB and it kept that after idling.
const defaultDevMemoryLimit = "128MiB"

// defaultCoordinatorMemoryLimit is generous: a coordinator relays DERP
// traffic for every peer that has no direct path, and a limit far below its
// working set would only make the garbage collector run without end. It
// bounds the heap a burst of sessions leaves behind.
const defaultCoordinatorMemoryLimit = "512MiB"

// memoryLimitFlagUsage is the --memory-limit help text for every
// long-running command; envVar names its environment variable.
func memoryLimitFlagUsage(envVar string) string {
	return "soft limit for the process's heap, e.g. 48MiB; the garbage collector works harder near it; 0 for none; GOMEMLIMIT, if set, wins (env " + envVar + ")"
}

// parseSize reads a byte count such as 96MiB, 128MB, 1GiB or 100000000.
// Zero means no limit.
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   float64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1},
	}
	mult := 1.0
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(num), u.mult
			break
		}
	}
	n, err := strconv.ParseFloat(s, 64)
	if err != nil || n < 0 || math.IsInf(n, 0) || n*mult > math.MaxInt64 {
		return 0, fmt.Errorf("%q is not a size: use bytes or a number with KiB, MiB, GiB, KB, MB or GB", s)
	}
	return int64(n * mult), nil
}

// applyMemoryLimit sets the Go runtime's soft memory limit unless the
// operator set GOMEMLIMIT, which the runtime has already applied and which
// wins. It returns the limit in force, or 0 for none.
func applyMemoryLimit(env *cliEnv, flag string) (int64, error) {
	if env.Getenv("GOMEMLIMIT") != "" {
		return debug.SetMemoryLimit(-1), nil
	}
	n, err := parseSize(flag)
	if err != nil {
		return 0, fmt.Errorf("--memory-limit: %w (0 turns the limit off)", err)
	}
	if n == 0 {
		debug.SetMemoryLimit(math.MaxInt64)
		return 0, nil
	}
	debug.SetMemoryLimit(n)
	return n, nil
}

// A process counts as idle in an interval of returnIdleMemory (every
// idleCheckInterval in the commands) in which it allocated
// less than idleAllocBytes: an idle agent allocates a few hundred KiB per
// second (keepalives, status), a transfer hundreds of MB.
const (
	idleCheckInterval = 2 * time.Second
	idleAllocBytes    = 8 << 20
)

// returnIdleMemory hands the heap a busy period left behind back to the
// system once the process goes idle, until ctx ends. Go returns free memory
// only slowly on its own, and WireGuard keeps its 64 KiB packet buffers in
// a sync.Pool that only a garbage collection empties, and an idle process
// seldom collects: after a 1 GiB transfer the agent otherwise stayed near
// 80 MB for minutes. At the first idle tick after a busy period two
// collections are forced back to back, since a pool's buffers survive the
// first one; the same covers a burst of short SSH sessions.
func returnIdleMemory(ctx context.Context, every time.Duration) {
	allocs := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(allocs)
	last := allocs[0].Value.Uint64()
	t := time.NewTicker(every)
	defer t.Stop()
	pending := false // a busy period ended and its memory is not returned yet
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		metrics.Read(allocs)
		now := allocs[0].Value.Uint64()
		busy := now-last > idleAllocBytes
		last = now
		switch {
		case busy:
			pending = true
		case pending:
			pending = false
			runtime.GC()
			debug.FreeOSMemory()
		}
	}
}

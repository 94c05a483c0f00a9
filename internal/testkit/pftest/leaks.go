package pftest

import (
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// NoLeaks records the number of goroutines and open sockets now
// and, at tb's cleanup, waits up to 5 s for both to come back to that level
// (plus slack for the runtime's own helpers), failing otherwise. Call it
// first in a test, so its cleanup runs after every other.
func NoLeaks(tb testing.TB) {
	tb.Helper()
	const slack = 2
	g0, fd0 := runtime.NumGoroutine(), openFDs()
	tb.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			g, fd := runtime.NumGoroutine(), openFDs()
			if g <= g0+slack && fd <= fd0+slack {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				tb.Errorf("leak: %d goroutines (was %d) and %d open sockets (was %d) after the test\n%s", g, g0, fd, fd0, buf)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// openFDs counts open sockets. Pipes are left out: the runtime keeps a pool
// of splice(2) pipes that only the garbage collector releases.
func openFDs() int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if link, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(link, "socket:") {
			n++
		}
	}
	return n
}

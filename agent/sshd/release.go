package sshd

import (
	"runtime"
	"runtime/debug"
	"sync"
	"time"
)

// idleReleaseAfter is how long the server must have had no connection
// before it hands freed memory back to the system: long enough for the
// tailnet to have dropped the departed clients' WireGuard peers (2 s after
// they leave, see tailnet's retireDevicePeer), whose queues are most of
// what a burst of clients leaves behind.
const idleReleaseAfter = 3 * time.Second

// idleRelease returns the heap a burst of connections grew to the
// operating system once the server has been without connections for a
// moment. The Go runtime's background scavenger gives it back only over
// minutes, so after 200 short connections an agent kept twice its idle RSS
// (36 to 49 MB) long after the last one closed.
type idleRelease struct {
	mu    sync.Mutex
	timer *time.Timer
	free  func()
}

// busy: a connection opened; a pending release waits for the next idle.
func (r *idleRelease) busy() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.timer != nil {
		r.timer.Stop()
	}
}

// idle: the last connection closed; release after idleReleaseAfter unless
// another opens first.
func (r *idleRelease) idle() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.timer == nil {
		free := r.free
		if free == nil {
			free = freeMemory
		}
		r.timer = time.AfterFunc(idleReleaseAfter, free)
		return
	}
	r.timer.Reset(idleReleaseAfter)
}

// freeMemory collects twice, so that what sat in sync.Pools (WireGuard's
// packet buffers among them) during the burst is garbage too (a pool's
// contents survive one collection), then returns the free pages.
func freeMemory() {
	runtime.GC()
	debug.FreeOSMemory()
}

// stop cancels a pending release, for Close.
func (r *idleRelease) stop() { r.busy() }

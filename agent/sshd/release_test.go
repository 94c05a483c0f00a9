package sshd

import (
	"sync/atomic"
	"testing"
	"time"
)

// The release runs once the server has stayed without connections for
// idleReleaseAfter, and not when a connection opens before that.
func TestIdleRelease(t *testing.T) {
	var freed atomic.Int32
	r := &idleRelease{free: func() { freed.Add(1) }}

	r.busy()
	r.idle()
	time.Sleep(idleReleaseAfter / 2)
	r.busy() // a new connection within the wait: no release
	time.Sleep(idleReleaseAfter)
	if n := freed.Load(); n != 0 {
		t.Fatalf("released %d time(s) while a connection was open", n)
	}
	r.idle()
	deadline := time.Now().Add(idleReleaseAfter + 5*time.Second)
	for freed.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := freed.Load(); n != 1 {
		t.Fatalf("released %d time(s) after the last connection closed, want 1", n)
	}
	r.stop()
}

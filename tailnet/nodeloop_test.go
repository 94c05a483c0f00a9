package tailnet

import (
	"testing"
	"time"

	"tailscale.com/wgengine"
)

// The engine may deliver an older status snapshot after a newer one (it
// calls back on each goroutine that asked). Such a snapshot, without the
// endpoints, must not leave our node without them.
func TestStaleStatusDoesNotWipeEndpoints(t *testing.T) {
	r := newTestRelay(t)
	c := newTestConn(t, r, 1, true)
	deadline := time.Now().Add(15 * time.Second)
	for len(c.Node().Endpoints) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the conn found no endpoints within 15 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	want := c.Node().Endpoints
	// Let the start-up settle (network checks, relay connection): each of
	// those asks for a status anyway, which would hide the bug.
	time.Sleep(3 * time.Second)

	// The snapshot taken before magicsock had found its endpoints,
	// arriving last.
	c.onStatus(&wgengine.Status{AsOf: time.Now().Add(-time.Second)}, nil)
	if got := c.Node().Endpoints; len(got) != 0 {
		t.Fatalf("the stale snapshot was not applied (endpoints %v); the test no longer checks anything", got)
	}
	deadline = time.Now().Add(2 * time.Second)
	for len(c.Node().Endpoints) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("endpoints still empty 2 s after a stale engine status; had %v", want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("endpoints back after the stale status: %v", c.Node().Endpoints)
}

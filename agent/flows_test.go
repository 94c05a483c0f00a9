package agent

import (
	"net"
	"net/netip"
	"testing"
)

// holds is what spares a lost client with an open connection from the cap
// on idle lost peers: true while a connection from its address is open.
func TestFlowsHolds(t *testing.T) {
	f := newFlows()
	from := netip.MustParseAddr("fd7a:115c:a1e0::1")
	other := netip.MustParseAddr("fd7a:115c:a1e0::2")
	a, b := net.Pipe()
	defer b.Close()
	c := f.track(a, from)
	if !f.holds(from) || !f.holds(other, from) {
		t.Fatal("a tracked connection's address is not held")
	}
	if f.holds(other) {
		t.Fatal("an address with no connection is held")
	}
	c.Close()
	if f.holds(from) {
		t.Fatal("the address is still held after its only connection closed")
	}
}

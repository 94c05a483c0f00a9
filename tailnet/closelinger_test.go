package tailnet

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestCloseSendsLastSegments closes a client's connections and, at once, the
// client itself, as `agent port-forward` does when it exits. The FINs of
// those connections were still on their way out when the engine went, so
// now and then one was dropped and the agent held that flow until its
// keepalive gave up. Close must let them reach the agent first.
func TestCloseSendsLastSegments(t *testing.T) {
	const conns, rounds = 50, 4
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true)
	ended := make(chan struct{}, conns)
	serveTCP(t, agent, 8080, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 1)
		if _, err := c.Read(buf); err != nil {
			return
		}
		c.Write(buf)
		for {
			if _, err := c.Read(buf); err != nil {
				ended <- struct{}{}
				return
			}
		}
	})
	for round := range rounds {
		client := newTestConn(t, r, NodeID(2+round), false)
		link(t, agent, client)
		awaitFast(t, client, addrOf(agent))
		var open []net.Conn
		for range conns {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			c, err := client.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(agent), 8080))
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte{1}); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Read(make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			open = append(open, c)
		}
		for _, c := range open {
			c.Close()
		}
		start := time.Now()
		client.Close()
		t.Logf("round %d: the client closed in %v", round+1, time.Since(start).Round(time.Millisecond))
		// Keepalive (60 s by default) is far beyond this bound: only the
		// FINs end these connections in time.
		limit := time.After(5 * time.Second)
		for i := range conns {
			select {
			case <-ended:
			case <-limit:
				t.Fatalf("round %d: %d of %d connections still open on the agent 5 s after the client closed them and went away", round+1, conns-i, conns)
			}
		}
		agent.RemovePeer(client.Node().ID)
	}
}

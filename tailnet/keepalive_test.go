package tailnet

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestDeadPeerFlowsEnd holds connections to a listener and to the TCP
// fallback, keeps them idle past the dead-peer bound while the client is
// alive (keepalive probes must be answered, nothing ends), then makes the
// client vanish without a FIN or RST: it forgets the agent, so its
// WireGuard drops every packet, as a process killed with SIGKILL would.
// The agent must end each connection within the bound.
func TestDeadPeerFlowsEnd(t *testing.T) {
	const bound = 2 * time.Second
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true, func(o *Options) { o.DeadPeerTimeout = bound })
	client := newTestConn(t, r, 2, false)
	link(t, agent, client)
	awaitFast(t, client, addrOf(agent))

	ended := make(chan time.Time, 8)
	serve := func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 1)
		if _, err := c.Read(buf); err != nil {
			ended <- time.Now()
			return
		}
		c.Write(buf)
		for {
			if _, err := c.Read(buf); err != nil {
				ended <- time.Now()
				return
			}
		}
	}
	serveTCP(t, agent, 22, serve)
	agent.SetTCPFallback(func(src, dst netip.AddrPort) (func(net.Conn), bool) { return serve, true })

	var conns []net.Conn
	for _, port := range []uint16{22, 22, 8080, 8080} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := client.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(agent), port))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte{1}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 1)); err != nil {
			t.Fatalf("port %d: %v", port, err)
		}
		c.SetDeadline(time.Time{})
		conns = append(conns, c)
	}

	select {
	case <-ended:
		t.Fatalf("an idle connection to a live peer ended within %v", 2*bound)
	case <-time.After(2 * bound):
	}

	// The client vanishes: it stops answering, and must not tell.
	agent.SetNodeCallback(nil)
	client.SetNodeCallback(nil)
	client.RemovePeer(agent.Node().ID)
	gone := time.Now()
	// Slack for a loaded 2-core machine; netstack's own bound is 2 h.
	limit := time.After(bound + 15*time.Second)
	for range conns {
		select {
		case at := <-ended:
			// Three unanswered probes take at least two intervals.
			if took := at.Sub(gone); took < bound/4 {
				t.Fatalf("a connection ended %v after its peer vanished, sooner than three keepalive probes can fail", took)
			}
		case <-limit:
			t.Fatalf("connections of a vanished peer still open %v later, want within about %v", bound+15*time.Second, bound)
		}
	}
	t.Logf("all %d connections ended within %v", len(conns), time.Since(gone).Round(time.Millisecond))
}

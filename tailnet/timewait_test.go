package tailnet

import (
	"context"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
)

// A flow taken by the TCP fallback (as every forwarded port is) that our side
// closed first sits in TIME-WAIT for a minute. A new connection from the
// peer with the same source port must still get through at once: gVisor
// alone drops its SYNs until TIME-WAIT ends, which is how `agent
// port-forward` lost 1-2 % of its connections under bursts (the laptop picks
// source ports at random). The laptop here dials twice from one fixed port.
func TestNewSYNTakesOverTimeWait(t *testing.T) {
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true)
	laptop := newTestConn(t, r, 2, false)
	link(t, agent, laptop)
	agent.SetTCPFallback(func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		// Answer and close first, as an HTTP server does with
		// "Connection: close": the TIME-WAIT stays on this side.
		return func(c net.Conn) {
			c.Write([]byte("hello"))
			c.Close()
		}, true
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := laptop.AwaitReachable(ctx, addrOf(agent)); err != nil {
		t.Fatal(err)
	}
	st, ok := gvisorStack(laptop.ns)
	if !ok {
		t.Fatal("cannot reach the laptop's gVisor stack")
	}
	const srcPort = 47001
	local := tcpip.FullAddress{Addr: tcpip.AddrFromSlice(addrOf(laptop).AsSlice()), Port: srcPort}
	remote := tcpip.FullAddress{Addr: tcpip.AddrFromSlice(addrOf(agent).AsSlice()), Port: 8080}
	for i := range 2 {
		start := time.Now()
		var c *gonet.TCPConn
		var err error
		for {
			// The laptop's own side of the first connection needs a moment
			// to release the port after the agent's FIN.
			dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
			c, err = gonet.DialTCPWithBind(dctx, st, local, remote, ipv6.ProtocolNumber)
			dcancel()
			if !portInUse(err) || ctx.Err() != nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("connection %d from port %d: %v (after %v)", i+1, srcPort, err, time.Since(start).Round(time.Millisecond))
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "hello" {
			t.Fatalf("connection %d: read %q, %v", i+1, got, err)
		}
		t.Logf("connection %d from port %d took %v", i+1, srcPort, time.Since(start).Round(time.Millisecond))
	}
	if n := agent.timeWait.recycled.Load(); n != 1 {
		t.Errorf("the agent took over %d connections in TIME-WAIT, want 1", n)
	}
}

// portInUse reports whether a dial failed because the local port is still
// taken.
func portInUse(err error) bool {
	return err != nil && strings.Contains(err.Error(), (&tcpip.ErrPortInUse{}).String())
}

package tailnet

import (
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/net/packet"
	"tailscale.com/types/ipproto"
)

// tsmpPingsIn counts the TSMP pings that reach c's TUN from its peers: each
// one is answered by the receiving peer's WireGuard routine writing into
// its TUN, the wait that closed the device deadlock retire.go describes.
func tsmpPingsIn(c *Conn) *atomic.Int64 {
	var n atomic.Int64
	c.eng.InstallCaptureHook(func(path packet.CapturePath, _ time.Time, data []byte, _ packet.CaptureMeta) {
		if path != packet.FromPeer {
			return
		}
		var p packet.Parsed
		p.Decode(data)
		if p.IPProto != ipproto.TSMP {
			return
		}
		if _, ok := p.AsTSMPPing(); ok {
			n.Add(1)
		}
	})
	return &n
}

// Neither end sends the other a TSMP ping: not the client's AwaitReachable,
// not the agent's punch towards a new client, not either path watcher
// probing a busy direct path. The engines still work end to end: the first
// dial goes through, and the counters and handshake the status reads from
// WireGuard (not the engine's status snapshot) are there.
func TestNoTSMPPingsBetweenPeers(t *testing.T) {
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true)
	client := newTestConn(t, r, 2, false)
	atAgent, atClient := tsmpPingsIn(agent), tsmpPingsIn(client)
	link(t, agent, client)
	d := awaitFast(t, client, addrOf(agent))
	t.Logf("reachable after %v", d)
	// A busy direct path is what the path watchers probe.
	pingUntil(t, client, addrOf(agent), PingResult.Direct)
	transfer(t, client, agent, 80, 4<<20)
	// Probes go out every pathCheckEvery while the peer is active.
	time.Sleep(6 * pathCheckEvery)

	if n := atAgent.Load(); n != 0 {
		t.Errorf("the agent received %d TSMP pings; want none", n)
	}
	if n := atClient.Load(); n != 0 {
		t.Errorf("the client received %d TSMP pings; want none", n)
	}
	for name, c := range map[string]*Conn{"client": client, "agent": agent} {
		st := c.PeerStatus()
		if len(st) != 1 || st[0].TxBytes < 4<<20 || st[0].RxBytes < 4<<20 || st[0].LastHandshake.IsZero() || st[0].Path.Kind != PathDirect {
			t.Errorf("%s's peer status %+v: want one direct peer with over 4 MiB each way and a handshake", name, st)
		}
	}
}

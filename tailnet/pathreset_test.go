package tailnet

import (
	"testing"
	"time"

	"tailscale.com/types/key"
)

// TestRestartSessionUnderLoad restarts both sides' WireGuard sessions
// every 100 ms while 2 MiB cross each way. Rebuilding the peer instead
// (ResetDevicePeer) can freeze the node under such traffic; in place, the
// transfer completes intact and new handshakes happen.
func TestRestartSessionUnderLoad(t *testing.T) {
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true)
	client := newTestConn(t, r, 2, false)
	link(t, agent, client)
	awaitFast(t, client, addrOf(agent))
	var agentKey, clientKey key.NodePublic
	if agentKey.UnmarshalText([]byte(agent.Node().Key)) != nil || clientKey.UnmarshalText([]byte(client.Node().Key)) != nil {
		t.Fatal("unparsable node keys")
	}
	before := client.lastHandshake(agentKey)
	if before.IsZero() {
		t.Fatal("no handshake after the peer became reachable")
	}

	done := make(chan struct{})
	restarts := make(chan int, 1)
	go func() {
		n := 0
		defer func() { restarts <- n }()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if !client.restartSession(agentKey) || !agent.restartSession(clientKey) {
				t.Error("cannot reach the WireGuard device to restart a session in place")
				return
			}
			n++
		}
	}()
	start := time.Now()
	transfer(t, client, agent, 80, 2<<20)
	close(done)
	n := <-restarts
	after := client.lastHandshake(agentKey)
	t.Logf("2 MiB each way in %v with %d in-place session restarts; handshakes %v apart", time.Since(start).Round(time.Millisecond), n, after.Sub(before).Round(time.Millisecond))
	if n > 0 && !after.After(before) {
		t.Errorf("restarting the session started no new handshake (last %v)", after)
	}
}

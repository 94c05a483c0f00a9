package tailnet

import (
	"time"

	"tailscale.com/types/key"
)

// retireAfter is how long a departed peer stays in the WireGuard device,
// unreachable (magicsock and the packet filter forgot it at once), before
// it is removed from the device.
const retireAfter = 2 * time.Second

// retireDevicePeer removes a departed peer from the WireGuard device after
// retireAfter rather than at once.
//
// The device deadlock this guards against: wireguard-go stops a peer (our
// removal, its own removal of an idle lazily created peer, or a reset)
// while holding the device's peer lock, and waits for the peer's receive
// routine; when that routine is answering a TSMP ping, the answer waits for
// the TUN's outbound lock and queue, whose reader (WireGuard reading the
// TUN) waits for that same peer lock, and the whole device stops for good.
// The engine's status snapshot takes the peer lock for writing too. Bursts
// of clients that pinged the agent with TSMP and left wedged it within a
// minute. So our nodes send no TSMP pings (reach.go, pathwatch.go and the
// punch in peers.go use disco pings and nudges instead) and never take the
// engine's status (peerStates); and by retireAfter a departed peer's queued
// packets have been handled, and magicsock no longer hands WireGuard new
// ones from it.
func (c *Conn) retireDevicePeer(k key.NodePublic) {
	time.AfterFunc(retireAfter, func() {
		c.configMu.Lock()
		defer c.configMu.Unlock()
		c.mu.RLock()
		_, back := c.byKey[k]
		closed := c.closed
		c.mu.RUnlock()
		if back || closed {
			return // back: UpsertPeer configured it again
		}
		c.eng.SyncDevicePeer(k)
	})
}

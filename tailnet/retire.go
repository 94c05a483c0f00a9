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
// retireAfter rather than at once. wireguard-go stops a peer while holding
// the device's peer lock and waits for the peer's receive routine; when
// that routine is answering a TSMP ping, the answer waits for the TUN's
// outbound queue, whose reader waits for that same peer lock, and the whole
// device deadlocks for good (every peer's traffic stops). Bursts of
// clients that ping the agent and leave hit it within a minute. By
// retireAfter the departed peer's queued packets have been handled, and
// magicsock no longer hands WireGuard new ones from it.
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

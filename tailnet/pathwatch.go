package tailnet

import (
	"net/netip"
	"sync/atomic"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// Path watching: magicsock trusts a direct path for 6.5 s after its last
// pong (trustUDPAddrDuration, a constant) and only then sends through DERP
// as well, so a direct path that dies in the middle of a transfer stalls it
// for that long plus TCP's backed-off retransmissions (about 12 s measured).
// Tailscale v1.102.5 has no knob for that trust. So while a peer on a
// direct path carries traffic, we probe the path ourselves with disco
// pings, which go to the direct address WireGuard uses while magicsock
// trusts it; when no pong has come back over it for pathDeadAfter, we
// rebuild the peer's magicsock endpoint, which sends through DERP at once
// and starts discovery again. Disco pings are answered by the peer's
// magicsock; TSMP pings (which we used before) are answered by its
// WireGuard receive routine writing into its TUN, one of the waits of the
// deadlock retire.go describes. For the same reason the watcher reads
// magicsock's per-peer state and WireGuard's counters (peerStates), never
// the engine's status snapshot. While an active peer is
// relayed, a disco ping every pathRediscoverEvery pings all its endpoints
// (magicsock's own discovery waits 5 s between pings to an endpoint), so a
// path that comes back is used again within seconds.
const (
	pathCheckEvery = 250 * time.Millisecond
	// pathDeadAfter is the silence, with at least pathDeadProbes probes
	// unanswered, after which the path counts as dead. A false alarm (a
	// loaded machine) costs a short detour through DERP and a handshake.
	pathDeadAfter       = 1200 * time.Millisecond
	pathDeadProbes      = 4
	pathActiveWindow    = 5 * time.Second
	pathRediscoverEvery = 2 * time.Second
	// pathActiveBytes is the WireGuard traffic per check that counts as
	// activity; our own probes (about 100 bytes each way) stay below it.
	pathActiveBytes = 1024
)

// pathState is what the watcher remembers about one peer.
type pathState struct {
	rx, tx         int64
	activeAt       time.Time
	path           string // magicsock's current direct address, "" if relayed
	lastRediscover time.Time
	lastPong       atomic.Int64 // unix nanoseconds of the last direct pong or reset
	unanswered     atomic.Int32 // probes sent since then
}

func (s *pathState) notePong(t time.Time) {
	s.lastPong.Store(t.UnixNano())
	s.unanswered.Store(0)
}

// pathLoop watches the peers' paths until the Conn closes.
func (c *Conn) pathLoop() {
	if envknob.Bool("TS_DEBUG_ALWAYS_USE_DERP") {
		return // no direct path can exist
	}
	t := time.NewTicker(pathCheckEvery)
	defer t.Stop()
	states := map[key.NodePublic]*pathState{}
	for {
		select {
		case <-c.closeCh:
			return
		case <-t.C:
		}
		c.checkPaths(states)
	}
}

type watchedPeer struct {
	id           NodeID
	key          key.NodePublic
	addr         netip.Addr
	hasEndpoints bool
}

func (c *Conn) checkPaths(states map[key.NodePublic]*pathState) {
	c.mu.RLock()
	peers := make([]watchedPeer, 0, len(c.peers))
	for _, p := range c.peers {
		if len(p.node.Addresses) == 0 {
			continue
		}
		peers = append(peers, watchedPeer{p.node.ID, p.key, p.node.Addresses[0].Addr(), len(p.node.Endpoints) > 0})
	}
	c.mu.RUnlock()
	st := c.peerStates()
	now := time.Now()
	seen := make(map[key.NodePublic]bool, len(peers))
	for _, wp := range peers {
		seen[wp.key] = true
		ps, ok := st[wp.key]
		if !ok || ps == nil {
			continue
		}
		s := states[wp.key]
		if s == nil {
			s = &pathState{}
			s.notePong(now)
			states[wp.key] = s
		}
		if ps.RxBytes-s.rx+ps.TxBytes-s.tx > pathActiveBytes {
			s.activeAt = now
		}
		s.rx, s.tx = ps.RxBytes, ps.TxBytes
		if ps.CurAddr != s.path {
			if ps.CurAddr != "" {
				c.logger.Info("peer path is direct", "peer", wp.id, "endpoint", ps.CurAddr)
				s.notePong(now)
			} else {
				c.logger.Info("peer path is relayed", "peer", wp.id, "relay", ps.Relay)
			}
			s.path = ps.CurAddr
		}
		if now.Sub(s.activeAt) > pathActiveWindow {
			s.notePong(now) // idle: nothing to protect, and no probes
			continue
		}
		if s.path != "" {
			if silent := now.Sub(time.Unix(0, s.lastPong.Load())); silent > pathDeadAfter && s.unanswered.Load() >= pathDeadProbes {
				c.logger.Info("direct path stopped answering; relaying while it is rediscovered", "peer", wp.id, "endpoint", s.path, "silent", silent.Round(time.Millisecond))
				c.resetPath(wp.id)
				s.notePong(now)
				s.path = ""
				s.lastRediscover = now
				continue
			}
			s.unanswered.Add(1)
			// Only a pong over the direct path counts: one through the
			// relay means magicsock no longer trusts the path.
			c.eng.Ping(wp.addr, tailcfg.PingDisco, 0, func(r *ipnstate.PingResult) {
				if r != nil && r.Err == "" && r.Endpoint != "" {
					s.notePong(time.Now())
				}
			})
			continue
		}
		if wp.hasEndpoints && now.Sub(s.lastRediscover) >= pathRediscoverEvery {
			s.lastRediscover = now
			c.eng.Ping(wp.addr, tailcfg.PingDisco, 0, func(*ipnstate.PingResult) {})
		}
	}
	for k := range states {
		if !seen[k] {
			delete(states, k)
		}
	}
}

// resetPath makes magicsock forget a peer's direct path: packets go
// through DERP at once while discovery pings every endpoint again. The
// WireGuard peer and its session stay (see forgetDirectPath for why they
// must).
func (c *Conn) resetPath(id NodeID) {
	c.mu.RLock()
	p, ok := c.peers[id]
	closed := c.closed
	c.mu.RUnlock()
	if !ok || closed {
		return
	}
	if !c.forgetDirectPath(p.key) {
		c.logger.Warn("cannot reset the direct path of a peer magicsock does not know", "peer", id)
	}
}

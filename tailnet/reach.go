// Reachability: the disco pings and WireGuard nudges a caller uses before
// its first dial to a peer, and the disco pings that tell which path a
// peer's traffic takes.

package tailnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"tailscale.com/ipn/ipnstate"
	"tailscale.com/net/packet"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// PingResult is the outcome of a disco ping.
type PingResult struct {
	Latency time.Duration
	// Endpoint is the peer's UDP address when the pong came directly.
	Endpoint netip.AddrPort
	// DERPRegionID and DERPRegionCode name the relay when it did not.
	DERPRegionID   int
	DERPRegionCode string
}

// Direct reports whether the pong came over a direct UDP path.
func (r PingResult) Direct() bool { return r.Endpoint.IsValid() }

// AwaitReachable returns once the peer at ip has answered a disco ping
// (its magicsock knows us and a path works) and WireGuard has a session
// with it. Call it before the first dial to a new or restarted peer.
//
// It sends nothing the peer's WireGuard receive path must answer: disco
// pings are answered by magicsock, and the packet that makes WireGuard
// start its handshake is one the peer's TUN drops in silence (see nudge).
// TSMP pings, which we used to send here, are answered from the peer's
// receive routine into its TUN's outbound queue, and that wait is part of
// a deadlock that wedged an agent's whole device under bursts of clients
// (see retire.go).
//
// Probes go out on a short, growing interval; and since WireGuard itself
// retries a lost handshake only after 5 s (a first handshake is easily lost
// while the peer's relay connection is still being set up), a peer without
// a live session by the next retry point (0.5 s, then 1, 2, 4 s later) is
// reset so the next nudge starts a fresh handshake.
func (c *Conn) AwaitReachable(ctx context.Context, ip netip.Addr) error {
	c.mu.RLock()
	p, ok := c.byIP[ip]
	c.mu.RUnlock()
	if !ok {
		return fmt.Errorf("tailnet: no peer has address %v", ip)
	}
	pong := make(chan struct{}, 1)
	answered := false
	start := time.Now()
	delay := 50 * time.Millisecond
	nextProbe := start
	resetAfter := 500 * time.Millisecond
	nextReset := start.Add(resetAfter)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("tailnet: %v not reachable: %w", ip, ctx.Err())
		case <-c.closeCh:
			return net.ErrClosed
		case <-pong:
			answered = true
		case <-t.C:
		}
		now := time.Now()
		session := c.sessionAlive(p.key, now)
		if answered && session {
			return nil
		}
		if now.After(nextReset) {
			if !session {
				c.logger.Debug("no WireGuard handshake yet; restarting it", "peer", p.node.ID, "waited", now.Sub(start).Round(time.Millisecond))
				c.eng.ResetDevicePeer(p.key)
			}
			resetAfter = min(resetAfter*2, 4*time.Second)
			nextReset = now.Add(resetAfter)
		}
		if !now.Before(nextProbe) {
			if !answered {
				c.eng.Ping(ip, tailcfg.PingDisco, 0, func(r *ipnstate.PingResult) {
					if r.Err == "" {
						select {
						case pong <- struct{}{}:
						default:
						}
					}
				})
			}
			if !session {
				c.nudge(ip)
			}
			nextProbe = now.Add(delay)
			delay = min(delay*3/2, time.Second)
		}
		wait := time.Until(nextProbe)
		if answered {
			// Only the session is missing; its handshake is one round
			// trip away, so look again soon.
			wait = min(wait, 10*time.Millisecond)
		}
		t.Reset(wait)
	}
}

// sessionAlive reports whether WireGuard completed a handshake with the
// peer within its reject-after time (3 min), so packets flow now.
func (c *Conn) sessionAlive(k key.NodePublic, now time.Time) bool {
	hs := c.lastHandshake(k)
	return !hs.IsZero() && now.Sub(hs) < 3*time.Minute
}

// lastHandshake is the time of the last completed WireGuard handshake with
// the peer, zero if none. It reads the one device peer (under the device's
// read lock) and never the engine's status snapshot (see peerStates).
func (c *Conn) lastHandshake(k key.NodePublic) time.Time {
	if wp, ok := c.eng.PeerByKey(k); ok {
		return wp.LastHandshake()
	}
	return time.Time{}
}

// nudge sends the peer at ip one packet through WireGuard that the peer's
// TUN drops without answering: a disco-key advertisement carrying no key
// (tstun drops a zero key before anything else sees it). The packet makes
// our WireGuard start a handshake if it has no session, and magicsock
// start discovery and call the peer, just as a TSMP ping would; but the
// peer's receive routine never writes an answer into its own TUN.
func (c *Conn) nudge(ip netip.Addr) {
	var src netip.Addr
	for _, a := range c.opts.Addresses {
		if a.Addr().Is4() == ip.Is4() {
			src = a.Addr()
			break
		}
	}
	if !src.IsValid() {
		return
	}
	pkt, err := (&packet.TSMPDiscoKeyAdvertisement{Src: src, Dst: ip}).Marshal()
	if err != nil {
		c.logger.Warn("cannot build the packet that starts a WireGuard handshake", "peer_ip", ip, "err", err)
		return
	}
	if err := c.sys.Tun.Get().InjectOutbound(pkt); err != nil {
		c.logger.Debug("packet that starts a WireGuard handshake not sent", "peer_ip", ip, "err", err)
	}
}

// Ping sends a disco ping and reports the path the pong took.
func (c *Conn) Ping(ctx context.Context, ip netip.Addr) (PingResult, error) {
	if !c.isPeerIP(ip) {
		return PingResult{}, fmt.Errorf("tailnet: no peer has address %v", ip)
	}
	// A ping sent before our relay connection is up is lost, and its
	// caller would wait its whole timeout for nothing.
	if err := c.awaitHomeDERP(ctx); err != nil {
		return PingResult{}, fmt.Errorf("tailnet: ping %v: %w", ip, err)
	}
	// A ping or pong can be lost (a relay connection of the peer's just
	// being set up); rather than wait out the caller's whole timeout, ping
	// again every pingRetry and take the first answer.
	res := make(chan *ipnstate.PingResult, 1)
	send := func() {
		c.eng.Ping(ip, tailcfg.PingDisco, 0, func(r *ipnstate.PingResult) {
			select {
			case res <- r:
			default:
			}
		})
	}
	send()
	retry := time.NewTicker(pingRetry)
	defer retry.Stop()
	var r *ipnstate.PingResult
	for r == nil {
		select {
		case <-ctx.Done():
			return PingResult{}, fmt.Errorf("tailnet: ping %v: %w", ip, ctx.Err())
		case <-c.closeCh:
			return PingResult{}, net.ErrClosed
		case <-retry.C:
			send()
		case r = <-res:
		}
	}
	if r.Err != "" {
		return PingResult{}, fmt.Errorf("tailnet: ping %v: %s", ip, r.Err)
	}
	out := PingResult{
		Latency:        time.Duration(r.LatencySeconds * float64(time.Second)),
		DERPRegionID:   r.DERPRegionID,
		DERPRegionCode: r.DERPRegionCode,
	}
	if r.Endpoint != "" {
		ap, err := netip.ParseAddrPort(r.Endpoint)
		if err != nil {
			return PingResult{}, fmt.Errorf("tailnet: ping %v: engine reported endpoint %q: %w", ip, r.Endpoint, err)
		}
		out.Endpoint = ap
	}
	return out, nil
}

// pingRetry is how long Ping waits for a pong before pinging again.
const pingRetry = time.Second

// Reachability: the TSMP and disco pings a caller uses before its first
// dial to a peer and to learn which path a peer's traffic takes.

package tailnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"tailscale.com/ipn/ipnstate"
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

// AwaitReachable returns once a TSMP ping to ip (answered by the peer's
// WireGuard and netstack) comes back. Call it before the first dial to a
// new or restarted peer. Pings go out on a short, growing interval, several
// in flight; and since WireGuard itself retries a lost handshake only after
// 5 s (a first handshake is easily lost while the peer's relay connection
// is still being set up), a peer without a live session by the next retry
// point (0.5 s, then 1, 2, 4 s later) is reset so the next ping starts a
// fresh handshake.
func (c *Conn) AwaitReachable(ctx context.Context, ip netip.Addr) error {
	c.mu.RLock()
	p, ok := c.byIP[ip]
	c.mu.RUnlock()
	if !ok {
		return fmt.Errorf("tailnet: no peer has address %v", ip)
	}
	pong := make(chan struct{}, 1)
	start := time.Now()
	delay := 50 * time.Millisecond
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
			return nil
		case <-t.C:
		}
		if now := time.Now(); now.After(nextReset) {
			// A session younger than WireGuard's reject-after time is
			// alive and its pong merely slow: leave it alone.
			if hs := c.lastHandshake(p.key); hs.IsZero() || now.Sub(hs) > 3*time.Minute {
				c.logger.Debug("no WireGuard handshake yet; restarting it", "peer", p.node.ID, "waited", now.Sub(start).Round(time.Millisecond))
				c.eng.ResetDevicePeer(p.key)
			}
			resetAfter = min(resetAfter*2, 4*time.Second)
			nextReset = now.Add(resetAfter)
		}
		c.eng.Ping(ip, tailcfg.PingTSMP, 0, func(r *ipnstate.PingResult) {
			if r.Err == "" {
				select {
				case pong <- struct{}{}:
				default:
				}
			}
		})
		t.Reset(delay)
		delay = min(delay*3/2, time.Second)
	}
}

// lastHandshake is the time of the last completed WireGuard handshake with
// the peer, zero if none.
func (c *Conn) lastHandshake(k key.NodePublic) time.Time {
	sb := &ipnstate.StatusBuilder{WantPeers: true}
	c.eng.UpdateStatus(sb)
	if ps, ok := sb.Status().Peer[k]; ok && ps != nil {
		return ps.LastHandshake
	}
	return time.Time{}
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

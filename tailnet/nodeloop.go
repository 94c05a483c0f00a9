// Our own node: the endpoints and home relay the engine reports, and the
// loop that hands the node to the caller (who publishes it through the
// coordinator) only once a peer could reach it. Kept apart from the peer
// table because it runs on the engine's callbacks, not the caller's.

package tailnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
	"tailscale.com/wgengine"
)

// Node returns a copy of our current node description.
func (c *Conn) Node() *Node {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.nodeLocked()
}

func (c *Conn) nodeLocked() *Node {
	return &Node{
		ID:        c.opts.NodeID,
		Key:       c.priv.Public().String(),
		DiscoKey:  c.self.DiscoKey.String(),
		Addresses: slices.Clone(c.opts.Addresses),
		Endpoints: slices.Clone(c.endpoints),
		HomeDERP:  c.homeDERP,
		AsOf:      c.asOf,
	}
}

// SetNodeCallback sets the function told about our node whenever its
// endpoints or home DERP change. It is first called once the home DERP is
// known (a node without one cannot be reached) and its relay has admitted
// us (or 2 s have passed), never while a lock is held,
// and never concurrently with itself. It may call Close; after Close it is
// not called again.
func (c *Conn) SetNodeCallback(fn func(*Node)) {
	c.mu.Lock()
	c.nodeCB = fn
	c.nodeCBGen++
	c.mu.Unlock()
	c.notifyNode()
}

func (c *Conn) notifyNode() {
	select {
	case c.nodeNotify <- struct{}{}:
	default:
	}
}

// nodeLoop delivers node changes to the callback from a single goroutine.
func (c *Conn) nodeLoop() {
	var last *Node
	lastGen := -1
	for {
		select {
		case <-c.closeCh:
			return
		case <-c.nodeNotify:
		}
		c.mu.RLock()
		cb, gen, closed := c.nodeCB, c.nodeCBGen, c.closed
		n := c.nodeLocked()
		homeAge := time.Since(c.homeDERPAt)
		c.mu.RUnlock()
		if closed {
			return
		}
		if cb == nil || n.HomeDERP == 0 {
			continue
		}
		// Hold the first report until the relay has admitted us (or a
		// while has passed): a peer's first handshake sent through DERP
		// before then is dropped, and WireGuard would retry it only after
		// 5 s.
		if last == nil && !c.derpConnected(n.HomeDERP) && homeAge < homeDERPGrace {
			time.AfterFunc(20*time.Millisecond, c.notifyNode)
			continue
		}
		// A new callback gets the current node even if it did not change.
		if last != nil && lastGen == gen && n.HomeDERP == last.HomeDERP && slices.Equal(n.Endpoints, last.Endpoints) {
			continue
		}
		cb(n)
		last, lastGen = n, gen
	}
}

// homeDERPGrace bounds how long the first node report waits for the home
// relay connection; after it the node is reported anyway (direct paths may
// still work).
const homeDERPGrace = 2 * time.Second

// derpConnected reports whether a frame has arrived from the region's
// relay, which happens only once it has admitted us.
func (c *Conn) derpConnected(region int) bool {
	return !c.sys.HealthTracker.Get().GetDERPRegionReceivedTime(region).IsZero()
}

func (c *Conn) onNetInfo(ni *tailcfg.NetInfo) {
	if ni == nil || ni.PreferredDERP == 0 {
		return
	}
	c.mu.Lock()
	if c.derpMap.regionCode(ni.PreferredDERP) == "" {
		// A network check that started before SetDERPMap can report a
		// region the map no longer has; magicsock keeps it until its next
		// periodic check. Measure again now instead of publishing it.
		closed := c.closed
		c.mu.Unlock()
		if !closed {
			go c.mc.ReSTUN("home-derp-not-in-map")
		}
		return
	}
	changed := c.homeDERP != ni.PreferredDERP
	if changed {
		c.homeDERP = ni.PreferredDERP
		c.homeDERPAt = time.Now()
		c.asOf = c.homeDERPAt
	}
	c.mu.Unlock()
	if changed {
		c.logger.Info("home DERP region", "region", ni.PreferredDERP)
		c.notifyNode()
	}
}

func (c *Conn) onStatus(st *wgengine.Status, err error) {
	if err != nil || st == nil {
		return
	}
	eps := make([]netip.AddrPort, 0, len(st.LocalAddrs))
	for _, ep := range st.LocalAddrs {
		eps = append(eps, ep.Addr)
	}
	c.setEndpoints(eps)
}

// setEndpoints publishes our endpoints (deduplicated, sorted, capped) when
// they changed.
func (c *Conn) setEndpoints(all []netip.AddrPort) {
	eps := make([]netip.AddrPort, 0, len(all))
	for _, ep := range all {
		if ep.IsValid() && !slices.Contains(eps, ep) {
			eps = append(eps, ep)
		}
	}
	slices.SortFunc(eps, func(a, b netip.AddrPort) int { return a.Compare(b) })
	if len(eps) > MaxNodeEndpoints {
		eps = eps[:MaxNodeEndpoints]
	}
	c.mu.Lock()
	changed := !slices.Equal(eps, c.endpoints)
	if changed {
		c.endpoints = eps
		c.asOf = time.Now()
	}
	c.mu.Unlock()
	if changed {
		c.notifyNode()
		// The engine calls back on each goroutine that asked for a status
		// (its DERP-connected and endpoints-changed hooks both ask, often
		// within a millisecond), so an older snapshot can arrive last and
		// wipe newer endpoints; nothing asks again until they change, and
		// the node is published without them (seen: a client's node with
		// no endpoints, so the agent could not punch first). Reading
		// magicsock's current endpoints once more after every change makes
		// them the last word. (Not the engine's status: that snapshot takes
		// the WireGuard device's peer lock, see peerStates.)
		time.AfterFunc(statusRecheck, func() {
			select {
			case <-c.closeCh:
			default:
				c.setEndpoints(c.magicsockEndpoints())
			}
		})
	}
}

// magicsockEndpoints are the endpoints magicsock last found for us: the
// ones it passes to the engine, which the engine's status reports.
func (c *Conn) magicsockEndpoints() []netip.AddrPort {
	sb := &ipnstate.StatusBuilder{}
	c.mc.UpdateStatus(sb)
	self := sb.Status().Self
	if self == nil {
		return nil
	}
	eps := make([]netip.AddrPort, 0, len(self.Addrs))
	for _, a := range self.Addrs {
		if ap, err := netip.ParseAddrPort(a); err == nil {
			eps = append(eps, ap)
		}
	}
	return eps
}

// statusRecheck is how long after an endpoint change setEndpoints reads
// magicsock's endpoints again.
const statusRecheck = 50 * time.Millisecond

// homeOnlyRegion makes a map's only region our home at once. Magicsock
// would pick it too, but only after its network check, which waits 3 s for
// STUN answers when UDP is blocked before it measures the relays over
// HTTPS; until then nobody can reach us. (Without a control server,
// magicsock never moves an established home anyway.)
func (c *Conn) homeOnlyRegion() {
	c.mu.Lock()
	if len(c.derpMap.Regions) != 1 || c.closed {
		c.mu.Unlock()
		return
	}
	id := c.derpMap.Regions[0].ID
	changed := c.homeDERP != id
	c.mu.Unlock()
	if c.mc.ForceSetNearestDERP(id) != id {
		return
	}
	if changed {
		c.onNetInfo(&tailcfg.NetInfo{PreferredDERP: id})
	}
}

// SetDERPMap replaces the relay map.
func (c *Conn) SetDERPMap(m *DERPMap) {
	if err := m.Validate(); err != nil {
		c.logger.Warn("ignoring invalid DERP map", "err", err)
		return
	}
	c.configMu.Lock()
	defer c.configMu.Unlock()
	c.mu.Lock()
	c.derpMap = m.Clone()
	closed := c.closed
	homeGone := m.regionCode(c.homeDERP) == ""
	c.mu.Unlock()
	if closed {
		return
	}
	c.relayMap = m.keepWorkingRegions(c.relayMap)
	c.mc.SetDERPMap(c.relayMap.toTailcfg())
	// A changed definition of our home region (another relay listed, say)
	// makes magicsock close that connection and forget its home until its
	// next network check, seconds without relayed traffic. With one region
	// there is no choice to measure: go home again at once.
	c.homeOnlyRegion()
	if homeGone {
		go c.recheckHome()
	}
}

// recheckHome re-measures while our home region is missing from the DERP
// map: a network check racing SetDERPMap can leave magicsock on the old
// region until its next periodic check, tens of seconds later.
func (c *Conn) recheckHome() {
	for _, wait := range []time.Duration{time.Second, 3 * time.Second, 10 * time.Second} {
		select {
		case <-time.After(wait):
		case <-c.closeCh:
			return
		}
		c.mu.RLock()
		ok := c.derpMap.regionCode(c.homeDERP) != ""
		c.mu.RUnlock()
		if ok {
			return
		}
		c.mc.ReSTUN("home-derp-not-in-map")
	}
}

// awaitHomeDERP returns once the home relay has admitted us, or after
// homeDERPGrace (direct paths may work without it).
func (c *Conn) awaitHomeDERP(ctx context.Context) error {
	deadline := time.Now().Add(homeDERPGrace)
	for {
		c.mu.RLock()
		home := c.homeDERP
		c.mu.RUnlock()
		if (home != 0 && c.derpConnected(home)) || time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the home relay: %w", ctx.Err())
		case <-c.closeCh:
			return net.ErrClosed
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// The peer table: the peers the coordinator introduced, the engine
// callbacks that read them, the packet filter built from them, and the hold
// on a new peer's endpoints that lets the agent punch first. Every change the
// engine must see goes through configMu, so peers, filter and DERP map are
// reconfigured in one order.

package tailnet

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"go4.org/netipx"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
	"tailscale.com/types/ipproto"
	"tailscale.com/types/key"
	"tailscale.com/types/views"
	"tailscale.com/wgengine"
	"tailscale.com/wgengine/filter"
)

// PeerStatus describes one peer as the engine sees it.
type PeerStatus struct {
	ID        NodeID
	Key       string
	Addresses []netip.Prefix
	// Path is how traffic to the peer travels; its Kind is PathUnknown
	// until the engine has a path.
	Path          PeerPath
	RxBytes       int64
	TxBytes       int64
	LastHandshake time.Time
	Active        bool
}

type peer struct {
	node  *Node
	tsn   *tailcfg.Node
	key   key.NodePublic
	disco key.DiscoPublic
	// holdUntil, while set, is when the peer's endpoints are given to
	// magicsock at the latest; until then it knows only the peer's relay
	// (see holdPeerEndpoints).
	holdUntil time.Time
}

// holdPeerEndpoints is how long a client keeps a new (or restarted) peer's
// direct endpoints from magicsock unless a direct path forms first.
//
// Magicsock pings every endpoint it knows the moment the first packet goes
// out. A client's pings then reach the agent's NAT before the agent's own
// packets do; a router that accepts unsolicited UDP (a Kubernetes node
// masquerading its pods, INPUT policy accept) confirms a conntrack entry
// for that tuple, masquerade gives the agent's flow to the client another
// public port, and the client's router drops it: no direct path, ever, as
// every later ping keeps the bad entry alive. Without the endpoints the
// agent pings first, when it answers our first packet, and calls us through
// the relay (disco CallMeMaybe) with its endpoints; our pings then arrive as
// replies to the agent's flow on its router, and on a home router that
// drops unsolicited UDP nothing changes. After the hold the endpoints are
// given anyway, so a peer that never calls still gets today's attempt.
const holdPeerEndpoints = 5 * time.Second

// punchLead is how long an agent's first pings to a new client's endpoints
// lead its call-me-maybe to that client.
const punchLead = 30 * time.Millisecond

// Engine callbacks: all backed by our peer table, under mu only.

func (c *Conn) peerKeyForIP(ip netip.Addr) (key.NodePublic, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if p, ok := c.byIP[ip]; ok {
		return p.key, true
	}
	return key.NodePublic{}, false
}

func (c *Conn) peerAllowedIPs(k key.NodePublic) ([]netip.Prefix, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if p, ok := c.byKey[k]; ok {
		return slices.Clone(p.node.Addresses), true
	}
	return nil, false
}

func (c *Conn) peerForIP(ip netip.Addr) (wgengine.PeerForIP, bool) {
	for _, a := range c.opts.Addresses {
		if a.Addr() == ip {
			return wgengine.PeerForIP{Node: c.self.View(), IsSelf: true, Route: a}, true
		}
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if p, ok := c.byIP[ip]; ok {
		return wgengine.PeerForIP{Node: p.tsn.View(), Route: netip.PrefixFrom(ip, ip.BitLen())}, true
	}
	return wgengine.PeerForIP{}, false
}

func (c *Conn) isPeerIP(ip netip.Addr) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	_, ok := c.byIP[ip]
	return ok
}

// UpsertPeer adds a peer or updates what we know about it. A peer whose
// disco key changed has restarted; its WireGuard session is reset so the
// next packet starts a fresh handshake.
func (c *Conn) UpsertPeer(n *Node) error {
	if n == nil {
		return errors.New("tailnet: peer node is nil")
	}
	if err := n.Validate(); err != nil {
		return fmt.Errorf("tailnet: peer %d: %w", n.ID, err)
	}
	if n.ID == c.opts.NodeID {
		return fmt.Errorf("tailnet: peer %d has our own node id", n.ID)
	}
	n = n.Clone()
	var nk key.NodePublic
	var dk key.DiscoPublic
	_ = nk.UnmarshalText([]byte(n.Key)) // checked by Validate
	_ = dk.UnmarshalText([]byte(n.DiscoKey))
	if nk == c.priv.Public() {
		return fmt.Errorf("tailnet: peer %d has our own node key", n.ID)
	}

	c.configMu.Lock()
	defer c.configMu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return net.ErrClosed
	}
	for _, a := range n.Addresses {
		for _, own := range c.opts.Addresses {
			if own.Addr() == a.Addr() {
				c.mu.Unlock()
				return fmt.Errorf("tailnet: peer %d claims our own address %v", n.ID, a.Addr())
			}
		}
		if other, ok := c.byIP[a.Addr()]; ok && other.node.ID != n.ID {
			c.mu.Unlock()
			return fmt.Errorf("tailnet: peer %d claims address %v, which belongs to peer %d", n.ID, a.Addr(), other.node.ID)
		}
	}
	// A key that moves to another node ID would be ignored by magicsock; the
	// old holder of the key is dropped first.
	var staleIDs []NodeID
	var staleKeys []key.NodePublic
	if other, ok := c.byKey[nk]; ok && other.node.ID != n.ID {
		staleIDs = append(staleIDs, other.node.ID)
		c.removeLocked(other)
	}
	old := c.peers[n.ID]
	resetSession := false
	filterChanged := old == nil || len(staleIDs) > 0 || !slices.Equal(old.node.Addresses, n.Addresses)
	if old != nil {
		if old.key != nk {
			staleIDs = append(staleIDs, old.node.ID)
			staleKeys = append(staleKeys, old.key)
		} else if old.disco != dk {
			// magicsock keeps the old path on a disco key change and
			// trusts it for seconds; a restarted peer is not there any
			// more, so its endpoint is rebuilt from scratch.
			resetSession = true
			staleIDs = append(staleIDs, old.node.ID)
		}
		c.removeLocked(old)
	}
	tsn := &tailcfg.Node{
		ID:         tailcfg.NodeID(n.ID),
		StableID:   tailcfg.StableNodeID(fmt.Sprint(n.ID)),
		Name:       fmt.Sprintf("node-%d", n.ID),
		Key:        nk,
		DiscoKey:   dk,
		Addresses:  slices.Clone(n.Addresses),
		AllowedIPs: slices.Clone(n.Addresses),
		Endpoints:  slices.Clone(n.Endpoints),
		HomeDERP:   n.HomeDERP,
		Cap:        tailcfg.CurrentCapabilityVersion,
		Hostinfo:   (&tailcfg.Hostinfo{}).View(),
	}
	p := &peer{node: n, tsn: tsn, key: nk, disco: dk}
	if !c.opts.AcceptInbound {
		switch {
		case old == nil || old.disco != dk:
			p.holdUntil = time.Now().Add(holdPeerEndpoints)
		default:
			p.holdUntil = old.holdUntil
		}
	}
	toMagicsock := c.magicsockViewLocked(p)
	c.peers[n.ID] = p
	c.byKey[nk] = p
	for _, a := range n.Addresses {
		c.byIP[a.Addr()] = p
	}
	c.mu.Unlock()

	for _, id := range staleIDs {
		c.mc.RemovePeer(tailcfg.NodeID(id))
	}
	for _, k := range staleKeys {
		c.retireDevicePeer(k)
	}
	c.mc.UpsertPeer(toMagicsock)
	if c.opts.AcceptInbound && len(n.Endpoints) > 0 && (old == nil || old.disco != dk || !slices.Equal(old.node.Endpoints, n.Endpoints)) {
		// Punch first (see holdPeerEndpoints). A disco ping now pings the
		// peer's endpoints at once, before anything makes magicsock call
		// the peer: its answer to the call must find our conntrack entry
		// already there. Then, once our relay has admitted us (before that
		// the call is lost, and magicsock repeats it only 5 s later), a
		// packet through WireGuard makes magicsock ping again and call the
		// peer with our endpoints, even when the peer itself sends only
		// disco pings. That packet is a nudge, which the peer drops without
		// an answer (a TSMP ping's answer, written by the peer's WireGuard
		// receive routine, is one of the waits of the deadlock retire.go
		// describes).
		ip := n.Addresses[0].Addr()
		c.eng.Ping(ip, tailcfg.PingDisco, 0, func(*ipnstate.PingResult) {})
		go func() {
			if c.awaitHomeDERP(context.Background()) != nil {
				return
			}
			select {
			case <-time.After(punchLead):
			case <-c.closeCh:
				return
			}
			c.nudge(ip)
		}()
	}
	if !p.holdUntil.IsZero() {
		select {
		case c.holdNotify <- struct{}{}:
		default:
		}
	}
	if resetSession {
		c.logger.Info("peer restarted (new disco key); resetting WireGuard session", "peer", n.ID)
		c.eng.ResetDevicePeer(nk)
	}
	c.eng.SyncDevicePeer(nk)
	if filterChanged {
		c.updateFilterLocked()
	}
	return nil
}

// magicsockViewLocked is the peer's node as magicsock may see it: without
// endpoints while they are held. c.mu must be held.
func (c *Conn) magicsockViewLocked(p *peer) tailcfg.NodeView {
	if p.holdUntil.IsZero() {
		return p.tsn.View()
	}
	held := *p.tsn
	held.Endpoints = nil
	return held.View()
}

// holdLoop gives held peers' endpoints to magicsock once their path is
// direct (the peer punched first) or their hold has run out.
func (c *Conn) holdLoop() {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-c.closeCh:
			return
		case <-c.holdNotify:
		}
		for c.releaseHeld() {
			select {
			case <-c.closeCh:
				return
			case <-tick.C:
			}
		}
	}
}

// releaseHeld releases the held peers that are due and reports whether
// any are still held.
func (c *Conn) releaseHeld() (stillHeld bool) {
	type heldPeer struct {
		p     *peer
		until time.Time
	}
	c.mu.RLock()
	var held []heldPeer
	for _, p := range c.peers {
		if !p.holdUntil.IsZero() {
			held = append(held, heldPeer{p, p.holdUntil})
		}
	}
	c.mu.RUnlock()
	if len(held) == 0 {
		return false
	}
	st := c.magicsockStatus()
	now := time.Now()
	for _, h := range held {
		p := h.p
		direct := false
		if ps, ok := st[p.key]; ok && ps != nil {
			direct = ps.CurAddr != ""
		}
		if !direct && now.Before(h.until) {
			stillHeld = true
			continue
		}
		c.configMu.Lock()
		c.mu.Lock()
		cur, ok := c.peers[p.node.ID]
		release := ok && cur == p && !c.closed
		if release {
			p.holdUntil = time.Time{}
		}
		c.mu.Unlock()
		if release {
			c.mc.UpsertPeer(p.tsn.View())
			c.logger.Debug("peer endpoints given to magicsock", "peer", p.node.ID, "direct_already", direct)
		}
		c.configMu.Unlock()
	}
	return stillHeld
}

// removeLocked drops p from the tables. c.mu must be held for writing.
func (c *Conn) removeLocked(p *peer) {
	delete(c.peers, p.node.ID)
	if c.byKey[p.key] == p {
		delete(c.byKey, p.key)
	}
	for _, a := range p.node.Addresses {
		if c.byIP[a.Addr()] == p {
			delete(c.byIP, a.Addr())
		}
	}
}

// RemovePeer forgets a peer: its addresses no longer pass the packet
// filter, and its WireGuard session ends (see retireDevicePeer).
func (c *Conn) RemovePeer(id NodeID) {
	c.configMu.Lock()
	defer c.configMu.Unlock()
	c.mu.Lock()
	p, ok := c.peers[id]
	if ok {
		c.removeLocked(p)
	}
	closed := c.closed
	c.mu.Unlock()
	if !ok || closed {
		return
	}
	c.mc.RemovePeer(tailcfg.NodeID(id))
	c.updateFilterLocked()
	c.retireDevicePeer(p.key)
}

// updateFilterLocked installs a packet filter built from the peer table.
// Only our own addresses are local; with AcceptInbound, any known peer may
// open flows to them. configMu must be held.
func (c *Conn) updateFilterLocked() {
	var local netipx.IPSetBuilder
	for _, a := range c.opts.Addresses {
		local.AddPrefix(a)
	}
	localSet, _ := local.IPSet()
	var matches []filter.Match
	if c.opts.AcceptInbound {
		c.mu.RLock()
		var srcs []netip.Prefix
		for _, p := range c.peers {
			srcs = append(srcs, p.node.Addresses...)
		}
		c.mu.RUnlock()
		if len(srcs) > 0 {
			var dsts []filter.NetPortRange
			for _, a := range c.opts.Addresses {
				dsts = append(dsts, filter.NetPortRange{Net: a, Ports: filter.PortRange{First: 0, Last: 65535}})
			}
			matches = append(matches, filter.Match{
				IPProto: views.SliceOf([]ipproto.Proto{ipproto.TCP, ipproto.UDP, ipproto.ICMPv4, ipproto.ICMPv6}),
				Srcs:    srcs,
				Dsts:    dsts,
			})
		}
	}
	// Sharing state keeps the UDP flows we opened alive across updates.
	f := filter.New(matches, nil, localSet, nil, c.filt, c.logf)
	c.filt = f
	c.eng.SetFilter(f)
}

// PeerStatus reports every peer's path and counters.
func (c *Conn) PeerStatus() []PeerStatus {
	st := c.peerStates()
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]PeerStatus, 0, len(c.peers))
	for _, p := range c.peers {
		ps := PeerStatus{ID: p.node.ID, Key: p.node.Key, Addresses: slices.Clone(p.node.Addresses)}
		if s, ok := st[p.key]; ok && s != nil {
			ps.Path = peerPathOf(s, c.derpMap)
			ps.RxBytes, ps.TxBytes = s.RxBytes, s.TxBytes
			ps.LastHandshake = s.LastHandshake
			ps.Active = s.Active
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(a, b PeerStatus) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// magicsockStatus is what magicsock knows of each peer: its path (CurAddr
// when direct), relay, last write and activity.
func (c *Conn) magicsockStatus() map[key.NodePublic]*ipnstate.PeerStatus {
	sb := &ipnstate.StatusBuilder{WantPeers: true}
	c.mc.UpdateStatus(sb)
	return sb.Status().Peer
}

// peerStates is magicsockStatus with WireGuard's byte counters and last
// handshake added per peer, read from the device's peer table under its
// read lock. It never asks the engine for its status snapshot
// (Engine.UpdateStatus, RequestStatus): that takes the WireGuard device's
// peer lock for writing, and a writer waiting there stalls the goroutine
// reading the TUN (one of the waits of the deadlock retire.go describes).
func (c *Conn) peerStates() map[key.NodePublic]*ipnstate.PeerStatus {
	st := c.magicsockStatus()
	for k, ps := range st {
		if wp, ok := c.eng.PeerByKey(k); ok {
			ps.RxBytes, ps.TxBytes = int64(wp.RxBytes()), int64(wp.TxBytes())
			ps.LastHandshake = wp.LastHandshake()
		}
	}
	return st
}

package coordinator

import (
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// peer is one connected session as the core sees it.
type peer struct {
	// version is the protocol version of the session.
	version int
	id      tailnet.NodeID
	role    protocol.Role
	name    string // agent name, or user name for a client
	user    string
	tokenID string
	addrs   []netip.Prefix
	since   time.Time
	remote  string
	// replica is the replica holding the session of a peer connected to
	// another coordinator replica (see core_repl.go); "" for our own.
	replica string

	// out is the bounded queue the session's writer drains. The core never
	// blocks on it: a peer whose queue is full is evicted.
	out chan *protocol.ServerMessage
	// kill ends the session; the error is sent to the peer if possible.
	kill func(*protocol.Error)

	// Guarded by core.mu.
	node    *tailnet.Node
	tunnels map[tailnet.NodeID]string // client: agent ID -> agent name
	// revokedWhy says, for an agent's clients, why the agent was cut off.
	revokedWhy string
}

// core is the coordinator's in-memory picture: who is connected, their
// nodes, and the tunnels between them. It relays nodes only along tunnels.
type core struct {
	mu    sync.Mutex
	peers map[tailnet.NodeID]*peer
	keys  map[string]tailnet.NodeID // node key -> peer holding it
	// clientsOf lists, per agent ID, the clients with a tunnel to it, whether
	// or not the agent is online.
	clientsOf map[tailnet.NodeID]map[tailnet.NodeID]*peer
	// agents remembers, per agent ID, what clients are told about an agent
	// beyond its node: its network verdict and when it went offline. It
	// outlives the agent's session, so a client asking after the agent was
	// lost learns the last thing it said.
	agents map[tailnet.NodeID]*agentState
	evict  []*peer
	// lost remembers clients whose connection broke, with the agents they
	// had tunnels to, for as long as those agents keep their tunnels
	// (protocol.LostGrace): an access decision about such a client must
	// still reach the agents.
	lost map[tailnet.NodeID]*lostClient
	// tunnelsChanged says the tunnel gauge needs recounting. Counting walks
	// every agent, so doing it on each node update made an update storm
	// from N agents cost N² under the lock.
	tunnelsChanged bool
	closed         bool
	onEvict        func(p *peer)
	metrics        *metrics.Coordinator
	// repl, if set, is told of every change to our own peers, to carry it
	// to the other replicas (see core_repl.go). Called with mu held.
	repl func(replEvent)
	// onRevoke drops a revoked peer's relay connections (the DERP server's
	// ClosePeer); called without the lock.
	onRevoke func(nodeKey string)
}

func newCore(m *metrics.Coordinator) *core {
	return &core{
		metrics:   m,
		peers:     map[tailnet.NodeID]*peer{},
		keys:      map[string]tailnet.NodeID{},
		clientsOf: map[tailnet.NodeID]map[tailnet.NodeID]*peer{},
		agents:    map[tailnet.NodeID]*agentState{},
		lost:      map[tailnet.NodeID]*lostClient{},
	}
}

// lostClient is a client whose connection broke, as the agents it had
// tunnels to still know it.
type lostClient struct {
	p      *peer
	agents map[tailnet.NodeID]string // agent ID -> name
	until  time.Time
	// revoked: the remaining agents (offline when it happened) learn it
	// when they reconnect.
	revoked bool
}

// agentState is what the core keeps about an agent across its sessions.
type agentState struct {
	verdict       *protocol.NetworkVerdict
	offlineSince  time.Time
	offlineReason protocol.GoneReason
}

func (c *core) agentLocked(id tailnet.NodeID) *agentState {
	st := c.agents[id]
	if st == nil {
		st = &agentState{}
		c.agents[id] = st
	}
	return st
}

// tunnelStatusLocked describes agent agentID to a client.
func (c *core) tunnelStatusLocked(agentID tailnet.NodeID, name string) *protocol.ServerMessage {
	ts := &protocol.TunnelStatus{
		Agent:     name,
		NodeID:    agentID,
		Addresses: []netip.Prefix{protocol.AgentAddress(agentID)},
		Online:    c.peers[agentID] != nil,
	}
	if st := c.agents[agentID]; st != nil {
		if st.verdict != nil {
			v := *st.verdict
			v.Codes = slices.Clone(v.Codes)
			ts.Network = &v
		}
		if !ts.Online {
			ts.OfflineSince, ts.OfflineReason = st.offlineSince, st.offlineReason
		}
	}
	return &protocol.ServerMessage{Type: protocol.TypeTunnelStatus, TunnelStatus: ts}
}

// agentChangedLocked sends the agent's new tunnel_status to the clients
// tunneled to it that speak version 2 (version 1 has it only as the answer
// to a tunnel request).
func (c *core) agentChangedLocked(agentID tailnet.NodeID) {
	for _, cl := range c.clientsOf[agentID] {
		if cl.version >= 2 {
			c.sendLocked(cl, c.tunnelStatusLocked(agentID, cl.tunnels[agentID]))
		}
	}
}

// setNetwork records an agent's network verdict and tells its clients. It
// returns the history entries newer than the verdict the core had: the ones
// the agent could not deliver when they happened.
func (c *core) setNetwork(p *peer, ns *protocol.NetworkStatus) []protocol.NetworkVerdict {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	if c.peers[p.id] != p {
		return nil
	}
	st := c.agentLocked(p.id)
	var late []protocol.NetworkVerdict
	for _, h := range ns.History {
		if (st.verdict == nil || h.At.After(st.verdict.At)) && h.At.Before(ns.Verdict.At) {
			late = append(late, h)
		}
	}
	v := ns.Verdict
	v.Codes = slices.Clone(v.Codes)
	st.verdict = &v
	c.agentChangedLocked(p.id)
	c.emitLocked(replEvent{kind: evNetwork, p: p, verdict: &v})
	return late
}

// register adds a connected peer. A session already holding the same node
// ID (an agent that reconnected before its old connection timed out, or a
// resumed client) is replaced without telling its peers it left: the new
// session takes over the same node.
func (c *core) register(p *peer) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	c.tunnelsChanged = true
	if c.closed {
		return false
	}
	if old := c.peers[p.id]; old != nil {
		c.dropLocked(old, "")
		old.kill(&protocol.Error{Code: protocol.CodeReplaced, Fatal: true,
			Message: "a newer connection with the same identity replaced this one"})
	}
	p.tunnels = map[tailnet.NodeID]string{}
	c.peers[p.id] = p
	c.emitLocked(replEvent{kind: evUp, p: p})
	// A resumed client is re-checked as a session from now on.
	delete(c.lost, p.id)
	if p.role == protocol.RoleAgent {
		for id, lc := range c.lost {
			if _, ok := lc.agents[p.id]; ok && lc.revoked {
				c.sendLocked(p, goneMessage(lc.p, protocol.GoneRevoked))
				delete(lc.agents, p.id)
				if len(lc.agents) == 0 {
					delete(c.lost, id)
				}
			}
		}
		st := c.agentLocked(p.id)
		st.offlineSince, st.offlineReason = time.Time{}, ""
		c.agentChangedLocked(p.id)
		for _, cl := range c.clientsOf[p.id] {
			if cl.node != nil {
				c.sendLocked(p, peerMessage(cl))
			}
		}
	}
	return true
}

// unregister removes a peer whose session ended and tells the other end of
// each of its tunnels why.
func (c *core) unregister(p *peer, reason protocol.GoneReason) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	if c.peers[p.id] != p {
		return
	}
	if c.closed {
		// Shutting down: say nothing, so peers keep their tailnet traffic
		// flowing while the coordinator is away.
		reason = ""
	}
	c.dropLocked(p, reason)
}

// dropLocked removes p; a non-empty reason is announced to its peers.
func (c *core) dropLocked(p *peer, reason protocol.GoneReason) {
	c.tunnelsChanged = true
	delete(c.peers, p.id)
	c.emitLocked(replEvent{kind: evDown, p: p, reason: reason})
	if p.node != nil && c.keys[p.node.Key] == p.id {
		delete(c.keys, p.node.Key)
	}
	switch p.role {
	case protocol.RoleAgent:
		if reason != "" && p.node != nil {
			for _, cl := range c.clientsOf[p.id] {
				c.sendLocked(cl, goneMessage(p, reason))
			}
		}
		if reason == protocol.GoneRevoked {
			// An access decision about the agent ends its clients' tunnels:
			// they must not wait for it to come back.
			for _, cl := range c.clientsOf[p.id] {
				c.sendLocked(cl, &protocol.ServerMessage{Type: protocol.TypeError, Error: &protocol.Error{
					Code: protocol.CodeForbidden, Agent: p.name, Message: p.revokedWhy,
				}})
				c.untunnelLocked(cl, p.id, "")
			}
		}
		if reason == protocol.GoneLost || reason == protocol.GoneDisconnected {
			st := c.agentLocked(p.id)
			st.offlineSince, st.offlineReason = time.Now(), reason
			c.agentChangedLocked(p.id)
		}
	case protocol.RoleClient:
		if reason == protocol.GoneLost && p.node != nil && len(p.tunnels) > 0 {
			c.lost[p.id] = &lostClient{p: p, agents: maps.Clone(p.tunnels), until: time.Now().Add(protocol.LostGrace)}
		}
		for agentID := range p.tunnels {
			c.untunnelLocked(p, agentID, reason)
		}
	}
}

// lostClients returns the lost clients still within the grace, with the
// agents each had tunnels to, forgetting the expired ones.
func (c *core) lostClients() map[*peer]map[tailnet.NodeID]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[*peer]map[tailnet.NodeID]string{}
	now := time.Now()
	for id, lc := range c.lost {
		if now.After(lc.until) {
			delete(c.lost, id)
			continue
		}
		if !lc.revoked {
			out[lc.p] = maps.Clone(lc.agents)
		}
	}
	return out
}

// revokeLost tells the agents (all of them when agentID is 0) that still
// keep a lost client's tunnel that the client's access ended; agents
// offline now are told when they reconnect.
func (c *core) revokeLost(p *peer, agentID tailnet.NodeID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	lc := c.lost[p.id]
	if lc == nil || lc.p != p {
		return
	}
	for id := range lc.agents {
		if agentID != 0 && id != agentID {
			continue
		}
		if a := c.peers[id]; a != nil {
			c.sendLocked(a, goneMessage(p, protocol.GoneRevoked))
			delete(lc.agents, id)
		}
	}
	if agentID == 0 {
		lc.revoked = true
	}
	if len(lc.agents) == 0 {
		delete(c.lost, p.id)
	}
}

// revoke ends p's session for an access decision (token revoked or
// expired, user or agent deleted): unlike a lost connection, its peers are
// told "revoked" at once so they cut the tunnel now, and its relay
// connections are closed. e is what p itself is told; why is what an
// agent's clients are told.
func (c *core) revoke(p *peer, e *protocol.Error, why string) {
	c.mu.Lock()
	var key string
	if c.peers[p.id] == p {
		if p.node != nil {
			key = p.node.Key
		}
		p.revokedWhy = why
		c.dropLocked(p, protocol.GoneRevoked)
	}
	c.flushLocked()
	onRevoke := c.onRevoke
	c.mu.Unlock()
	p.kill(e)
	if key != "" && onRevoke != nil {
		onRevoke(key)
	}
}

// setNode records p's node and relays it to the other end of p's tunnels.
// It refuses a node key another peer holds.
func (c *core) setNode(p *peer, n *tailnet.Node) *protocol.Error {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	if c.peers[p.id] != p {
		return nil
	}
	if holder, ok := c.keys[n.Key]; ok && holder != p.id {
		return &protocol.Error{Code: protocol.CodeKeyInUse, Fatal: true,
			Message: "node key " + shortKey(n.Key) + " is registered by another peer; each peer needs its own key"}
	}
	if p.node != nil && p.node.Key != n.Key && c.keys[p.node.Key] == p.id {
		delete(c.keys, p.node.Key)
	}
	c.keys[n.Key] = p.id
	p.node = n.Clone()
	c.emitLocked(replEvent{kind: evNode, p: p, node: p.node.Clone()})
	start := time.Now()
	defer func() { c.metrics.ObserveFanout(time.Since(start)) }()
	m := peerMessage(p)
	switch p.role {
	case protocol.RoleAgent:
		for _, cl := range c.clientsOf[p.id] {
			c.sendLocked(cl, m)
		}
	case protocol.RoleClient:
		for agentID := range p.tunnels {
			if a := c.peers[agentID]; a != nil {
				c.sendLocked(a, m)
			}
		}
	}
	return nil
}

// addTunnel joins client cl to agent a; both learn each other's node.
func (c *core) addTunnel(cl *peer, agentID tailnet.NodeID, agentName string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	if c.peers[cl.id] != cl {
		return
	}
	c.tunnelsChanged = true
	cl.tunnels[agentID] = agentName
	if c.clientsOf[agentID] == nil {
		c.clientsOf[agentID] = map[tailnet.NodeID]*peer{}
	}
	c.clientsOf[agentID][cl.id] = cl
	c.emitLocked(replEvent{kind: evTunnel, p: cl, agentID: agentID, agentName: agentName})
	a := c.peers[agentID]
	c.sendLocked(cl, c.tunnelStatusLocked(agentID, agentName))
	if a == nil {
		return
	}
	if a.node != nil {
		c.sendLocked(cl, peerMessage(a))
	}
	if cl.node != nil {
		c.sendLocked(a, peerMessage(cl))
	}
}

// removeTunnel undoes addTunnel at the client's request.
func (c *core) removeTunnel(cl *peer, agentName string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	for id, name := range cl.tunnels {
		if name == agentName {
			c.untunnelLocked(cl, id, protocol.GoneDisconnected)
		}
	}
}

// untunnelLocked removes the tunnel cl -> agentID; a non-empty reason tells
// the agent the client is gone.
func (c *core) untunnelLocked(cl *peer, agentID tailnet.NodeID, reason protocol.GoneReason) {
	c.tunnelsChanged = true
	delete(cl.tunnels, agentID)
	c.emitLocked(replEvent{kind: evUntunnel, p: cl, agentID: agentID, reason: reason})
	if m := c.clientsOf[agentID]; m != nil {
		delete(m, cl.id)
		if len(m) == 0 {
			delete(c.clientsOf, agentID)
		}
	}
	if a := c.peers[agentID]; a != nil && reason != "" && cl.node != nil {
		c.sendLocked(a, goneMessage(cl, reason))
	}
}

// revokeTunnel removes a tunnel that is no longer allowed and tells both
// ends to forget each other; why is the client's one line.
func (c *core) revokeTunnel(cl *peer, agentID tailnet.NodeID, why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	name, ok := cl.tunnels[agentID]
	if !ok || c.peers[cl.id] != cl {
		return
	}
	c.untunnelLocked(cl, agentID, protocol.GoneRevoked)
	if a := c.peers[agentID]; a != nil && a.node != nil {
		c.sendLocked(cl, goneMessage(a, protocol.GoneRevoked))
	}
	c.sendLocked(cl, &protocol.ServerMessage{Type: protocol.TypeError, Error: &protocol.Error{
		Code: protocol.CodeForbidden, Agent: name,
		Message: why + "; ask an admin for a grant (agent admin grant)",
	}})
}

// admits reports whether a node key belongs to a connected peer (DERP
// admission).
func (c *core) admits(nodeKey string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.keys[nodeKey]
	return ok
}

// inUse reports whether a node ID is held by a connected peer.
func (c *core) inUse(id tailnet.NodeID) *peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peers[id]
}

// close stops accepting peers; sessions ending afterwards are not
// announced.
func (c *core) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
}

// snapshot returns the connected peers and, for clients, their tunnels.
func (c *core) snapshot() []admin.PeerInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]admin.PeerInfo, 0, len(c.peers))
	for _, p := range c.peers {
		if p.replica != "" {
			continue // listed by its own replica
		}
		pi := admin.PeerInfo{
			NodeID: p.id, Role: p.role, Name: p.name, User: p.user,
			Since: p.since, Remote: p.remote, HasNode: p.node != nil,
		}
		if p.node != nil {
			pi.HomeDERP = p.node.HomeDERP
			pi.Endpoints = len(p.node.Endpoints)
		}
		if st := c.agents[p.id]; st != nil && st.verdict != nil && p.role == protocol.RoleAgent {
			v := *st.verdict
			v.Codes = slices.Clone(v.Codes)
			pi.Network = &v
		}
		for _, name := range p.tunnels {
			pi.Tunnels = append(pi.Tunnels, name)
		}
		slices.Sort(pi.Tunnels)
		out = append(out, pi)
	}
	slices.SortFunc(out, func(a, b admin.PeerInfo) int {
		if a.Role != b.Role {
			if a.Role == protocol.RoleAgent {
				return -1
			}
			return 1
		}
		if a.Name != b.Name {
			if a.Name < b.Name {
				return -1
			}
			return 1
		}
		return a.Since.Compare(b.Since)
	})
	return out
}

// peersSnapshot returns the connected peers, for re-authorisation.
func (c *core) peersSnapshot() []*peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*peer, 0, len(c.peers))
	for _, p := range c.peers {
		if p.replica == "" { // other replicas check their own
			out = append(out, p)
		}
	}
	return out
}

// tunnelsOf returns a client's tunnels.
func (c *core) tunnelsOf(cl *peer) map[tailnet.NodeID]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[tailnet.NodeID]string, len(cl.tunnels))
	for k, v := range cl.tunnels {
		out[k] = v
	}
	return out
}

// send queues m for p (see sendLocked).
func (c *core) send(p *peer, m *protocol.ServerMessage) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	c.sendLocked(p, m)
}

// sendLocked queues m for p without blocking; a peer that cannot keep up
// is evicted once the current operation is done.
func (c *core) sendLocked(p *peer, m *protocol.ServerMessage) {
	if c.peers[p.id] != p || p.replica != "" {
		return // gone, or its own replica tells it
	}
	select {
	case p.out <- m:
	default:
		if !slices.Contains(c.evict, p) {
			c.evict = append(c.evict, p)
		}
	}
}

// flushLocked evicts slow peers. Evicting one notifies its peers, which can
// overflow further queues, so it loops until nothing is left.
func (c *core) flushLocked() {
	defer func() {
		if c.tunnelsChanged {
			c.tunnelsChanged = false
			c.countTunnelsLocked()
		}
	}()
	for len(c.evict) > 0 {
		p := c.evict[0]
		c.evict = c.evict[1:]
		if c.peers[p.id] != p {
			continue
		}
		p.kill(&protocol.Error{Code: protocol.CodeSlowConsumer, Fatal: true,
			Message: "too many updates queued for this connection; it is not reading fast enough, so the coordinator dropped it"})
		c.dropLocked(p, protocol.GoneLost)
		if c.onEvict != nil {
			c.onEvict(p)
		}
	}
}

// countTunnelsLocked publishes how many tunnels have both ends connected.
func (c *core) countTunnelsLocked() {
	if c.metrics == nil {
		return
	}
	n := 0
	for agentID, clients := range c.clientsOf {
		if c.peers[agentID] != nil {
			n += len(clients)
		}
	}
	c.metrics.SetTunnels(n)
}

func peerMessage(p *peer) *protocol.ServerMessage {
	return &protocol.ServerMessage{Type: protocol.TypePeer, Peer: &protocol.Peer{
		Node: *p.node.Clone(), Role: p.role, Name: p.name, User: p.user,
	}}
}

func goneMessage(p *peer, reason protocol.GoneReason) *protocol.ServerMessage {
	return &protocol.ServerMessage{Type: protocol.TypePeerGone, PeerGone: &protocol.PeerGone{
		NodeID: p.id, Name: p.name, Reason: reason,
	}}
}

func shortKey(k string) string {
	if len(k) > 16 {
		return k[:16] + "…"
	}
	return k
}

package coordinator

import (
	"net/netip"
	"slices"
	"time"

	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// With several replicas, a peer connected to another replica appears in
// our core as a stand-in peer (replica set, no session): our own peers
// relay to it and hear from it through the ordinary core paths, while
// messages queued for it are dropped, since its own replica tells it.

// replEventKind names a change to one of our own peers.
type replEventKind int

const (
	evUp       replEventKind = iota // a session registered
	evDown                          // a session ended (reason "" on shutdown or replacement)
	evNode                          // its node changed
	evNetwork                       // an agent's network verdict changed
	evTunnel                        // a client opened a tunnel
	evUntunnel                      // a client's tunnel closed (reason "" when silent)
)

// replEvent is a change to carry to the other replicas.
type replEvent struct {
	kind      replEventKind
	p         *peer
	node      *tailnet.Node
	verdict   *protocol.NetworkVerdict
	agentID   tailnet.NodeID
	agentName string
	reason    protocol.GoneReason
}

// emitLocked passes a change to one of our own peers to the replicator.
func (c *core) emitLocked(ev replEvent) {
	if c.repl != nil && ev.p.replica == "" {
		c.repl(ev)
	}
}

// remotePeer describes a peer held by another replica.
type remotePeer struct {
	id      tailnet.NodeID
	replica string
	role    protocol.Role
	name    string
	user    string
	node    *tailnet.Node
	verdict *protocol.NetworkVerdict
}

// upsertRemote records the state of a peer held by another replica. A
// session of ours for the same node is stale (the peer reconnected
// elsewhere) and is replaced without telling its tunnel partners it left.
func (c *core) upsertRemote(rp remotePeer) {
	c.mu.Lock()
	p := c.peers[rp.id]
	if p == nil || p.replica != rp.replica {
		c.mu.Unlock()
		p = &peer{
			id: rp.id, role: rp.role, name: rp.name, user: rp.user, replica: rp.replica,
			version: protocol.Version, since: time.Now(), kill: func(*protocol.Error) {},
		}
		if rp.role == protocol.RoleAgent {
			p.addrs = []netip.Prefix{protocol.AgentAddress(rp.id)}
		}
		if !c.register(p) {
			return
		}
		c.mu.Lock()
	}
	c.mu.Unlock()
	if rp.node != nil && (p.node == nil || !nodeEqual(p.node, rp.node)) {
		c.setNode(p, rp.node)
	}
	if rp.verdict != nil {
		c.mu.Lock()
		st := c.agentLocked(p.id)
		if st.verdict == nil || !st.verdict.At.Equal(rp.verdict.At) || st.verdict.Status != rp.verdict.Status {
			v := *rp.verdict
			v.Codes = slices.Clone(v.Codes)
			st.verdict = &v
			c.agentChangedLocked(p.id)
		}
		c.flushLocked()
		c.mu.Unlock()
	}
}

// remote returns the stand-in for a peer held by another replica.
func (c *core) remote(id tailnet.NodeID) *peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.peers[id]; p != nil && p.replica != "" {
		return p
	}
	return nil
}

// local returns our own session for id.
func (c *core) local(id tailnet.NodeID) *peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.peers[id]; p != nil && p.replica == "" {
		return p
	}
	return nil
}

// removeRemote drops the stand-in for id, telling our peers with a tunnel
// to it why (reason "" says nothing).
func (c *core) removeRemote(id tailnet.NodeID, reason protocol.GoneReason) {
	if p := c.remote(id); p != nil {
		c.unregister(p, reason)
	}
}

// remoteTunnel joins a client held by another replica to one of our
// agents.
func (c *core) remoteTunnel(clientID, agentID tailnet.NodeID, agentName string) {
	cl := c.remote(clientID)
	if cl == nil {
		return
	}
	c.mu.Lock()
	_, ok := cl.tunnels[agentID]
	c.mu.Unlock()
	if !ok {
		c.addTunnel(cl, agentID, agentName)
	}
}

// remoteUntunnel closes the tunnel of a client held by another replica.
func (c *core) remoteUntunnel(clientID, agentID tailnet.NodeID, reason protocol.GoneReason) {
	cl := c.remote(clientID)
	if cl == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	if _, ok := cl.tunnels[agentID]; ok && c.peers[cl.id] == cl {
		c.untunnelLocked(cl, agentID, reason)
	}
}

// interested reports whether our own peers care about id: one of our
// clients has a tunnel to it, or it is a stand-in we keep.
func (c *core) interested(id tailnet.NodeID) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.peers[id]; p != nil {
		return true
	}
	for _, cl := range c.clientsOf[id] {
		if cl.replica == "" {
			return true
		}
	}
	return false
}

// remotes lists the stand-ins, for a resynchronisation.
func (c *core) remotes() []*peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*peer
	for _, p := range c.peers {
		if p.replica != "" {
			out = append(out, p)
		}
	}
	return out
}

// locals lists our own sessions with their nodes and tunnels, to publish
// them again after the database forgot them.
func (c *core) locals() []replEvent {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []replEvent
	for _, p := range c.peers {
		if p.replica != "" {
			continue
		}
		out = append(out, replEvent{kind: evUp, p: p})
		if p.node != nil {
			out = append(out, replEvent{kind: evNode, p: p, node: p.node.Clone()})
		}
		if st := c.agents[p.id]; st != nil && st.verdict != nil && p.role == protocol.RoleAgent {
			v := *st.verdict
			out = append(out, replEvent{kind: evNetwork, p: p, verdict: &v})
		}
		for id, name := range p.tunnels {
			out = append(out, replEvent{kind: evTunnel, p: p, agentID: id, agentName: name})
		}
	}
	return out
}

func nodeEqual(a, b *tailnet.Node) bool {
	return a.Key == b.Key && a.DiscoKey == b.DiscoKey && a.HomeDERP == b.HomeDERP && a.AsOf.Equal(b.AsOf) &&
		slices.Equal(a.Endpoints, b.Endpoints) && slices.Equal(a.Addresses, b.Addresses)
}

// dropIfUnused forgets the stand-in for id, without a word to anyone,
// once none of our own peers has a tunnel with it.
func (c *core) dropIfUnused(id tailnet.NodeID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.flushLocked()
	p := c.peers[id]
	if p == nil || p.replica == "" {
		return
	}
	if p.role == protocol.RoleClient && len(p.tunnels) > 0 {
		return
	}
	for _, cl := range c.clientsOf[id] {
		if cl.replica == "" {
			return
		}
	}
	c.dropLocked(p, "")
}

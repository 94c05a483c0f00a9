package coordinator

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// corePeer is a peer whose queue the test drains (or not) by hand.
func corePeer(id tailnet.NodeID, role protocol.Role, name string, queue int) (*peer, *[]*protocol.Error) {
	var killed []*protocol.Error
	addr := protocol.ClientAddress(id)
	if role == protocol.RoleAgent {
		addr = protocol.AgentAddress(id)
	}
	p := &peer{
		id: id, role: role, name: name, user: "u",
		addrs: []netip.Prefix{addr},
		out:   make(chan *protocol.ServerMessage, queue),
	}
	p.kill = func(e *protocol.Error) { killed = append(killed, e) }
	return p, &killed
}

func coreNode(id tailnet.NodeID, keyByte string, home int) *tailnet.Node {
	return &tailnet.Node{
		ID: id, Key: "nodekey:" + strings.Repeat(keyByte, 32), DiscoKey: "discokey:" + strings.Repeat("ee", 32),
		Addresses: []netip.Prefix{protocol.AgentAddress(id)}, HomeDERP: home,
	}
}

func drain(p *peer) []*protocol.ServerMessage {
	var out []*protocol.ServerMessage
	for {
		select {
		case m := <-p.out:
			out = append(out, m)
		default:
			return out
		}
	}
}

// A client that stops reading is evicted when its queue is full; the agent
// and the other clients go on, and the agent is told the slow one is lost.
func TestSlowConsumerEvicted(t *testing.T) {
	c := newCore(nil)
	agent, agentKilled := corePeer(1, protocol.RoleAgent, "ws1", 1024)
	fast, fastKilled := corePeer(2, protocol.RoleClient, "fast", 1024)
	slow, slowKilled := corePeer(3, protocol.RoleClient, "slow", 4)
	for _, p := range []*peer{agent, fast, slow} {
		if !c.register(p) {
			t.Fatal("register refused")
		}
	}
	fastNode := coreNode(2, "bb", 900)
	fastNode.Addresses = fast.addrs
	c.setNode(fast, fastNode)
	slowNode := coreNode(3, "cc", 900)
	slowNode.Addresses = slow.addrs
	c.setNode(slow, slowNode)
	c.addTunnel(fast, 1, "ws1")
	c.addTunnel(slow, 1, "ws1")

	for i := range 50 {
		if e := c.setNode(agent, coreNode(1, "aa", 900+i)); e != nil {
			t.Fatal(e)
		}
		drain(fast)
	}
	if len(*slowKilled) != 1 || (*slowKilled)[0].Code != protocol.CodeSlowConsumer {
		t.Fatalf("slow client kills: %+v", *slowKilled)
	}
	if len(*fastKilled) != 0 || len(*agentKilled) != 0 {
		t.Fatalf("healthy peers were killed: %+v %+v", *fastKilled, *agentKilled)
	}
	if c.inUse(3) != nil || c.admits(slowNode.Key) {
		t.Fatal("evicted client is still registered")
	}
	var lost bool
	for _, m := range drain(agent) {
		if m.Type == protocol.TypePeerGone && m.PeerGone.NodeID == 3 && m.PeerGone.Reason == protocol.GoneLost {
			lost = true
		}
	}
	if !lost {
		t.Fatal("agent was not told the slow client is lost")
	}
	// The fast client still gets updates.
	c.setNode(agent, coreNode(1, "aa", 999))
	msgs := drain(fast)
	if len(msgs) != 1 || msgs[0].Peer.Node.HomeDERP != 999 {
		t.Fatalf("fast client got %+v", msgs)
	}
}

// Evicting a peer notifies others, which may overflow in turn: the cascade
// terminates and leaves a consistent state.
func TestEvictionCascade(t *testing.T) {
	c := newCore(nil)
	agent, agentKilled := corePeer(1, protocol.RoleAgent, "ws1", 1)
	client, clientKilled := corePeer(2, protocol.RoleClient, "c", 1)
	c.register(agent)
	c.register(client)
	cn := coreNode(2, "bb", 900)
	cn.Addresses = client.addrs
	c.setNode(client, cn)
	c.setNode(agent, coreNode(1, "aa", 900))
	c.addTunnel(client, 1, "ws1") // fills both queues of one
	c.setNode(agent, coreNode(1, "aa", 901))
	c.setNode(client, cn)
	if len(*agentKilled)+len(*clientKilled) == 0 {
		t.Fatal("nobody evicted with queues of one")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.evict) != 0 {
		t.Fatal("eviction list not drained")
	}
}

func TestKeyInUse(t *testing.T) {
	c := newCore(nil)
	a1, _ := corePeer(1, protocol.RoleAgent, "ws1", 16)
	a2, _ := corePeer(2, protocol.RoleAgent, "ws2", 16)
	c.register(a1)
	c.register(a2)
	if e := c.setNode(a1, coreNode(1, "aa", 900)); e != nil {
		t.Fatal(e)
	}
	if e := c.setNode(a2, coreNode(2, "aa", 900)); e == nil || e.Code != protocol.CodeKeyInUse {
		t.Fatalf("second holder of a key: %v", e)
	}
	// Rotating one's own key frees the old one.
	c.setNode(a1, coreNode(1, "ab", 900))
	if c.admits(coreNode(1, "aa", 0).Key) || !c.admits(coreNode(1, "ab", 0).Key) {
		t.Fatal("key rotation not reflected in admission")
	}
}

package coordinator_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
)

// fixture: alice owns ws1, bob owns ws2, carol owns nothing.
type fixture struct {
	tc                               *testCoordinator
	ws1Token, ws2Token               string
	aliceToken, bobToken, carolToken string
}

func newFixture(t *testing.T, o coordOpts) *fixture {
	t.Helper()
	tc := startCoordinator(t, t.TempDir(), o)
	a := tc.admin(t)
	for _, u := range []string{"alice", "bob", "carol"} {
		must[store.User](t)(a.CreateUser(t.Context(), u))
	}
	f := &fixture{tc: tc}
	f.ws1Token = must[admin.AgentCreated](t)(a.CreateAgent(t.Context(), "ws1", "alice")).Secret
	f.ws2Token = must[admin.AgentCreated](t)(a.CreateAgent(t.Context(), "ws2", "bob")).Secret
	f.aliceToken = must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})).Secret
	f.bobToken = must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "bob", time.Time{})).Secret
	f.carolToken = must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "carol", time.Time{})).Secret
	return f
}

func TestNodesFlowOnlyAlongTunnels(t *testing.T) {
	f := newFixture(t, coordOpts{})

	ws1 := startClient(t, f.tc, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	if h1.Role != protocol.RoleAgent || h1.Name != "ws1" || h1.User != "alice" {
		t.Fatalf("ws1 hello: %+v", h1)
	}
	if len(h1.Addresses) != 1 || h1.Addresses[0] != protocol.AgentAddress(h1.NodeID) || !protocol.IsAgentAddress(h1.Addresses[0].Addr()) {
		t.Fatalf("ws1 addresses %v, want [%v]", h1.Addresses, protocol.AgentAddress(h1.NodeID))
	}
	if err := h1.DERPMap.Validate(); err != nil {
		t.Fatal(err)
	}
	dn := h1.DERPMap.Regions[0].Nodes[0]
	if dn.HostName != "127.0.0.1" || dn.CertFingerprint != f.tc.Fingerprint() || dn.STUNPort <= 0 {
		t.Fatalf("DERP node %+v: want host 127.0.0.1 (as dialled), the certificate fingerprint and the STUN port", dn)
	}
	ws1Node := fakeNode(t, h1)
	ws1.UpdateNode(ws1Node)

	ws2 := startClient(t, f.tc, f.ws2Token)
	h2 := recv(t, ws2.rec.hellos, "ws2 hello")
	ws2.UpdateNode(fakeNode(t, h2))

	alice := startClient(t, f.tc, f.aliceToken)
	ha := recv(t, alice.rec.hellos, "alice hello")
	if ha.Role != protocol.RoleClient || ha.Name != "alice" || !protocol.IsClientAddress(ha.Addresses[0].Addr()) || ha.ResumeToken == "" {
		t.Fatalf("alice hello: %+v", ha)
	}
	aliceNode := fakeNode(t, ha)
	alice.UpdateNode(aliceNode)
	alice.AddTunnel("ws1")

	ts := recv(t, alice.rec.tunnels, "tunnel status")
	if ts.Agent != "ws1" || ts.NodeID != h1.NodeID || !ts.Online || ts.Addresses[0] != h1.Addresses[0] {
		t.Fatalf("tunnel status %+v", ts)
	}
	p := recv(t, alice.rec.peers, "ws1's node at alice")
	if p.Node.ID != h1.NodeID || p.Node.Key != ws1Node.Key || p.Name != "ws1" || p.Role != protocol.RoleAgent {
		t.Fatalf("alice got %+v", p)
	}
	p = recv(t, ws1.rec.peers, "alice's node at ws1")
	if p.Node.Key != aliceNode.Key || p.Name != "alice" || p.Role != protocol.RoleClient || p.User != "alice" {
		t.Fatalf("ws1 got %+v", p)
	}

	// An update travels along the tunnel, and only there.
	ws1Node2 := ws1Node.Clone()
	ws1Node2.HomeDERP = 901
	ws1.UpdateNode(ws1Node2)
	if p := recv(t, alice.rec.peers, "ws1 update"); p.Node.HomeDERP != 901 {
		t.Fatalf("update not relayed: %+v", p)
	}
	nothing(t, ws2.rec.peers, "node at ws2, which has no tunnel")
	nothing(t, alice.rec.peers, "second node at alice")

	// Without a grant, no tunnel; an unknown agent is named as such.
	bob := startClient(t, f.tc, f.bobToken)
	recv(t, bob.rec.hellos, "bob hello")
	bob.AddTunnel("ws1")
	if e := recv(t, bob.rec.errs, "refusal"); e.Code != protocol.CodeForbidden || e.Agent != "ws1" || e.Fatal {
		t.Fatalf("bob's tunnel to ws1: %+v", e)
	}
	bob.AddTunnel("nosuch")
	if e := recv(t, bob.rec.errs, "refusal"); e.Code != protocol.CodeNoSuchAgent || e.Agent != "nosuch" {
		t.Fatalf("bob's tunnel to nosuch: %+v", e)
	}
	nothing(t, bob.rec.peers, "node at bob")
	nothing(t, ws1.rec.peers, "bob's node at ws1")

	// A grant makes it work, on the same connection.
	must[store.Grant](t)(f.tc.admin(t).AddGrant(t.Context(), "bob", "ws1"))
	bob.RemoveTunnel("ws1")
	bob.AddTunnel("ws1")
	recv(t, bob.rec.tunnels, "bob's tunnel status")
	if p := recv(t, bob.rec.peers, "ws1 at bob"); p.Node.ID != h1.NodeID {
		t.Fatalf("bob got %+v", p)
	}

	// The metrics follow: two agents and two clients connected, two tunnels
	// with both ends up, the two refusals counted.
	for _, want := range []string{
		`coordinator_peers_connected{role="agent"} 2`,
		`coordinator_peers_connected{role="client"} 2`,
		`coordinator_tunnels 2`,
		`coordinator_messages_rejected_total{reason="forbidden"} 1`,
		`coordinator_messages_rejected_total{reason="unknown_peer"} 1`,
	} {
		if got := scrape(t, f.tc); !strings.Contains(got, want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, got)
		}
	}

	// Graceful leave: ws1 is told "disconnected".
	if err := alice.stop(); !errors.Is(err, context.Canceled) {
		t.Fatalf("alice Run: %v", err)
	}
	g := recv(t, ws1.rec.gone, "alice gone")
	if g.NodeID != ha.NodeID || g.Reason != protocol.GoneDisconnected {
		t.Fatalf("gone %+v", g)
	}
	// The tunnel gauge is recounted when tunnels change, not on every
	// message: alice's leaving must still take hers off, and a node update
	// afterwards must leave it alone.
	ws1.UpdateNode(fakeNode(t, h1))
	recv(t, bob.rec.peers, "ws1's new node at bob")
	if got := scrape(t, f.tc); !strings.Contains(got, "coordinator_tunnels 1\n") {
		t.Errorf("after alice left, metrics lack coordinator_tunnels 1:\n%s", got)
	}
}

func TestLostPeerAndReconnectKeepsAgentAddress(t *testing.T) {
	f := newFixture(t, coordOpts{})
	alice := startClient(t, f.tc, f.aliceToken)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	if ts := recv(t, alice.rec.tunnels, "tunnel status"); ts.Online {
		t.Fatalf("ws1 is not connected yet, status says online: %+v", ts)
	}

	// A raw agent that vanishes without a goodbye is "lost".
	raw := dialRaw(t, f.tc, f.ws1Token)
	h := raw.hello(t)
	n := fakeNode(t, h)
	raw.send(t, &protocol.PeerMessage{Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *n}})
	if p := recv(t, alice.rec.peers, "ws1 at alice"); p.Node.Key != n.Key {
		t.Fatalf("got %+v", p)
	}
	raw.conn.CloseNow()
	if g := recv(t, alice.rec.gone, "ws1 gone"); g.Reason != protocol.GoneLost || g.NodeID != h.NodeID {
		t.Fatalf("gone %+v", g)
	}

	// It comes back (new process, new keys): same ID, same address.
	ws1 := startClient(t, f.tc, f.ws1Token)
	h2 := recv(t, ws1.rec.hellos, "ws1 hello")
	if h2.NodeID != h.NodeID || h2.Addresses[0] != h.Addresses[0] {
		t.Fatalf("agent identity changed across reconnect: %v %v -> %v %v", h.NodeID, h.Addresses, h2.NodeID, h2.Addresses)
	}
	n2 := fakeNode(t, h2)
	ws1.UpdateNode(n2)
	if p := recv(t, alice.rec.peers, "ws1 again"); p.Node.Key != n2.Key {
		t.Fatalf("got %+v", p)
	}
	// The agent learns alice's node at once: her tunnel outlived ws1's absence.
	if p := recv(t, ws1.rec.peers, "alice at ws1"); p.Node.ID != ha.NodeID {
		t.Fatalf("got %+v", p)
	}
}

func TestCoordinatorRestart(t *testing.T) {
	dir := t.TempDir()
	tc := startCoordinator(t, dir, coordOpts{})
	a := tc.admin(t)
	must[store.User](t)(a.CreateUser(t.Context(), "alice"))
	ws1Tok := must[admin.AgentCreated](t)(a.CreateAgent(t.Context(), "ws1", "alice"))
	aliceTok := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "alice", time.Time{}))
	fp := tc.Fingerprint()

	ws1 := startClient(t, tc, ws1Tok.Secret)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	if h1.NodeID != ws1Tok.Agent.ID || h1.Addresses[0] != ws1Tok.Address {
		t.Fatalf("hello %+v, admin said id %v address %v", h1, ws1Tok.Agent.ID, ws1Tok.Address)
	}
	n1 := fakeNode(t, h1)
	ws1.UpdateNode(n1)
	alice := startClient(t, tc, aliceTok.Secret)
	ha := recv(t, alice.rec.hellos, "alice hello")
	na := fakeNode(t, ha)
	alice.UpdateNode(na)
	alice.AddTunnel("ws1")
	recv(t, alice.rec.tunnels, "tunnel status")
	recv(t, alice.rec.peers, "ws1 at alice")

	// Stop: nobody is told anyone is gone (traffic between them goes on).
	tc.stop()
	recv(t, ws1.rec.discs, "ws1 disconnected")
	recv(t, alice.rec.discs, "alice disconnected")
	nothing(t, alice.rec.gone, "peer gone at alice during shutdown")
	nothing(t, ws1.rec.gone, "peer gone at ws1 during shutdown")

	// The same data directory, on a new port: the agent keeps its identity
	// and the certificate (so the pin) is unchanged.
	tc2 := startCoordinator(t, dir, coordOpts{})
	if tc2.Fingerprint() != fp {
		t.Fatalf("certificate changed across restart: %s -> %s", fp, tc2.Fingerprint())
	}
	ws1b := startClient(t, tc2, ws1Tok.Secret)
	if h := recv(t, ws1b.rec.hellos, "ws1 hello after restart"); h.NodeID != h1.NodeID || h.Addresses[0] != h1.Addresses[0] {
		t.Fatalf("agent identity changed across coordinator restart")
	}
	snap := must[store.Snapshot](t)(tc2.admin(t).List(t.Context()))
	if len(snap.Users) != 1 || len(snap.Agents) != 1 || len(snap.Tokens) != 2 {
		t.Fatalf("store after restart: %+v", snap)
	}
}

func TestClientReconnectResumesAddressAndTunnels(t *testing.T) {
	dir := t.TempDir()
	// A fixed port, so the same clients reconnect to the restarted server.
	tc := startCoordinator(t, dir, coordOpts{})
	addr := tc.Addr().String()
	a := tc.admin(t)
	must[store.User](t)(a.CreateUser(t.Context(), "alice"))
	ws1Tok := must[admin.AgentCreated](t)(a.CreateAgent(t.Context(), "ws1", "alice")).Secret
	aliceTok := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})).Secret

	ws1 := startClient(t, tc, ws1Tok)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	n1 := fakeNode(t, h1)
	ws1.UpdateNode(n1)
	alice := startClient(t, tc, aliceTok)
	ha := recv(t, alice.rec.hellos, "alice hello")
	na := fakeNode(t, ha)
	alice.UpdateNode(na)
	alice.AddTunnel("ws1")
	recv(t, alice.rec.tunnels, "tunnel status")
	recv(t, alice.rec.peers, "ws1 at alice")
	recv(t, ws1.rec.peers, "alice at ws1")

	tc.stop()
	recv(t, alice.rec.discs, "alice disconnected")
	tc2 := startCoordinator(t, dir, coordOpts{tweak: func(c *coordinator.Config) { c.Listen = addr }})
	_ = tc2

	// Both reconnect on their own, get the same identity, resend their
	// nodes, and the tunnel is re-opened without anyone asking.
	if h := recv(t, alice.rec.hellos, "alice hello after restart"); h.NodeID != ha.NodeID || h.Addresses[0] != ha.Addresses[0] {
		t.Fatalf("client identity not resumed: %v -> %v", ha.NodeID, h.NodeID)
	}
	recv(t, ws1.rec.hellos, "ws1 hello after restart")
	if ts := recv(t, alice.rec.tunnels, "tunnel status after restart"); ts.Agent != "ws1" {
		t.Fatalf("got %+v", ts)
	}
	if p := recv(t, alice.rec.peers, "ws1 at alice after restart"); p.Node.Key != n1.Key {
		t.Fatalf("got %+v", p)
	}
	if p := recv(t, ws1.rec.peers, "alice at ws1 after restart"); p.Node.Key != na.Key {
		t.Fatalf("got %+v", p)
	}
}

func TestTokensRefused(t *testing.T) {
	f := newFixture(t, coordOpts{})
	a := f.tc.admin(t)

	expiresAt := time.Now().Add(3 * time.Second)
	expiring := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "alice", expiresAt))
	revoked := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "alice", time.Time{}))
	must[store.Token](t)(a.RevokeToken(t.Context(), revoked.Token.ID))

	cases := []struct {
		name, token string
		code        protocol.ErrorCode
	}{
		{"missing", "", protocol.CodeTokenMissing},
		{"unknown", "usr_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", protocol.CodeTokenInvalid},
		{"revoked", revoked.Secret, protocol.CodeTokenRevoked},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pc := startClient(t, f.tc, c.token)
			err := pc.runResult(t)
			var perm *coordclient.PermanentError
			if !errors.As(err, &perm) || errCode(err) != c.code {
				t.Fatalf("Run returned %v, want a permanent %s error", err, c.code)
			}
			if !strings.Contains(err.Error(), "token") {
				t.Fatalf("error does not say what is wrong: %v", err)
			}
		})
	}

	// A token that expires during a session ends it for good.
	pc := startClient(t, f.tc, expiring.Secret)
	recv(t, pc.rec.hellos, "hello before expiry")
	// The coordinator re-checks on its interval (30s default); revoke-style
	// changes re-check at once, and an expiry is caught by the next check,
	// so nudge it with an unrelated admin change.
	time.Sleep(time.Until(expiresAt) + 100*time.Millisecond)
	must[store.Token](t)(a.RevokeToken(t.Context(), revoked.Token.ID))
	if err := pc.runResult(t); errCode(err) != protocol.CodeTokenExpired {
		t.Fatalf("Run returned %v, want token_expired", err)
	}
	// And it is refused at the door afterwards.
	pc2 := startClient(t, f.tc, expiring.Secret)
	if err := pc2.runResult(t); errCode(err) != protocol.CodeTokenExpired {
		t.Fatalf("Run returned %v, want token_expired", err)
	}
}

func TestRevocationWhileConnected(t *testing.T) {
	f := newFixture(t, coordOpts{})
	a := f.tc.admin(t)
	must[store.Grant](t)(a.AddGrant(t.Context(), "bob", "ws1"))
	ws1 := startClient(t, f.tc, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	ws1.UpdateNode(fakeNode(t, h1))
	bob := startClient(t, f.tc, f.bobToken)
	hb := recv(t, bob.rec.hellos, "bob hello")
	bob.UpdateNode(fakeNode(t, hb))
	bob.AddTunnel("ws1")
	recv(t, bob.rec.peers, "ws1 at bob")
	recv(t, ws1.rec.peers, "bob at ws1")

	// Withdrawing the grant removes the tunnel at once, on both ends.
	if err := a.RemoveGrant(t.Context(), "bob", "ws1"); err != nil {
		t.Fatal(err)
	}
	if g := recv(t, ws1.rec.gone, "bob revoked at ws1"); g.Reason != protocol.GoneRevoked || g.NodeID != hb.NodeID {
		t.Fatalf("got %+v", g)
	}
	if g := recv(t, bob.rec.gone, "ws1 revoked at bob"); g.Reason != protocol.GoneRevoked {
		t.Fatalf("got %+v", g)
	}
	if e := recv(t, bob.rec.errs, "revocation error"); e.Code != protocol.CodeForbidden {
		t.Fatalf("got %+v", e)
	}

	// Revoking the agent's token disconnects the agent for good.
	snap := must[store.Snapshot](t)(a.List(t.Context()))
	for _, tok := range snap.Tokens {
		if tok.Kind == store.KindAgent && tok.Subject == "ws1" {
			must[store.Token](t)(a.RevokeToken(t.Context(), tok.ID))
		}
	}
	if err := ws1.runResult(t); errCode(err) != protocol.CodeTokenRevoked {
		t.Fatalf("agent Run returned %v, want token_revoked", err)
	}
}

func TestWhoAmIAndPlainHTTP(t *testing.T) {
	f := newFixture(t, coordOpts{insecure: true})
	if !strings.HasPrefix(f.tc.URL(), "http://") || f.tc.Fingerprint() != "" {
		t.Fatalf("insecure coordinator URL %s fingerprint %q", f.tc.URL(), f.tc.Fingerprint())
	}
	hc, err := coordclient.HTTPClient("")
	if err != nil {
		t.Fatal(err)
	}
	who, err := coordclient.WhoAmI(context.Background(), hc, f.tc.URL(), "", true, f.ws1Token)
	if err != nil {
		t.Fatal(err)
	}
	if who.Role != protocol.RoleAgent || who.Name != "ws1" || who.User != "alice" {
		t.Fatalf("whoami %+v", who)
	}
	if _, err := coordclient.WhoAmI(context.Background(), hc, f.tc.URL(), "", true, "usr_nope"); errCode(err) != protocol.CodeTokenInvalid {
		t.Fatalf("whoami with a bad token: %v", err)
	}
	pc := startClient(t, f.tc, f.aliceToken)
	h := recv(t, pc.rec.hellos, "hello over plain HTTP")
	if fp := h.DERPMap.Regions[0].Nodes[0].CertFingerprint; fp != "" {
		t.Fatalf("plain HTTP DERP map carries fingerprint %q", fp)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := hc.Get(f.tc.URL() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s", path, resp.Status)
		}
	}
}

func TestPinning(t *testing.T) {
	f := newFixture(t, coordOpts{})
	// A wrong pin is a permanent, clear error.
	rec := newRecorder()
	c := coordclient.New(coordclient.Config{URL: f.tc.URL(), Token: f.aliceToken,
		Fingerprint: strings.Repeat("ab", 32)}, rec)
	err := c.Run(context.Background())
	var perm *coordclient.PermanentError
	if !errors.As(err, &perm) || !strings.Contains(err.Error(), f.tc.Fingerprint()) {
		t.Fatalf("wrong pin: %v", err)
	}
	// No pin: the self-signed certificate fails system verification.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, _, err = websocket.Dial(ctx, f.tc.URL()+protocol.CoordinatePath, nil)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("dial without pin: %v", err)
	}
}

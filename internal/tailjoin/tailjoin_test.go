package tailjoin_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/internal/tailjoin"
	"github.com/agentd/agent/internal/testkit/coordtest"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.DiscardHandler)
}

// events records what a Joiner's hooks heard.
type events struct {
	peer    chan protocol.Peer
	gone    chan protocol.PeerGone
	removed chan protocol.Peer
}

func newEvents() *events {
	return &events{peer: make(chan protocol.Peer, 16), gone: make(chan protocol.PeerGone, 16), removed: make(chan protocol.Peer, 16)}
}

func (e *events) hooks() tailjoin.Hooks {
	return tailjoin.Hooks{
		Peer:    func(p protocol.Peer) { e.peer <- p },
		Gone:    func(_ protocol.Peer, g protocol.PeerGone) { e.gone <- g },
		Removed: func(p protocol.Peer) { e.removed <- p },
	}
}

func await[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(15 * time.Second):
		t.Fatalf("no %s within 15 s", what)
		panic("unreachable")
	}
}

// join starts a Joiner for role and brings its node up.
func join(t *testing.T, d *coordtest.Deployment, role protocol.Role, token string, ev *events) (*tailjoin.Joiner, *tailnet.Conn) {
	t.Helper()
	j := startJoiner(t, d, role, token, ev)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, _, err := j.Up(ctx, nil)
	if err != nil {
		t.Fatalf("%s: up: %v", role, err)
	}
	return j, conn
}

func startJoiner(t *testing.T, d *coordtest.Deployment, role protocol.Role, token string, ev *events) *tailjoin.Joiner {
	t.Helper()
	j := tailjoin.New(tailjoin.Options{
		Logger:      testLogger().With("side", string(role)),
		Coordinator: coordclient.Config{URL: d.URL, Token: token, Fingerprint: d.Fingerprint, Role: role},
		Tailnet:     tailnet.Options{AcceptInbound: role == protocol.RoleAgent},
		Hooks:       ev.hooks(),
	})
	j.Start(context.Background())
	t.Cleanup(j.Close)
	return j
}

// TestPeerIntroducedBeforeTheNodeIsUp: the coordinator introduces the
// workspace's agent to a client whose tailnet node does not exist yet; the
// node gets the agent when it comes up, and bytes flow both ways.
func TestPeerIntroducedBeforeTheNodeIsUp(t *testing.T) {
	d := coordtest.Start(t, testLogger().With("side", "coordinator"))
	agentEv := newEvents()
	agentJ, agentConn := join(t, d, protocol.RoleAgent, d.AgentToken, agentEv)
	ln, err := agentConn.Listen(4242)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// One connection, echoed.
	go func() {
		if c, err := ln.Accept(); err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()

	clientEv := newEvents()
	cj := startJoiner(t, d, protocol.RoleClient, d.UserToken, clientEv)
	cj.Coordinator().AddTunnel("ws1")
	ag := await(t, clientEv.peer, "introduction of the agent before the client's node is up")
	if ag.Name != "ws1" || ag.Role != protocol.RoleAgent {
		t.Fatalf("introduced %s %q, want agent ws1", ag.Role, ag.Name)
	}
	if cj.Conn() != nil {
		t.Fatal("the client's node is up before Up")
	}
	if p, ok := cj.Peer(ag.Node.ID); !ok || p.Name != "ws1" {
		t.Fatalf("the agent is not kept for the node to come: %v %v", p, ok)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// What a side mounts on its node is in place before the first peer.
	mountedBeforePeers := false
	conn, _, err := cj.Up(ctx, func(c *tailnet.Conn, _ protocol.Hello) error {
		mountedBeforePeers = len(c.PeerStatus()) == 0 && cj.Conn() == nil
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !mountedBeforePeers {
		t.Error("mount ran after peers were installed in the node")
	}
	if !slices.ContainsFunc(conn.PeerStatus(), func(s tailnet.PeerStatus) bool { return s.ID == ag.Node.ID }) {
		t.Fatal("the agent introduced before Up is not installed in the node")
	}
	agentAddr := ag.Node.Addresses[0].Addr()
	if err := conn.AwaitReachable(ctx, agentAddr); err != nil {
		t.Fatalf("agent not reachable: %v", err)
	}
	c, err := conn.DialContextTCP(ctx, netip.AddrPortFrom(agentAddr, 4242))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q, %v", buf, err)
	}

	// The agent knows the client by its tailnet address (the SSH server's
	// session log names the user this way).
	cl := await(t, agentEv.peer, "introduction of the client to the agent")
	if p, ok := agentJ.PeerByAddr(cl.Node.Addresses[0].Addr()); !ok || p.User != "alice" {
		t.Fatalf("agent: peer at the client's address is %+v (%v), want alice's", p, ok)
	}
}

// TestRevokedPeerIsRemoved: revoking the user's token removes the client
// from the agent's node (hooks hear why), and the client's coordination
// ends with the coordinator's permanent refusal.
func TestRevokedPeerIsRemoved(t *testing.T) {
	d := coordtest.Start(t, testLogger().With("side", "coordinator"))
	agentEv := newEvents()
	agentJ, _ := join(t, d, protocol.RoleAgent, d.AgentToken, agentEv)
	clientEv := newEvents()
	cj, _ := join(t, d, protocol.RoleClient, d.UserToken, clientEv)
	cj.Coordinator().AddTunnel("ws1")
	cl := await(t, agentEv.peer, "introduction of the client to the agent")
	agentConn := agentJ.Conn()
	if !slices.ContainsFunc(agentConn.PeerStatus(), func(s tailnet.PeerStatus) bool { return s.ID == cl.Node.ID }) {
		t.Fatal("the client is not installed in the agent's node")
	}

	if _, err := d.Admin.RevokeToken(t.Context(), d.UserTokenID); err != nil {
		t.Fatal(err)
	}
	if g := await(t, agentEv.gone, "word that the client left"); g.NodeID != cl.Node.ID || g.Reason != protocol.GoneRevoked {
		t.Fatalf("gone: %+v, want node %d revoked", g, cl.Node.ID)
	}
	if p := await(t, agentEv.removed, "removal of the client"); p.Node.ID != cl.Node.ID {
		t.Fatalf("removed node %d, want %d", p.Node.ID, cl.Node.ID)
	}
	if _, ok := agentJ.Peer(cl.Node.ID); ok {
		t.Error("the revoked client is still among the agent's peers")
	}
	if slices.ContainsFunc(agentConn.PeerStatus(), func(s tailnet.PeerStatus) bool { return s.ID == cl.Node.ID }) {
		t.Error("the revoked client is still installed in the agent's node")
	}
	await(t, cj.Ended(), "end of the client's coordination")
	var perm *coordclient.PermanentError
	if !errors.As(cj.Err(), &perm) {
		t.Errorf("client's coordination ended with %v, want a permanent refusal", cj.Err())
	}
}

// TestUpEndsWithTheCoordinatorsRefusal: a wrong token ends Up with the
// coordinator's reason rather than waiting for a hello that never comes.
func TestUpEndsWithTheCoordinatorsRefusal(t *testing.T) {
	d := coordtest.Start(t, testLogger().With("side", "coordinator"))
	j := startJoiner(t, d, protocol.RoleAgent, "agt_wrongwrongwrongwrongwrongwrongwrongwrongw", newEvents())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, _, err := j.Up(ctx, nil)
	var perm *coordclient.PermanentError
	if !errors.As(err, &perm) {
		t.Fatalf("up with a wrong token: %v, want a permanent refusal", err)
	}
	if ctx.Err() != nil {
		t.Fatal("Up waited for its context instead of ending with the refusal")
	}
}

// cuttable relays TCP to a target until cut, which breaks every relayed
// connection at once: to the coordinator, a peer whose network died.
type cuttable struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func relayTo(t *testing.T, target string) *cuttable {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &cuttable{ln: ln}
	t.Cleanup(r.cut)
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			r.mu.Lock()
			r.conns = append(r.conns, in, out)
			r.mu.Unlock()
			go func() { io.Copy(out, in); out.Close() }()
			go func() { io.Copy(in, out); in.Close() }()
		}
	}()
	return r
}

func (r *cuttable) cut() {
	r.ln.Close()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.conns {
		c.Close()
	}
}

// TestLostPeerKeptForTheGrace: a client whose coordinator connection
// breaks is "lost": the agent keeps it installed for LostGrace (its tunnel
// works without the coordinator), then removes it.
func TestLostPeerKeptForTheGrace(t *testing.T) {
	const grace = 2 * time.Second
	d := coordtest.Start(t, testLogger().With("side", "coordinator"))
	agentEv := newEvents()
	agentJ, agentConn := upAgent(t, d, tailjoin.Options{LostGrace: grace, Hooks: agentEv.hooks()})
	relay, _ := clientViaRelay(t, d)
	cl := await(t, agentEv.peer, "introduction of the client to the agent")

	relay.cut()
	if g := await(t, agentEv.gone, "word that the client's connection broke"); g.NodeID != cl.Node.ID || g.Reason != protocol.GoneLost {
		t.Fatalf("gone: %+v, want node %d lost", g, cl.Node.ID)
	}
	lostAt := time.Now()
	installed := func() bool {
		return slices.ContainsFunc(agentConn.PeerStatus(), func(s tailnet.PeerStatus) bool { return s.ID == cl.Node.ID })
	}
	if _, ok := agentJ.Peer(cl.Node.ID); !ok || !installed() {
		t.Fatal("the lost client was removed at once; its tunnel should stay for the grace")
	}
	p := await(t, agentEv.removed, "removal of the lost client after the grace")
	if since := time.Since(lostAt); p.Node.ID != cl.Node.ID || since < grace/2 {
		t.Fatalf("removed node %d %v after it was lost; want node %d after %v", p.Node.ID, since, cl.Node.ID, grace)
	}
	if installed() {
		t.Error("the client is still installed after its grace")
	}
}

// TestIdleLostPeersCapped: beyond MaxIdleLost, the idle peer lost longest
// ago goes at once; a busy one (a connection open) stays whatever its age.
func TestIdleLostPeersCapped(t *testing.T) {
	d := coordtest.Start(t, testLogger().With("side", "coordinator"))
	agentEv := newEvents()
	var busyMu sync.Mutex
	busy := map[tailnet.NodeID]bool{}
	hooks := agentEv.hooks()
	hooks.Busy = func(p protocol.Peer) bool {
		busyMu.Lock()
		defer busyMu.Unlock()
		return busy[p.Node.ID]
	}
	_, agentConn := upAgent(t, d, tailjoin.Options{LostGrace: time.Minute, MaxIdleLost: 1, Hooks: hooks})
	type client struct {
		relay *cuttable
		id    tailnet.NodeID
	}
	var clients []client
	for range 3 {
		relay, cconn := clientViaRelay(t, d)
		id := cconn.Node().ID
		for await(t, agentEv.peer, "introduction of a client to the agent").Node.ID != id {
		}
		clients = append(clients, client{relay, id})
	}
	busyMu.Lock()
	busy[clients[0].id] = true
	busyMu.Unlock()
	installed := func(id tailnet.NodeID) bool {
		return slices.ContainsFunc(agentConn.PeerStatus(), func(s tailnet.PeerStatus) bool { return s.ID == id })
	}
	for i, c := range clients {
		c.relay.cut()
		if g := await(t, agentEv.gone, "word that a client's connection broke"); g.NodeID != c.id || g.Reason != protocol.GoneLost {
			t.Fatalf("client %d: gone %+v, want node %d lost (clients %v)", i, g, c.id, clients)
		}
		if i < 2 {
			select {
			case p := <-agentEv.removed:
				t.Fatalf("after %d lost client(s), one busy, node %d was removed; the cap of 1 idle is not reached", i+1, p.Node.ID)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	if p := await(t, agentEv.removed, "removal of the idle client lost first"); p.Node.ID != clients[1].id {
		t.Fatalf("removed node %d, want %d (the idle one lost longest ago; %d is busy)", p.Node.ID, clients[1].id, clients[0].id)
	}
	for i, want := range []bool{true, false, true} {
		if got := installed(clients[i].id); got != want {
			t.Errorf("client %d installed: %v, want %v", i, got, want)
		}
	}
}

// upAgent starts an agent's Joiner with opts (its coordinator and role
// filled in) and brings its node up.
func upAgent(t *testing.T, d *coordtest.Deployment, opts tailjoin.Options) (*tailjoin.Joiner, *tailnet.Conn) {
	t.Helper()
	opts.Logger = testLogger().With("side", "agent")
	opts.Coordinator = coordclient.Config{URL: d.URL, Token: d.AgentToken, Fingerprint: d.Fingerprint, Role: protocol.RoleAgent}
	opts.Tailnet = tailnet.Options{AcceptInbound: true}
	j := tailjoin.New(opts)
	j.Start(context.Background())
	t.Cleanup(j.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, _, err := j.Up(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	return j, conn
}

// clientViaRelay joins a client through a relay to the coordinator that
// the test can cut (the coordinator then reports the client lost) and asks
// for a tunnel to ws1.
func clientViaRelay(t *testing.T, d *coordtest.Deployment) (*cuttable, *tailnet.Conn) {
	t.Helper()
	u, err := url.Parse(d.URL)
	if err != nil {
		t.Fatal(err)
	}
	relay := relayTo(t, u.Host)
	viaRelay := *d
	viaRelay.URL = "https://" + relay.ln.Addr().String()
	cj, conn := join(t, &viaRelay, protocol.RoleClient, d.UserToken, newEvents())
	cj.Coordinator().AddTunnel("ws1")
	return relay, conn
}

// TestMountErrorStopsUp: when a side cannot mount its services, Up fails
// with that error and leaves no node behind.
func TestMountErrorStopsUp(t *testing.T) {
	d := coordtest.Start(t, testLogger().With("side", "coordinator"))
	j := startJoiner(t, d, protocol.RoleAgent, d.AgentToken, newEvents())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errMount := errors.New("listen on tailnet port 1: address in use")
	var mounted *tailnet.Conn
	_, _, err := j.Up(ctx, func(c *tailnet.Conn, _ protocol.Hello) error {
		mounted = c
		return errMount
	})
	if !errors.Is(err, errMount) {
		t.Fatalf("Up: %v, want the mount's error", err)
	}
	if j.Conn() != nil {
		t.Error("a node is left up after the mount failed")
	}
	if _, err := mounted.Listen(4242); err == nil {
		t.Error("the node the mount failed on still accepts listeners; want it closed")
	}
}

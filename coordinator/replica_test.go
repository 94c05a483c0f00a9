package coordinator_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/internal/pgtest"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

const (
	testHeartbeat = 100 * time.Millisecond
	testDeadAfter = time.Second
)

// startReplicas starts n coordinators sharing one fresh database.
func startReplicas(t *testing.T, n int) ([]*testCoordinator, string) {
	t.Helper()
	url := pgtest.Start(t).NewDatabase()
	var out []*testCoordinator
	for range n {
		out = append(out, startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) {
			c.PostgresURL = url
			c.ReplicaHeartbeat = testHeartbeat
			c.ReplicaDeadAfter = testDeadAfter
		}}))
	}
	return out, url
}

// replicaFixture: alice owns ws1, bob has no grant yet.
type replicaFixture struct {
	reps                 []*testCoordinator
	url                  string
	ws1Token, alice, bob string
	adm                  admin.Ops
}

func newReplicaFixture(t *testing.T, n int) *replicaFixture {
	reps, url := startReplicas(t, n)
	return replicaFixtureOn(t, reps, url)
}

func replicaFixtureOn(t *testing.T, reps []*testCoordinator, url string) *replicaFixture {
	t.Helper()
	a := reps[0].admin(t)
	must[store.User](t)(a.CreateUser(t.Context(), "alice"))
	must[store.User](t)(a.CreateUser(t.Context(), "bob"))
	return &replicaFixture{
		reps: reps, url: url, adm: a,
		ws1Token: must[admin.AgentCreated](t)(a.CreateAgent(t.Context(), "ws1", "alice")).Secret,
		alice:    must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})).Secret,
		bob:      must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "bob", time.Time{})).Secret,
	}
}

// tunnelAcross connects ws1 to replica a and alice to replica b with a
// tunnel to ws1, and returns alice's client and ws1's node ID once alice
// has ws1's node.
func (f *replicaFixture) tunnelAcross(t *testing.T, a, b *testCoordinator) (*peerClient, tailnet.NodeID) {
	t.Helper()
	ws1 := startClient(t, a, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	ws1.UpdateNode(fakeNode(t, h1))
	alice := startClient(t, b, f.alice)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	peerFrom(t, alice, h1.NodeID, "ws1's node")
	return alice, h1.NodeID
}

// stopUntilLost stops replica a and returns how long until pc hears that
// peer id, held by a, is lost.
func stopUntilLost(t *testing.T, a *testCoordinator, pc *peerClient, id tailnet.NodeID) time.Duration {
	t.Helper()
	stopped := time.Now()
	a.stop()
	g := goneOf(t, pc, id, "peer lost")
	took := time.Since(stopped)
	if g.Reason != protocol.GoneLost {
		t.Fatalf("told %+v, want lost", g)
	}
	return took
}

// peerFrom waits for a peer update about id, skipping others.
func peerFrom(t *testing.T, pc *peerClient, id tailnet.NodeID, what string) protocol.Peer {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		select {
		case p := <-pc.rec.peers:
			if p.Node.ID == id {
				return p
			}
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func goneOf(t *testing.T, pc *peerClient, id tailnet.NodeID, what string) protocol.PeerGone {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		select {
		case g := <-pc.rec.gone:
			if g.NodeID == id {
				return g
			}
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestReplicasRelayBetweenPeers: an agent on replica A and clients on
// replica B find each other, follow each other's node changes, and hear
// of grants, ungrants and departures.
func TestReplicasRelayBetweenPeers(t *testing.T) {
	f := newReplicaFixture(t, 2)
	a, b := f.reps[0], f.reps[1]

	ws1 := startClient(t, a, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	n1 := fakeNode(t, h1)
	ws1.UpdateNode(n1)

	alice := startClient(t, b, f.alice)
	ha := recv(t, alice.rec.hellos, "alice hello")
	aliceNode := fakeNode(t, ha)
	alice.UpdateNode(aliceNode)
	time.Sleep(100 * time.Millisecond) // let the writes land; the tunnel must not depend on it
	alice.AddTunnel("ws1")
	ts := recv(t, alice.rec.tunnels, "tunnel status")
	if ts.NodeID != h1.NodeID || !ts.Online {
		t.Fatalf("tunnel status across replicas %+v: want ws1 online", ts)
	}
	if p := peerFrom(t, alice, h1.NodeID, "ws1's node on replica B"); p.Node.Key != n1.Key || p.Name != "ws1" || p.Role != protocol.RoleAgent {
		t.Fatalf("alice got %+v", p)
	}
	if p := peerFrom(t, ws1, ha.NodeID, "alice's node on replica A"); p.Node.Key != aliceNode.Key || p.User != "alice" {
		t.Fatalf("ws1 got %+v", p)
	}

	// Node changes follow, both ways.
	n1b := *n1
	n1b.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.51.100.7:41641")}
	n1b.AsOf = n1.AsOf.Add(time.Second)
	ws1.UpdateNode(&n1b)
	if p := peerFrom(t, alice, h1.NodeID, "ws1's new endpoint"); len(p.Node.Endpoints) != 1 || p.Node.Endpoints[0] != n1b.Endpoints[0] {
		t.Fatalf("alice got %+v", p.Node)
	}
	aliceNode2 := *aliceNode
	aliceNode2.HomeDERP = 7
	alice.UpdateNode(&aliceNode2)
	if p := peerFrom(t, ws1, ha.NodeID, "alice's new home"); p.Node.HomeDERP != 7 {
		t.Fatalf("ws1 got %+v", p.Node)
	}

	// The agent's network verdict reaches the client's replica.
	v := protocol.NetworkVerdict{Status: protocol.NetworkDegraded, Summary: "UDP blocked", Codes: []string{"udp-blocked"},
		At: time.Now().UTC().Truncate(time.Millisecond), Since: time.Now().UTC().Truncate(time.Millisecond)}
	ws1.ReportNetwork(v)
	for {
		ts := recv(t, alice.rec.tunnels, "tunnel status with the verdict")
		if ts.Network != nil {
			if ts.Network.Status != v.Status || ts.Network.Summary != v.Summary || !ts.Online {
				t.Fatalf("tunnel status %+v, network %+v", ts, ts.Network)
			}
			break
		}
	}

	// A grant made on replica A lets bob on replica B in; removing it
	// (through the database, from any replica) cuts him off at once.
	bob := startClient(t, b, f.bob)
	hb := recv(t, bob.rec.hellos, "bob hello")
	bob.UpdateNode(fakeNode(t, hb))
	bob.AddTunnel("ws1")
	if e := recv(t, bob.rec.errs, "bob refused"); e.Code != protocol.CodeForbidden {
		t.Fatalf("bob without a grant: %+v", e)
	}
	must[store.Grant](t)(f.adm.AddGrant(t.Context(), "bob", "ws1"))
	bob.AddTunnel("ws1")
	peerFrom(t, bob, h1.NodeID, "ws1's node for bob")
	peerFrom(t, ws1, hb.NodeID, "bob's node for ws1")
	if err := f.adm.RemoveGrant(t.Context(), "bob", "ws1"); err != nil {
		t.Fatal(err)
	}
	if g := goneOf(t, ws1, hb.NodeID, "bob gone from ws1"); g.Reason != protocol.GoneRevoked {
		t.Fatalf("ws1 told %+v, want revoked", g)
	}
	if g := goneOf(t, bob, h1.NodeID, "ws1 gone from bob"); g.Reason != protocol.GoneRevoked {
		t.Fatalf("bob told %+v, want revoked", g)
	}

	// Closing a tunnel on B tells the agent on A.
	alice.RemoveTunnel("ws1")
	if g := goneOf(t, ws1, ha.NodeID, "alice's tunnel closed"); g.Reason != protocol.GoneDisconnected {
		t.Fatalf("ws1 told %+v", g)
	}
	alice.AddTunnel("ws1")
	peerFrom(t, ws1, ha.NodeID, "alice back")

	// Alice leaving replica B is announced to ws1 on replica A.
	alice.stop()
	if g := goneOf(t, ws1, ha.NodeID, "alice gone"); g.Reason != protocol.GoneDisconnected {
		t.Fatalf("ws1 told %+v", g)
	}

	// With no tunnel left between them, neither replica keeps mirroring
	// the other's peers.
	deadline := time.Now().Add(waitFor)
	for coordinator.StandIns(a.Server)+coordinator.StandIns(b.Server) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("stand-ins left: %d on A, %d on B", coordinator.StandIns(a.Server), coordinator.StandIns(b.Server))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStoppedReplicaPeersMarkedLost: when a replica stops heartbeating,
// the others mark its peers lost within a few seconds and tell their
// tunnel partners.
func TestStoppedReplicaPeersMarkedLost(t *testing.T) {
	f := newReplicaFixture(t, 2)
	a, b := f.reps[0], f.reps[1]
	alice, ws1ID := f.tunnelAcross(t, a, b)

	// Replica A stops (its agent keeps retrying A).
	took := stopUntilLost(t, a, alice, ws1ID)
	if took > testDeadAfter+5*time.Second {
		t.Fatalf("ws1 marked lost %v after its replica stopped", took)
	}
	t.Logf("peers of a stopped replica marked lost after %v (dead after %v)", took.Round(time.Millisecond), testDeadAfter)
	ts := recv(t, alice.rec.tunnels, "tunnel status after loss")
	for ts.Online {
		ts = recv(t, alice.rec.tunnels, "tunnel status after loss")
	}
	if ts.OfflineReason != protocol.GoneLost {
		t.Fatalf("tunnel status %+v", ts)
	}
}

// TestStaleReplicaNeverOverwritesMovedPeer races the known HA hazard: an
// agent reconnects to replica B while replica A still holds its old
// session, which keeps sending node updates. Once B holds the agent,
// nothing from A may reach the agent's row or its clients (here on a
// third replica, which knows the agent only from the database).
func TestStaleReplicaNeverOverwritesMovedPeer(t *testing.T) {
	f := newReplicaFixture(t, 3)
	a, b, c := f.reps[0], f.reps[1], f.reps[2]

	alice := startClient(t, c, f.alice)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))

	// The old session, on A, with a long backoff so it does not fight
	// back once replaced.
	oldRec := newRecorder()
	old := coordclient.New(coordclient.Config{URL: a.URL(), Token: f.ws1Token, Fingerprint: a.Fingerprint(),
		Logger: testLogger(t), MinBackoff: time.Minute, MaxBackoff: time.Minute}, oldRec)
	octx, ocancel := context.WithCancel(context.Background())
	odone := make(chan error, 1)
	go func() { odone <- old.Run(octx) }()
	defer func() { ocancel(); <-odone }()
	h1 := recv(t, oldRec.hellos, "old ws1 hello")
	oldNode := fakeNode(t, h1)
	old.UpdateNode(oldNode)
	alice.AddTunnel("ws1")
	if p := peerFrom(t, alice, h1.NodeID, "the old node"); p.Node.Key != oldNode.Key {
		t.Fatalf("alice got %+v", p.Node)
	}

	// A is too busy to notice that the agent reconnects to B...
	release := coordinator.HoldReplicaEvents(a.Server)
	defer release()
	fresh := startClient(t, b, f.ws1Token)
	recv(t, fresh.rec.hellos, "new ws1 hello")
	newNode := fakeNode(t, h1)
	fresh.UpdateNode(newNode)
	if p := peerFrom(t, alice, h1.NodeID, "the new node"); p.Node.Key != newNode.Key {
		t.Fatalf("alice got %+v, want the new node", p.Node)
	}
	// ...while the old session sends an update.
	stale := *oldNode
	stale.AsOf = oldNode.AsOf.Add(time.Minute)
	old.UpdateNode(&stale)
	// A finds out when the database refuses the stale write.
	if e := recv(t, oldRec.errs, "the old session's replacement"); e.Code != protocol.CodeReplaced {
		t.Fatalf("old session told %+v, want replaced", e)
	}
	release()
	ocancel()
	time.Sleep(500 * time.Millisecond)

	// Alice's view: once she saw the new key, never the old one again;
	// and she ends on the new key.
	last, sawNew := newNode.Key, true // peerFrom took the first one
	for drained := false; !drained; {
		select {
		case p := <-alice.rec.peers:
			if p.Node.ID != h1.NodeID {
				continue
			}
			if p.Node.Key == newNode.Key {
				sawNew = true
			} else if sawNew {
				t.Fatalf("alice got the stale node %s after the new one", p.Node.Key)
			}
			last = p.Node.Key
		default:
			drained = true
		}
	}
	if !sawNew || last != newNode.Key {
		t.Fatalf("alice ended with node %s, want the new %s", last, newNode.Key)
	}
	// And the database holds the new session's node.
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, f.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var key string
	if err := conn.QueryRow(ctx, `SELECT node->>'key' FROM peers WHERE id = $1`, int64(h1.NodeID)).Scan(&key); err != nil {
		t.Fatal(err)
	}
	if key != newNode.Key {
		t.Fatalf("the database holds node %s, want the new %s", key, newNode.Key)
	}
}

// TestReapedReplicaPublishesAgain: replica A, cut off long enough for
// the others to reap it while its peers stayed connected, finds out and
// publishes its peers again, without killing their sessions.
func TestReapedReplicaPublishesAgain(t *testing.T) {
	f := newReplicaFixture(t, 2)
	a, b := f.reps[0], f.reps[1]
	ws1 := startClient(t, a, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	n1 := fakeNode(t, h1)
	ws1.UpdateNode(n1)
	alice := startClient(t, b, f.alice)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	peerFrom(t, alice, h1.NodeID, "ws1's node")

	// What the others do to a replica they think dead.
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, f.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `DELETE FROM peers WHERE id = $1`, int64(h1.NodeID)); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `DELETE FROM replicas WHERE id NOT IN (SELECT replica FROM tunnels)`); err != nil {
		t.Fatal(err)
	}

	n2 := *n1
	n2.HomeDERP = 5
	ws1.UpdateNode(&n2)
	nothing(t, ws1.rec.errs, "an error for ws1")
	for {
		p := peerFrom(t, alice, h1.NodeID, "ws1's node published again")
		if p.Node.HomeDERP == 5 {
			break
		}
	}
	var holder string
	if err := conn.QueryRow(ctx, `SELECT replica FROM peers WHERE id = $1`, int64(h1.NodeID)).Scan(&holder); err != nil {
		t.Fatalf("ws1's row after republishing: %v", err)
	}
}

package coordinator_test

import (
	"bufio"
	"crypto/ecdh"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
)

// httpsAdmin is the admin API of tc over HTTPS with token.
func httpsAdmin(t *testing.T, tc *testCoordinator, token string) *admin.Client {
	t.Helper()
	hc, err := coordclient.HTTPClient(tc.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hc.CloseIdleConnections)
	return admin.NewHTTPSClient(tc.URL(), token, hc)
}

// TestAdminOverHTTPSOnAnyReplica: an admin token administers through any
// replica's HTTPS listener; a change made through replica B reaches a
// session held by replica A within the access bound; other tokens, no
// token, and an admin token minting admin tokens are refused in one line;
// an admin token cannot join the tailnet; a revoked one stops at once.
func TestAdminOverHTTPSOnAnyReplica(t *testing.T) {
	f := newReplicaFixture(t, 2)
	a, b := f.reps[0], f.reps[1]
	must[store.User](t)(f.adm.CreateUser(t.Context(), "ops"))
	admTok := must[admin.TokenCreated](t)(f.adm.CreateToken(t.Context(), store.KindAdmin, "ops", time.Time{}))
	if !strings.HasPrefix(admTok.Secret, store.AdminTokenPrefix) {
		t.Fatalf("admin token %q...: want the %s prefix", admTok.Secret[:4], store.AdminTokenPrefix)
	}
	viaB := httpsAdmin(t, b, admTok.Secret)

	// Provision through B: bob gets a grant for ws1.
	must[store.User](t)(viaB.CreateUser(t.Context(), "carol"))
	must[store.Grant](t)(viaB.AddGrant(t.Context(), "bob", "ws1"))
	snap := must[store.Snapshot](t)(httpsAdmin(t, a, admTok.Secret).List(t.Context()))
	if !slices.ContainsFunc(snap.Users, func(u store.User) bool { return u.Name == "carol" }) {
		t.Fatal("a user created through replica B is not listed through replica A")
	}

	// ws1 and bob both on replica A, with a tunnel.
	ws1 := startClient(t, a, f.ws1Token)
	wh := recv(t, ws1.rec.hellos, "ws1 hello")
	ws1.UpdateNode(fakeNode(t, wh))
	bob := startClient(t, a, f.bob)
	bob.UpdateNode(fakeNode(t, recv(t, bob.rec.hellos, "bob hello")))
	bob.AddTunnel("ws1")
	ws1ID := peerFrom(t, bob, wh.NodeID, "ws1's node at bob").Node.ID

	// Ungrant through B: A tells bob at once.
	start := time.Now()
	if err := viaB.RemoveGrant(t.Context(), "bob", "ws1"); err != nil {
		t.Fatal(err)
	}
	g := goneOf(t, bob, ws1ID, "ws1 gone at bob after the ungrant through replica B")
	if took := time.Since(start); took > accessBound {
		t.Errorf("ungrant through replica B reached bob on replica A after %v, want within %v", took, accessBound)
	}
	if g.Reason != protocol.GoneRevoked {
		t.Errorf("bob told %q, want %q", g.Reason, protocol.GoneRevoked)
	}
	t.Logf("ungrant via replica B's HTTPS admin API reached bob on replica A in %v", time.Since(start))

	// Refusals, each one line naming what to do.
	for _, tc := range []struct {
		name, token, want string
	}{
		{"user token", f.alice, "not an admin token"},
		{"agent token", f.ws1Token, "not an admin token"},
		{"no token", "", "no admin token"},
		{"unknown token", store.AdminTokenPrefix + "AAAA", "does not know the token"},
	} {
		_, err := httpsAdmin(t, b, tc.token).List(t.Context())
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: %v, want one line with %q", tc.name, err, tc.want)
		}
	}
	if _, err := viaB.CreateToken(t.Context(), store.KindAdmin, "ops", time.Time{}); err == nil || !strings.Contains(err.Error(), "coordinator's machine") {
		t.Errorf("an admin token minted another admin token: %v", err)
	}
	if _, err := coordclient.WhoAmI(t.Context(), must[*http.Client](t)(coordclient.HTTPClient(b.Fingerprint())), b.URL(), b.Fingerprint(), false, admTok.Secret); err == nil ||
		!strings.Contains(err.Error(), "admin token") {
		t.Errorf("an admin token was taken as a peer's: %v", err)
	}

	// A revoked admin token stops working on every replica.
	must[store.Token](t)(viaB.RevokeToken(t.Context(), admTok.Secret))
	for _, tc := range []*testCoordinator{a, b} {
		if _, err := httpsAdmin(t, tc, admTok.Secret).List(t.Context()); err == nil || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("revoked admin token: %v", err)
		}
	}
}

// TestRevokedPeerRelayClosedOnOtherReplica: a peer coordinated by replica
// A whose relay connection is on replica B's DERP server loses that
// connection when its token is revoked, not only its next admission.
func TestRevokedPeerRelayClosedOnOtherReplica(t *testing.T) {
	f := newReplicaFixture(t, 2)
	a, b := f.reps[0], f.reps[1]
	carol := must[admin.TokenCreated](t)(f.adm.CreateToken(t.Context(), store.KindUser, "alice", time.Time{}))
	priv := registerKey(t, a, carol.Secret)
	conn, br := derpConnectEventually(t, b, priv)
	defer conn.Close()
	conn.SetDeadline(time.Time{}) // only the relay may end it
	ended := relayEnded(br)
	start := time.Now()
	must[store.Token](t)(f.adm.RevokeToken(t.Context(), carol.Token.ID))
	t.Logf("relay connection on the other replica closed %v after the revocation", expectRelayClosed(t, ended, start))
}

// relayEnded reads a relay connection until it ends and says when.
func relayEnded(br *bufio.Reader) <-chan time.Time {
	ended := make(chan time.Time, 1)
	go func() {
		for {
			if _, _, err := readDERPFrame(br); err != nil {
				ended <- time.Now()
				return
			}
		}
	}()
	return ended
}

// expectRelayClosed fails unless the relay connection ended within
// accessBound of start, and returns how long it took.
func expectRelayClosed(t *testing.T, ended <-chan time.Time, start time.Time) time.Duration {
	t.Helper()
	select {
	case at := <-ended:
		took := at.Sub(start)
		if took > accessBound {
			t.Errorf("relay connection closed %v after the revocation, want within %v", took, accessBound)
		}
		return took
	case <-time.After(waitFor):
		t.Fatal("the revoked peer's relay connection stayed open")
		return 0
	}
}

// derpConnectEventually logs in to tc's relay with priv, retrying until
// the key's registration has reached it.
func derpConnectEventually(t *testing.T, tc *testCoordinator, priv *ecdh.PrivateKey) (net.Conn, *bufio.Reader) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		conn, br, ok := derpConnect(t, tc, priv)
		if ok {
			return conn, br
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("the relay refused a registered node key")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

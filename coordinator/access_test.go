package coordinator_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
)

// accessBound is how soon an access decision must reach the peers.
const accessBound = 2 * time.Second

// TestAccessEndsWithinBound checks every kind of access decision: the
// other end hears "revoked" (not "lost") within the bound, and the peer
// cut off gets one line naming the reason.
func TestAccessEndsWithinBound(t *testing.T) {
	cases := []struct {
		name string
		// act withdraws access; it gets the user token's ID.
		act func(t *testing.T, a admin.Ops, userTokenID string)
		// agentCut: the agent is cut off (its clients hear it), not the user.
		agentCut bool
		// userErr is the error code the user's session ends with, "" when
		// only its tunnel ends.
		userErr protocol.ErrorCode
		reason  string
	}{
		{name: "token revoked", userErr: protocol.CodeTokenRevoked, reason: "carol's token was revoked",
			act: func(t *testing.T, a admin.Ops, id string) {
				must[store.Token](t)(a.RevokeToken(t.Context(), id))
			}},
		{name: "user deleted", userErr: protocol.CodeTokenRevoked, reason: "user carol was deleted",
			act: func(t *testing.T, a admin.Ops, _ string) {
				if err := a.DeleteUser(t.Context(), "carol"); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "ungranted", reason: "carol's grant for agent ws1 was withdrawn",
			act: func(t *testing.T, a admin.Ops, _ string) {
				if err := a.RemoveGrant(t.Context(), "carol", "ws1"); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "agent deleted", agentCut: true, reason: "agent ws1 was deleted",
			act: func(t *testing.T, a admin.Ops, _ string) {
				if err := a.DeleteAgent(t.Context(), "ws1"); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "agent token revoked", agentCut: true, reason: "agent ws1's token was revoked",
			act: func(t *testing.T, a admin.Ops, _ string) {
				for _, tok := range must[store.Snapshot](t)(a.List(t.Context())).Tokens {
					if tok.Kind == store.KindAgent && tok.Subject == "ws1" {
						must[store.Token](t)(a.RevokeToken(t.Context(), tok.ID))
					}
				}
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, coordOpts{})
			a := f.tc.admin(t)
			must[store.Grant](t)(a.AddGrant(t.Context(), "carol", "ws1"))
			carolTok := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "carol", time.Time{}))
			ws1, carol := connectPair(t, f, carolTok.Secret)

			// From before the admin call: it returns only after the
			// coordinator acted on it.
			start := time.Now()
			c.act(t, a, carolTok.Token.ID)
			if c.agentCut {
				g := recv(t, carol.rec.gone, "ws1 gone at carol")
				took := time.Since(start)
				t.Logf("the client heard after %v", took)
				if took > accessBound {
					t.Errorf("carol heard after %v, want within %v", took, accessBound)
				}
				if g.Reason != protocol.GoneRevoked {
					t.Fatalf("carol got %+v, want reason revoked", g)
				}
				e := recv(t, carol.rec.errs, "why ws1 is gone")
				if e.Code != protocol.CodeForbidden || e.Agent != "ws1" || !strings.Contains(e.Message, c.reason) {
					t.Fatalf("carol got %+v, want forbidden naming %q", e, c.reason)
				}
				if err := ws1.runResult(t); errCode(err) != protocol.CodeTokenRevoked {
					t.Fatalf("agent Run returned %v, want token_revoked", err)
				}
				return
			}
			g := recv(t, ws1.rec.gone, "carol gone at ws1")
			took := time.Since(start)
			t.Logf("the agent heard after %v", took)
			if took > accessBound {
				t.Errorf("ws1 heard after %v, want within %v", took, accessBound)
			}
			if g.Reason != protocol.GoneRevoked {
				t.Fatalf("ws1 got %+v, want reason revoked", g)
			}
			if c.userErr == "" {
				e := recv(t, carol.rec.errs, "why the tunnel ended")
				if e.Code != protocol.CodeForbidden || !strings.Contains(e.Message, c.reason) {
					t.Fatalf("carol got %+v, want forbidden naming %q", e, c.reason)
				}
				return
			}
			err := carol.runResult(t)
			if errCode(err) != c.userErr || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("carol's Run returned %v, want %s naming %q", err, c.userErr, c.reason)
			}
			// The agent stays connected and is not told anything else.
			nothing(t, ws1.rec.discs, "agent disconnect")
		})
	}
}

// TestExpiryEndsOpenSession: a token expiring during a session ends it when
// it expires, not at the next periodic check (30 s by default).
func TestExpiryEndsOpenSession(t *testing.T) {
	f := newFixture(t, coordOpts{})
	a := f.tc.admin(t)
	must[store.Grant](t)(a.AddGrant(t.Context(), "carol", "ws1"))
	expires := time.Now().Add(1500 * time.Millisecond)
	carolTok := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "carol", expires))
	ws1, carol := connectPair(t, f, carolTok.Secret)
	g := recv(t, ws1.rec.gone, "carol gone at ws1")
	t.Logf("the agent heard %v after the expiry", time.Since(expires))
	if late := time.Since(expires); late > accessBound {
		t.Errorf("ws1 heard %v after the expiry, want within %v", late, accessBound)
	}
	if g.Reason != protocol.GoneRevoked {
		t.Fatalf("ws1 got %+v, want reason revoked", g)
	}
	if err := carol.runResult(t); errCode(err) != protocol.CodeTokenExpired || !strings.Contains(err.Error(), "carol's token expired") {
		t.Fatalf("carol's Run returned %v, want token_expired naming the expiry", err)
	}
}

// connectPair connects ws1 and a client with token, tunneled to ws1, both
// with nodes.
func connectPair(t *testing.T, f *fixture, token string) (ws1, cl *peerClient) {
	t.Helper()
	ws1 = startClient(t, f.tc, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	ws1.UpdateNode(fakeNode(t, h1))
	cl = startClient(t, f.tc, token)
	hc := recv(t, cl.rec.hellos, "client hello")
	cl.UpdateNode(fakeNode(t, hc))
	cl.AddTunnel("ws1")
	recv(t, cl.rec.peers, "ws1 at the client")
	recv(t, ws1.rec.peers, "the client at ws1")
	return ws1, cl
}

// TestTokenRoleMismatchRefused: an agent token used by a client (or a user
// token by an agent) is refused for good with one line, and the real agent
// keeps its session.
func TestTokenRoleMismatchRefused(t *testing.T) {
	f := newFixture(t, coordOpts{})
	ws1, alice := connectPair(t, f, f.aliceToken)
	for _, c := range []struct {
		name, token string
		role        protocol.Role
		says        string
	}{
		{"agent token as user", f.ws1Token, protocol.RoleClient, "agent token of workspace ws1"},
		{"user token as agent", f.bobToken, protocol.RoleAgent, "user token of bob"},
	} {
		t.Run(c.name, func(t *testing.T) {
			rec := newRecorder()
			cc := coordclient.New(coordclient.Config{URL: f.tc.URL(), Token: c.token, Fingerprint: f.tc.Fingerprint(), Role: c.role}, rec)
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			err := cc.Run(ctx)
			var perm *coordclient.PermanentError
			if !errors.As(err, &perm) || errCode(err) != protocol.CodeWrongRole || !strings.Contains(err.Error(), c.says) {
				t.Fatalf("Run returned %v, want a permanent %s saying %q", err, protocol.CodeWrongRole, c.says)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error is not one line: %q", err)
			}
		})
	}
	nothing(t, ws1.rec.discs, "agent disconnect")
	nothing(t, alice.rec.gone, "agent gone at alice")
}

// TestDecisionDuringBlipReachesAgent: a client whose connection broke is
// kept by the agent for the grace; revoking its token (or its grant)
// meanwhile still reaches the agent as "revoked" within the bound.
func TestDecisionDuringBlipReachesAgent(t *testing.T) {
	for _, c := range []struct {
		name string
		act  func(t *testing.T, a admin.Ops, tokenID string)
	}{
		{"token revoked", func(t *testing.T, a admin.Ops, id string) { must[store.Token](t)(a.RevokeToken(t.Context(), id)) }},
		{"ungranted", func(t *testing.T, a admin.Ops, _ string) {
			if err := a.RemoveGrant(t.Context(), "carol", "ws1"); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, coordOpts{})
			a := f.tc.admin(t)
			must[store.Grant](t)(a.AddGrant(t.Context(), "carol", "ws1"))
			carolTok := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "carol", time.Time{}))
			ws1 := startClient(t, f.tc, f.ws1Token)
			ws1.UpdateNode(fakeNode(t, recv(t, ws1.rec.hellos, "ws1 hello")))

			carol := dialRaw(t, f.tc, carolTok.Secret)
			hc := carol.hello(t)
			carol.send(t, &protocol.PeerMessage{Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *fakeNode(t, hc)}})
			carol.send(t, &protocol.PeerMessage{Type: protocol.TypeTunnel, Tunnel: &protocol.TunnelRequest{Agent: "ws1"}})
			recv(t, ws1.rec.peers, "carol at ws1")
			carol.conn.CloseNow() // a blip: no goodbye
			if g := recv(t, ws1.rec.gone, "carol lost at ws1"); g.Reason != protocol.GoneLost {
				t.Fatalf("got %+v, want lost", g)
			}

			start := time.Now()
			c.act(t, a, carolTok.Token.ID)
			g := recv(t, ws1.rec.gone, "carol revoked at ws1")
			t.Logf("the agent heard after %v", time.Since(start))
			if took := time.Since(start); took > accessBound {
				t.Errorf("ws1 heard after %v, want within %v", took, accessBound)
			}
			if g.Reason != protocol.GoneRevoked || g.NodeID != hc.NodeID {
				t.Fatalf("got %+v, want carol revoked", g)
			}
		})
	}
}

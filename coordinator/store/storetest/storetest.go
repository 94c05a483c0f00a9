// Package storetest is the contract every store.Backend keeps: the same
// tests run against the bbolt store and the PostgreSQL store.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator/store"
)

// Opener opens one store's storage; every call opens the same storage
// (the suite closes one before opening the next). Records and token
// expiry use now.
type Opener func(now func() time.Time) (store.Backend, error)

// Run runs the contract. fresh returns an Opener for new, empty storage.
func Run(t *testing.T, fresh func(t *testing.T) Opener) {
	tests := []struct {
		name string
		fn   func(t *testing.T, open Opener)
	}{
		{"SurvivesReopen", testSurvivesReopen},
		{"TokenLifecycle", testTokenLifecycle},
		{"AgentsGrantsAndDeletion", testAgentsGrantsAndDeletion},
		{"ListOrder", testListOrder},
		{"ConcurrentWriters", testConcurrentWriters},
		{"HostKeyPinning", testHostKeyPinning},
		{"AdminTokens", testAdminTokens},
		{"CancelledContext", testCancelledContext},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, fresh(t)) })
	}
}

// clock is a settable clock for expiry tests.
type clock struct{ now atomic.Pointer[time.Time] }

func newClock() *clock {
	c := &clock{}
	c.set(time.Now().UTC().Truncate(time.Microsecond))
	return c
}
func (c *clock) get() time.Time  { return *c.now.Load() }
func (c *clock) set(t time.Time) { c.now.Store(&t) }

func mustOpen(t *testing.T, open Opener, c *clock) store.Backend {
	t.Helper()
	s, err := open(c.get)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func must[T any](t *testing.T) func(v T, err error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func testSurvivesReopen(t *testing.T, open Opener) {
	c := newClock()
	s := mustOpen(t, open, c)
	must[store.User](t)(s.CreateUser(t.Context(), "alice"))
	a, agentSecret, agentTok, err := s.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(agentSecret, store.AgentTokenPrefix) || len(agentSecret) < len(store.AgentTokenPrefix)+43 {
		t.Fatalf("agent token %q: want agt_ and 32 random bytes", agentSecret)
	}
	if agentTok.Hash != store.HashToken(agentSecret) {
		t.Fatal("the token description does not carry the secret's hash")
	}
	userSecret, _, err := s.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(userSecret, store.UserTokenPrefix) {
		t.Fatalf("user token %q", userSecret)
	}
	secret1 := must[[]byte](t)(s.Secret(t.Context(), "resume"))
	if len(secret1) != 32 {
		t.Fatalf("secret of %d bytes", len(secret1))
	}
	if again := must[[]byte](t)(s.Secret(t.Context(), "resume")); string(again) != string(secret1) {
		t.Fatal("Secret changed between two calls")
	}
	if other := must[[]byte](t)(s.Secret(t.Context(), "other")); string(other) == string(secret1) {
		t.Fatal("two named secrets are the same")
	}
	s.Close()

	s2 := mustOpen(t, open, c)
	p, err := s2.Authenticate(t.Context(), agentSecret)
	if err != nil {
		t.Fatal(err)
	}
	if p.Agent == nil || p.Agent.ID != a.ID || p.User.Name != "alice" || p.Token.ID != agentTok.ID || p.Token.Kind != store.KindAgent {
		t.Fatalf("principal after reopening %+v", p)
	}
	if !p.Agent.Created.Equal(a.Created) {
		t.Fatalf("agent created %v after reopening, was %v", p.Agent.Created, a.Created)
	}
	if p, err := s2.Authenticate(t.Context(), userSecret); err != nil || p.Agent != nil || p.User.Name != "alice" {
		t.Fatalf("user principal %+v, %v", p, err)
	}
	if secret2 := must[[]byte](t)(s2.Secret(t.Context(), "resume")); string(secret2) != string(secret1) {
		t.Fatal("resume secret changed across reopening")
	}
	if got, err := s2.AgentByID(t.Context(), a.ID); err != nil || got.Name != "ws1" || got.Owner != "alice" {
		t.Fatalf("AgentByID: %+v %v", got, err)
	}
	if _, err := s2.AgentByID(t.Context(), a.ID+1); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("AgentByID of an unknown id: %v", err)
	}
	if err := s2.CheckToken(t.Context(), agentTok.ID); err != nil {
		t.Fatalf("CheckToken: %v", err)
	}
	if err := s2.CheckToken(t.Context(), "tok_unknown"); !errors.Is(err, store.ErrTokenRevoked) {
		t.Fatalf("CheckToken of an unknown token: %v", err)
	}
}

func testTokenLifecycle(t *testing.T, open Opener) {
	c := newClock()
	s := mustOpen(t, open, c)
	now := c.get()
	must[store.User](t)(s.CreateUser(t.Context(), "alice"))

	if _, _, err := s.CreateToken(t.Context(), store.KindUser, "nobody", time.Time{}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("token for unknown user: %v", err)
	}
	if _, _, err := s.CreateToken(t.Context(), store.KindAgent, "nope", time.Time{}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("token for unknown agent: %v", err)
	}
	if _, _, err := s.CreateToken(t.Context(), "robot", "alice", time.Time{}); err == nil {
		t.Fatal("token of an unknown kind accepted")
	}
	if _, _, err := s.CreateToken(t.Context(), store.KindUser, "alice", now.Add(-time.Minute)); err == nil {
		t.Fatal("token expiring in the past accepted")
	}
	secret, tok, err := s.CreateToken(t.Context(), store.KindUser, "alice", now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), secret); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), secret+"x"); !errors.Is(err, store.ErrTokenInvalid) {
		t.Fatalf("altered token: %v", err)
	}
	if _, err := s.Authenticate(t.Context(), ""); !errors.Is(err, store.ErrTokenInvalid) {
		t.Fatalf("empty token: %v", err)
	}
	c.set(now.Add(2 * time.Hour))
	if _, err := s.Authenticate(t.Context(), secret); !errors.Is(err, store.ErrTokenExpired) {
		t.Fatalf("expired token: %v", err)
	}
	if err := s.CheckToken(t.Context(), tok.ID); !errors.Is(err, store.ErrTokenExpired) {
		t.Fatalf("CheckToken of expired token: %v", err)
	}

	secret2, tok2, err := s.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	// Revoke by the secret itself, then again by ID (idempotent).
	r1, err := s.RevokeToken(t.Context(), secret2)
	if err != nil || r1.ID != tok2.ID || r1.Revoked.IsZero() {
		t.Fatalf("revoke by secret: %+v %v", r1, err)
	}
	if r, err := s.RevokeToken(t.Context(), tok2.ID); err != nil || !r.Revoked.Equal(r1.Revoked) {
		t.Fatalf("second revoke: %+v %v", r, err)
	}
	if _, err := s.Authenticate(t.Context(), secret2); !errors.Is(err, store.ErrTokenRevoked) {
		t.Fatalf("revoked token: %v", err)
	}
	if err := s.CheckToken(t.Context(), tok2.ID); !errors.Is(err, store.ErrTokenRevoked) {
		t.Fatalf("CheckToken of revoked token: %v", err)
	}
	if _, err := s.RevokeToken(t.Context(), "tok_nonexistent"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("revoking unknown token: %v", err)
	}
	if _, err := s.RevokeToken(t.Context(), store.UserTokenPrefix+"nonexistent"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("revoking unknown secret: %v", err)
	}
	snap := must[store.Snapshot](t)(s.List(t.Context()))
	for _, st := range snap.Tokens {
		if st.Hash == "" || strings.Contains(fmt.Sprintf("%+v", st), secret2) {
			t.Fatalf("listed token %+v", st)
		}
	}
}

func testAgentsGrantsAndDeletion(t *testing.T, open Opener) {
	s := mustOpen(t, open, newClock())
	must[store.User](t)(s.CreateUser(t.Context(), "alice"))
	must[store.User](t)(s.CreateUser(t.Context(), "bob"))
	if _, err := s.CreateUser(t.Context(), "alice"); !errors.Is(err, store.ErrExists) {
		t.Fatalf("duplicate user: %v", err)
	}
	if _, err := s.CreateUser(t.Context(), "Bad Name"); err == nil {
		t.Fatal("invalid user name accepted")
	}
	if _, _, _, err := s.CreateAgent(t.Context(), "ws1", "nobody"); !errors.Is(err, store.ErrNotFound) || !strings.Contains(err.Error(), "create the user first") {
		t.Fatalf("agent with unknown owner: %v", err)
	}
	if _, _, _, err := s.CreateAgent(t.Context(), "Bad Name", "alice"); err == nil {
		t.Fatal("invalid agent name accepted")
	}
	a1, agentSecret, _, err := s.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := s.CreateAgent(t.Context(), "ws1", "bob"); !errors.Is(err, store.ErrExists) {
		t.Fatalf("duplicate agent: %v", err)
	}
	a2, _, _, err := s.CreateAgent(t.Context(), "ws2", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if a1.ID == a2.ID || a1.ID == 0 || a1.ID >= 1<<62 {
		t.Fatalf("agent ids %d %d", a1.ID, a2.ID)
	}

	if a, err := s.MayReach(t.Context(), "alice", "ws1"); err != nil || a.ID != a1.ID {
		t.Fatalf("owner refused: %+v %v", a, err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "ws1"); !errors.Is(err, store.ErrForbidden) {
		t.Fatalf("bob without grant: %v", err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("unknown agent: %v", err)
	}
	if _, err := s.AddGrant(t.Context(), "carol", "ws1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("grant for unknown user: %v", err)
	}
	if _, err := s.AddGrant(t.Context(), "bob", "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("grant on unknown agent: %v", err)
	}
	if g, err := s.AddGrant(t.Context(), "bob", "ws1"); err != nil || g.User != "bob" || g.Agent != "ws1" {
		t.Fatalf("grant: %+v %v", g, err)
	}
	if _, err := s.AddGrant(t.Context(), "bob", "ws1"); !errors.Is(err, store.ErrExists) {
		t.Fatalf("duplicate grant: %v", err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "ws1"); err != nil {
		t.Fatalf("bob with grant: %v", err)
	}
	if err := s.RemoveGrant(t.Context(), "bob", "ws1"); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveGrant(t.Context(), "bob", "ws1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("removing a missing grant: %v", err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "ws1"); !errors.Is(err, store.ErrForbidden) {
		t.Fatalf("bob after ungrant: %v", err)
	}

	if err := s.DeleteUser(t.Context(), "alice"); err == nil || !strings.Contains(err.Error(), "ws1, ws2") {
		t.Fatalf("deleting an owner of agents: %v", err)
	}
	if err := s.DeleteUser(t.Context(), "carol"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("deleting an unknown user: %v", err)
	}
	if err := s.DeleteAgent(t.Context(), "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("deleting an unknown agent: %v", err)
	}
	must[store.Grant](t)(s.AddGrant(t.Context(), "bob", "ws1"))
	if err := s.DeleteAgent(t.Context(), "ws1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), agentSecret); !errors.Is(err, store.ErrTokenInvalid) {
		t.Fatalf("deleted agent's token: %v", err)
	}
	snap := must[store.Snapshot](t)(s.List(t.Context()))
	if len(snap.Grants) != 0 || len(snap.Agents) != 1 || len(snap.Tokens) != 1 {
		t.Fatalf("after deleting ws1: %+v", snap)
	}
	// The name can be reused, with a new identity.
	a3, _, _, err := s.CreateAgent(t.Context(), "ws1", "bob")
	if err != nil || a3.ID == a1.ID {
		t.Fatalf("recreated agent %+v %v", a3, err)
	}
	if s.IsAgentID(t.Context(), a1.ID) || !s.IsAgentID(t.Context(), a3.ID) {
		t.Fatal("IsAgentID does not follow deletion")
	}

	// Deleting a user takes their grants and tokens along.
	bobSecret, _, err := s.CreateToken(t.Context(), store.KindUser, "bob", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	must[store.Grant](t)(s.AddGrant(t.Context(), "bob", "ws2"))
	if err := s.DeleteAgent(t.Context(), "ws1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteUser(t.Context(), "bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), bobSecret); !errors.Is(err, store.ErrTokenInvalid) {
		t.Fatalf("deleted user's token: %v", err)
	}
	snap = must[store.Snapshot](t)(s.List(t.Context()))
	if len(snap.Grants) != 0 || len(snap.Users) != 1 {
		t.Fatalf("after deleting bob: %+v", snap)
	}
}

func testListOrder(t *testing.T, open Opener) {
	c := newClock()
	s := mustOpen(t, open, c)
	if snap := must[store.Snapshot](t)(s.List(t.Context())); snap.Users != nil || snap.Agents != nil || snap.Grants != nil || snap.Tokens != nil {
		t.Fatalf("empty store lists %+v", snap)
	}
	for _, u := range []string{"zed", "bob", "alice", "al-x"} {
		must[store.User](t)(s.CreateUser(t.Context(), u))
	}
	for _, a := range []string{"ws-a", "ws-9", "ws-10"} {
		if _, _, _, err := s.CreateAgent(t.Context(), a, "bob"); err != nil {
			t.Fatal(err)
		}
		c.set(c.get().Add(time.Second))
	}
	must[store.Grant](t)(s.AddGrant(t.Context(), "zed", "ws-a"))
	must[store.Grant](t)(s.AddGrant(t.Context(), "alice", "ws-9"))
	must[store.Grant](t)(s.AddGrant(t.Context(), "alice", "ws-10"))
	must[store.Grant](t)(s.AddGrant(t.Context(), "al-x", "ws-a"))
	snap := must[store.Snapshot](t)(s.List(t.Context()))
	var got []string
	for _, u := range snap.Users {
		got = append(got, u.Name)
	}
	for _, a := range snap.Agents {
		got = append(got, a.Name)
	}
	for _, g := range snap.Grants {
		got = append(got, g.User+">"+g.Agent)
	}
	for _, tk := range snap.Tokens {
		got = append(got, tk.Subject)
	}
	// Byte order, as bbolt keys sort (not a locale's order).
	want := "al-x alice bob zed ws-10 ws-9 ws-a al-x>ws-a alice>ws-10 alice>ws-9 zed>ws-a ws-10 ws-9 ws-a"
	if strings.Join(got, " ") != want {
		t.Fatalf("listed\n %s\nwant\n %s", strings.Join(got, " "), want)
	}
}

// testConcurrentWriters races writers on one store: each name is created
// once, and nothing half-made is left behind.
func testConcurrentWriters(t *testing.T, open Opener) {
	s := mustOpen(t, open, newClock())
	must[store.User](t)(s.CreateUser(t.Context(), "alice"))
	const workers, names = 8, 6
	var created, exists atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, workers*names)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range names {
				_, _, _, err := s.CreateAgent(t.Context(), fmt.Sprintf("ws%d", n), "alice")
				switch {
				case err == nil:
					created.Add(1)
				case errors.Is(err, store.ErrExists):
					exists.Add(1)
				default:
					errc <- err
				}
				if _, err := s.Secret(t.Context(), "shared"); err != nil {
					errc <- err
				}
				if _, _, err := s.CreateToken(t.Context(), store.KindUser, "alice", time.Time{}); err != nil {
					errc <- fmt.Errorf("worker %d: %w", w, err)
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if created.Load() != names || exists.Load() != (workers-1)*names {
		t.Fatalf("%d created and %d refused as existing; want %d and %d", created.Load(), exists.Load(), names, (workers-1)*names)
	}
	snap := must[store.Snapshot](t)(s.List(t.Context()))
	agentTokens := 0
	for _, tk := range snap.Tokens {
		if tk.Kind == store.KindAgent {
			agentTokens++
		}
	}
	if len(snap.Agents) != names || agentTokens != names || len(snap.Tokens) != names+workers*names {
		t.Fatalf("%d agents, %d agent tokens, %d tokens", len(snap.Agents), agentTokens, len(snap.Tokens))
	}
}

// testHostKeyPinning: the first key presented with an agent token is
// pinned and vouched for; another is refused until ResetIdentity, which
// keeps the vouched key until a new one is pinned.
func testHostKeyPinning(t *testing.T, open Opener) {
	c := newClock()
	s := mustOpen(t, open, c)
	if _, err := s.CreateUser(t.Context(), "alice"); err != nil {
		t.Fatal(err)
	}
	_, _, tok, err := s.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.PinHostKey(t.Context(), tok.ID, "key-A"); err != nil || got != "key-A" {
		t.Fatalf("first pin = %q, %v; want key-A, nil", got, err)
	}
	if got, err := s.PinHostKey(t.Context(), tok.ID, "key-A"); err != nil || got != "key-A" {
		t.Fatalf("same key again = %q, %v; want key-A, nil", got, err)
	}
	got, err := s.PinHostKey(t.Context(), tok.ID, "key-B")
	if !errors.Is(err, store.ErrIdentityMismatch) || got != "key-A" {
		t.Fatalf("other key = %q, %v; want key-A, ErrIdentityMismatch", got, err)
	}
	_, utok, err := s.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.PinHostKey(t.Context(), utok.ID, "key-A"); err == nil {
		t.Fatal("pinning a host key on a user token succeeded")
	}
	if err := s.ResetIdentity(t.Context(), "nobody"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("ResetIdentity of a missing agent = %v, want ErrNotFound", err)
	}
	if err := s.ResetIdentity(t.Context(), "ws1"); err != nil {
		t.Fatal(err)
	}
	snap, err := s.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Agents) != 1 || snap.Agents[0].HostKey != "key-A" {
		t.Fatalf("after reset the vouched key = %+v, want key-A kept until a new pin", snap.Agents)
	}
	if got, err := s.PinHostKey(t.Context(), tok.ID, "key-B"); err != nil || got != "key-B" {
		t.Fatalf("pin after reset = %q, %v; want key-B, nil", got, err)
	}
	snap, err = s.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if snap.Agents[0].HostKey != "key-B" {
		t.Fatalf("vouched key after re-pin = %q, want key-B", snap.Agents[0].HostKey)
	}
}

// testAdminTokens: an admin token belongs to an existing user, says it is
// an admin token when presented, is revoked by its secret like any other,
// and goes with its user.
func testAdminTokens(t *testing.T, open Opener) {
	c := newClock()
	s := mustOpen(t, open, c)
	if _, _, err := s.CreateToken(t.Context(), store.KindAdmin, "nobody", time.Time{}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("admin token for an unknown user: %v", err)
	}
	must[store.User](t)(s.CreateUser(t.Context(), "root-ops"))
	secret, tok, err := s.CreateToken(t.Context(), store.KindAdmin, "root-ops", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(secret, store.AdminTokenPrefix) || tok.Kind != store.KindAdmin || tok.Subject != "root-ops" {
		t.Fatalf("admin token %q %+v: want adm_ prefix, kind admin, subject root-ops", secret[:4], tok)
	}
	p, err := s.Authenticate(t.Context(), secret)
	if err != nil || p.Token.Kind != store.KindAdmin || p.User.Name != "root-ops" || p.Agent != nil {
		t.Fatalf("Authenticate(admin token) = %+v, %v", p, err)
	}
	if r, err := s.RevokeToken(t.Context(), secret); err != nil || r.ID != tok.ID {
		t.Fatalf("revoke an admin token by its secret: %+v %v", r, err)
	}
	if _, err := s.Authenticate(t.Context(), secret); !errors.Is(err, store.ErrTokenRevoked) {
		t.Fatalf("revoked admin token: %v", err)
	}
	secret2, tok2 := must2(t)(s.CreateToken(t.Context(), store.KindAdmin, "root-ops", time.Time{}))
	if err := s.DeleteUser(t.Context(), "root-ops"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), secret2); err == nil {
		t.Fatal("an admin token outlived its user")
	}
	for _, st := range must[store.Snapshot](t)(s.List(t.Context())).Tokens {
		if st.ID == tok2.ID {
			t.Fatalf("deleted user's admin token still listed: %+v", st)
		}
	}
}

func must2(t *testing.T) func(secret string, tok store.Token, err error) (string, store.Token) {
	return func(secret string, tok store.Token, err error) (string, store.Token) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return secret, tok
	}
}

// testCancelledContext: an operation whose request was cancelled fails
// with the cancellation, changes nothing, and leaves the store serving.
func testCancelledContext(t *testing.T, open Opener) {
	s := mustOpen(t, open, newClock())
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := s.CreateUser(ctx, "alice"); !errors.Is(err, context.Canceled) {
		t.Fatalf("CreateUser with a cancelled context: %v, want context.Canceled", err)
	}
	if _, err := s.List(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("List with a cancelled context: %v, want context.Canceled", err)
	}
	if !s.IsAgentID(ctx, 1) {
		t.Fatal("IsAgentID with a cancelled context said no: a store that cannot tell must say yes")
	}
	snap := must[store.Snapshot](t)(s.List(t.Context()))
	if len(snap.Users) != 0 {
		t.Fatalf("the cancelled CreateUser created %+v", snap.Users)
	}
	must[store.User](t)(s.CreateUser(t.Context(), "alice"))
}

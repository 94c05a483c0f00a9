package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestSurvivesRestartAndKeepsOnlyHashes(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	if _, err := s.CreateUser(t.Context(), "alice"); err != nil {
		t.Fatal(err)
	}
	a, agentSecret, agentTok, err := s.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(agentSecret, AgentTokenPrefix) || len(agentSecret) < len(AgentTokenPrefix)+43 {
		t.Fatalf("agent token %q: want agt_ and 32 random bytes", agentSecret)
	}
	userSecret, _, err := s.CreateToken(t.Context(), KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(userSecret, UserTokenPrefix) {
		t.Fatalf("user token %q", userSecret)
	}
	if _, err := s.Secret(t.Context(), "resume"); err != nil {
		t.Fatal(err)
	}
	secret1, _ := s.Secret(t.Context(), "resume")
	s.Close()

	// Only hashes on disk.
	raw, err := os.ReadFile(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{agentSecret, userSecret, agentSecret[len(AgentTokenPrefix):]} {
		if strings.Contains(string(raw), secret) {
			t.Fatal("a token secret is stored in the clear")
		}
	}
	if !strings.Contains(string(raw), HashToken(agentSecret)) {
		t.Fatal("token hash not found in the file")
	}
	if st, _ := os.Stat(filepath.Join(dir, FileName)); st.Mode().Perm() != 0o600 {
		t.Fatalf("store file mode %v, want 0600", st.Mode().Perm())
	}

	s2 := open(t, dir)
	p, err := s2.Authenticate(t.Context(), agentSecret)
	if err != nil {
		t.Fatal(err)
	}
	if p.Agent == nil || p.Agent.ID != a.ID || p.User.Name != "alice" || p.Token.ID != agentTok.ID {
		t.Fatalf("principal after restart %+v", p)
	}
	if p, err := s2.Authenticate(t.Context(), userSecret); err != nil || p.Agent != nil || p.User.Name != "alice" {
		t.Fatalf("user principal %+v, %v", p, err)
	}
	if secret2, _ := s2.Secret(t.Context(), "resume"); string(secret2) != string(secret1) {
		t.Fatal("resume secret changed across restart")
	}
	if got, err := s2.AgentByID(t.Context(), a.ID); err != nil || got.Name != "ws1" {
		t.Fatalf("AgentByID: %+v %v", got, err)
	}
}

func TestLockedWhileOpen(t *testing.T) {
	dir := t.TempDir()
	open(t, dir)
	start := time.Now()
	_, err := Open(dir)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("second open did not fail fast")
	}
}

func TestTokenLifecycle(t *testing.T) {
	s := open(t, t.TempDir())
	now := time.Now().UTC()
	s.now = func() time.Time { return now }
	s.CreateUser(t.Context(), "alice")

	if _, _, err := s.CreateToken(t.Context(), KindUser, "nobody", time.Time{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("token for unknown user: %v", err)
	}
	if _, _, err := s.CreateToken(t.Context(), KindUser, "alice", now.Add(-time.Minute)); err == nil {
		t.Fatal("token expiring in the past accepted")
	}
	secret, tok, err := s.CreateToken(t.Context(), KindUser, "alice", now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), secret); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), secret+"x"); !errors.Is(err, ErrTokenInvalid) {
		t.Fatalf("altered token: %v", err)
	}
	now = now.Add(2 * time.Hour)
	if _, err := s.Authenticate(t.Context(), secret); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("expired token: %v", err)
	}
	if err := s.CheckToken(t.Context(), tok.ID); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("CheckToken of expired token: %v", err)
	}

	secret2, tok2, _ := s.CreateToken(t.Context(), KindUser, "alice", time.Time{})
	// Revoke by the secret itself, then again by ID (idempotent).
	if _, err := s.RevokeToken(t.Context(), secret2); err != nil {
		t.Fatal(err)
	}
	if r, err := s.RevokeToken(t.Context(), tok2.ID); err != nil || r.Revoked.IsZero() {
		t.Fatalf("second revoke: %+v %v", r, err)
	}
	if _, err := s.Authenticate(t.Context(), secret2); !errors.Is(err, ErrTokenRevoked) {
		t.Fatalf("revoked token: %v", err)
	}
	if _, err := s.RevokeToken(t.Context(), "tok_nonexistent"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("revoking unknown token: %v", err)
	}
}

func TestAgentsGrantsAndDeletion(t *testing.T) {
	s := open(t, t.TempDir())
	s.CreateUser(t.Context(), "alice")
	s.CreateUser(t.Context(), "bob")
	if _, err := s.CreateUser(t.Context(), "alice"); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate user: %v", err)
	}
	if _, err := s.CreateUser(t.Context(), "Bad Name"); err == nil {
		t.Fatal("invalid user name accepted")
	}
	if _, _, _, err := s.CreateAgent(t.Context(), "ws1", "nobody"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "create the user first") {
		t.Fatalf("agent with unknown owner: %v", err)
	}
	a1, agentSecret, _, err := s.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := s.CreateAgent(t.Context(), "ws1", "bob"); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate agent: %v", err)
	}
	a2, _, _, _ := s.CreateAgent(t.Context(), "ws2", "alice")
	if a1.ID == a2.ID || a1.ID == 0 || a1.ID >= 1<<62 {
		t.Fatalf("agent ids %d %d", a1.ID, a2.ID)
	}

	if _, err := s.MayReach(t.Context(), "alice", "ws1"); err != nil {
		t.Fatalf("owner refused: %v", err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "ws1"); !errors.Is(err, ErrForbidden) {
		t.Fatalf("bob without grant: %v", err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown agent: %v", err)
	}
	if _, err := s.AddGrant(t.Context(), "bob", "ws1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AddGrant(t.Context(), "bob", "ws1"); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate grant: %v", err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "ws1"); err != nil {
		t.Fatalf("bob with grant: %v", err)
	}
	if err := s.RemoveGrant(t.Context(), "bob", "ws1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.MayReach(t.Context(), "bob", "ws1"); !errors.Is(err, ErrForbidden) {
		t.Fatalf("bob after ungrant: %v", err)
	}

	if err := s.DeleteUser(t.Context(), "alice"); err == nil || !strings.Contains(err.Error(), "ws1") {
		t.Fatalf("deleting an owner of agents: %v", err)
	}
	s.AddGrant(t.Context(), "bob", "ws1")
	if err := s.DeleteAgent(t.Context(), "ws1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(t.Context(), agentSecret); !errors.Is(err, ErrTokenInvalid) {
		t.Fatalf("deleted agent's token: %v", err)
	}
	snap, _ := s.List(t.Context())
	if len(snap.Grants) != 0 || len(snap.Agents) != 1 {
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
}

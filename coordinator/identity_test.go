package coordinator_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

func newHostKey(t *testing.T) gossh.Signer {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := gossh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// proveWith signs the challenge with signer and presents claimed (nil:
// signer's own key) as the host key.
func proveWith(signer gossh.Signer, claimed gossh.PublicKey) func(string) (*protocol.AgentIdentity, error) {
	if claimed == nil {
		claimed = signer.PublicKey()
	}
	return func(ch string) (*protocol.AgentIdentity, error) {
		sig, err := signer.Sign(rand.Reader, protocol.IdentityMessage(ch))
		if err != nil {
			return nil, err
		}
		return &protocol.AgentIdentity{
			HostKey:   strings.TrimSpace(string(gossh.MarshalAuthorizedKey(claimed))),
			Signature: base64.StdEncoding.EncodeToString(gossh.Marshal(sig)),
		}, nil
	}
}

func startAgentClient(t *testing.T, tc *testCoordinator, token string, id func(string) (*protocol.AgentIdentity, error)) *peerClient {
	t.Helper()
	rec := newRecorder()
	c := coordclient.New(coordclient.Config{
		URL: tc.URL(), Token: token, Fingerprint: tc.Fingerprint(), Logger: testLogger(t),
		Role: protocol.RoleAgent, Identity: id,
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
	}, rec)
	ctx, cancel := context.WithCancel(context.Background())
	pc := &peerClient{Client: c, rec: rec, cancel: cancel, done: make(chan error, 1)}
	go func() { pc.done <- c.Run(ctx) }()
	t.Cleanup(func() { pc.stop() })
	return pc
}

func hostKeyOf(t *testing.T, tc *testCoordinator, token, agent string) (protocol.HostKeyAnswer, int) {
	t.Helper()
	hc, err := coordclient.HTTPClient(tc.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", tc.URL()+protocol.HostKeyPath+"?agent="+url.QueryEscape(agent), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var a protocol.HostKeyAnswer
	json.NewDecoder(res.Body).Decode(&a)
	return a, res.StatusCode
}

func authorized(k gossh.PublicKey) string {
	return strings.TrimSpace(string(gossh.MarshalAuthorizedKey(k)))
}

// TestIdentityPinned: the first registration pins the agent's host key;
// impostors holding the token (another key, a key claimed without its
// private half, no proof at all) are refused with one line and the real
// agent and its client are not disturbed, until an admin resets the
// identity.
func TestIdentityPinned(t *testing.T) {
	f := newFixture(t, coordOpts{})
	real, impostor := newHostKey(t), newHostKey(t)
	ws1 := startAgentClient(t, f.tc, f.ws1Token, proveWith(real, nil))
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	ws1.UpdateNode(fakeNode(t, h1))
	alice := startClient(t, f.tc, f.aliceToken)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	recv(t, alice.rec.peers, "ws1 at alice")

	if a, code := hostKeyOf(t, f.tc, f.aliceToken, "ws1"); code != 200 || a.HostKey != authorized(real.PublicKey()) {
		t.Fatalf("host key answer %d %+v, want the real agent's key", code, a)
	}
	if _, code := hostKeyOf(t, f.tc, f.carolToken, "ws1"); code != http.StatusForbidden {
		t.Fatalf("a user without a grant got the host key (HTTP %d)", code)
	}

	for _, c := range []struct {
		name string
		id   func(string) (*protocol.AgentIdentity, error)
		says string
	}{
		{"another key", proveWith(impostor, nil), "reset-identity ws1"},
		{"claimed key without its private half", proveWith(impostor, real.PublicKey()), "does not verify"},
		{"no proof", nil, "reset-identity ws1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			imp := startAgentClient(t, f.tc, f.ws1Token, c.id)
			err := imp.runResult(t)
			var perm *coordclient.PermanentError
			if !errors.As(err, &perm) || errCode(err) != protocol.CodeIdentityMismatch || !strings.Contains(err.Error(), c.says) {
				t.Fatalf("impostor's Run returned %v, want a permanent %s saying %q", err, protocol.CodeIdentityMismatch, c.says)
			}
			nothing(t, ws1.rec.discs, "real agent disconnected")
			nothing(t, alice.rec.gone, "ws1 gone at alice")
		})
	}
	// An agent token used with no role header (an older client) is the
	// "no proof" case: refused, and the agent stays.
	old := startClient(t, f.tc, f.ws1Token)
	if err := old.runResult(t); errCode(err) != protocol.CodeIdentityMismatch {
		t.Fatalf("agent token without a role header: %v, want %s", err, protocol.CodeIdentityMismatch)
	}
	nothing(t, ws1.rec.discs, "real agent disconnected")

	// The real agent restarting with its key is welcome.
	ws1.stop()
	ws1 = startAgentClient(t, f.tc, f.ws1Token, proveWith(real, nil))
	recv(t, ws1.rec.hellos, "real agent again")
	ws1.stop()

	// After reset-identity, the next agent pins its own key and clients
	// are told to expect it.
	if err := f.tc.admin(t).ResetIdentity(t.Context(), "ws1"); err != nil {
		t.Fatal(err)
	}
	if a, _ := hostKeyOf(t, f.tc, f.aliceToken, "ws1"); a.HostKey != authorized(real.PublicKey()) {
		t.Fatalf("reset-identity changed the vouched key before a new registration: %+v", a)
	}
	rebuilt := startAgentClient(t, f.tc, f.ws1Token, proveWith(impostor, nil))
	recv(t, rebuilt.rec.hellos, "rebuilt agent hello")
	if a, _ := hostKeyOf(t, f.tc, f.aliceToken, "ws1"); a.HostKey != authorized(impostor.PublicKey()) {
		t.Fatalf("after reset, host key answer %+v, want the new key", a)
	}
	// And now the old key is the stranger.
	old2 := startAgentClient(t, f.tc, f.ws1Token, proveWith(real, nil))
	if err := old2.runResult(t); errCode(err) != protocol.CodeIdentityMismatch {
		t.Fatalf("old key after re-pinning: %v, want %s", err, protocol.CodeIdentityMismatch)
	}
}

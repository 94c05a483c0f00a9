package sshclient_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"io"
	"strings"
	"testing"

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/client/sshclient"
)

// TestExpectHostKey: with the vouched key the command runs; a server
// holding another key is refused before any session, naming both keys.
func TestExpectHostKey(t *testing.T) {
	srv, addr := startSSHD(t)
	authorized := func(k gossh.PublicKey) string { return strings.TrimSpace(string(gossh.MarshalAuthorizedKey(k))) }

	conn, err := sshclient.ExpectHostKey(dial(t, addr), authorized(srv.HostKey()))
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if code, err := sshclient.RunCommand(context.Background(), conn, "echo ok", nil, &out, io.Discard); err != nil || code != 0 || out.String() != "ok\n" {
		t.Fatalf("with the vouched key: code %d err %v out %q", code, err, out.String())
	}

	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	other, err := gossh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	conn, err = sshclient.ExpectHostKey(dial(t, addr), authorized(other))
	if err != nil {
		t.Fatal(err)
	}
	_, err = sshclient.RunCommand(context.Background(), conn, "echo should not run", nil, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), gossh.FingerprintSHA256(srv.HostKey())) || !strings.Contains(err.Error(), gossh.FingerprintSHA256(other)) {
		t.Fatalf("another host key: %v, want a refusal naming both keys", err)
	}
	raw := dial(t, addr)
	defer raw.Close()
	if _, err := sshclient.ExpectHostKey(raw, "not a key"); err == nil {
		t.Fatal("a malformed vouched key was accepted")
	}
}

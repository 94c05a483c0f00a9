package sshtest

import (
	"context"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// UnknownRequests: unknown channel types, global requests and session
// requests are refused, and the same connection keeps working.
func UnknownRequests(t *testing.T, tg Target) {
	if tg.Dial == nil {
		t.Skip("target has no Dial function for protocol-level checks")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc, err := tg.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	conn, chans, reqs, err := gossh.NewClientConn(nc, tg.Host, &gossh.ClientConfig{
		User:            "sshtest",
		HostKeyCallback: gossh.InsecureIgnoreHostKey(), // a throwaway test server
		Timeout:         20 * time.Second,
	})
	if err != nil {
		t.Fatalf("ssh handshake: %v", err)
	}
	client := gossh.NewClient(conn, chans, reqs)
	defer client.Close()

	_, _, err = client.OpenChannel("x-no-such-channel@example.com", nil)
	var oce *gossh.OpenChannelError
	if err == nil || !asOpenChannelError(err, &oce) || oce.Reason != gossh.UnknownChannelType {
		t.Fatalf("unknown channel type: got %v, want a rejection with reason unknown channel type", err)
	}
	ok, _, err := client.SendRequest("x-no-such-request@example.com", true, nil)
	if err != nil || ok {
		t.Fatalf("unknown global request: ok=%v err=%v, want a refusal", ok, err)
	}
	// A direct-tcpip to a closed port is refused without harm too.
	if _, err := client.Dial("tcp", "127.0.0.1:1"); err == nil {
		t.Fatal("forward to a closed port succeeded")
	}

	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	ok, err = sess.SendRequest("x-no-such-session-request@example.com", true, nil)
	if err != nil || ok {
		t.Fatalf("unknown session request: ok=%v err=%v, want a refusal", ok, err)
	}
	out, err := sess.CombinedOutput("echo still-works")
	if err != nil || strings.TrimSpace(string(out)) != "still-works" {
		t.Fatalf("exec after refusals: %q %v", out, err)
	}
	// A second exec on a used session is refused.
	sess2, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer sess2.Close()
	if out, err := sess2.Output("echo again"); err != nil || string(out) != "again\n" {
		t.Fatalf("second session: %q %v", out, err)
	}
}

func asOpenChannelError(err error, target **gossh.OpenChannelError) bool {
	oce, ok := err.(*gossh.OpenChannelError)
	if ok {
		*target = oce
	}
	return ok
}

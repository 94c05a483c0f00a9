package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/agent"
	"github.com/agentd/agent/client"
	"github.com/agentd/agent/client/sshclient"
	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/internal/testkit/coordtest"
	"github.com/agentd/agent/protocol"
)

// stack is a coordinator, one workspace agent and the credentials of a user
// who may reach it, all in this process on loopback.
type stack struct {
	coord       *coordinator.Server
	url, fp     string
	userToken   string
	userTokenID string
	adm         admin.Ops
	agentCancel context.CancelFunc
	agentDone   chan error
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.DiscardHandler)
}

func startStack(t *testing.T) *stack {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	d := coordtest.Start(t, testLogger(t).With("side", "coordinator"))
	s := &stack{coord: d.Server, url: d.URL, fp: d.Fingerprint, userToken: d.UserToken, userTokenID: d.UserTokenID, adm: d.Admin, agentDone: make(chan error, 1)}
	a, err := agent.New(agent.Options{
		Logger:      testLogger(t).With("side", "agent"),
		Coordinator: coordclient.Config{URL: s.url, Token: d.AgentToken, Fingerprint: s.fp},
		DataDir:     t.TempDir(),
		Shell:       "/bin/sh", // not root's bash: its ~/.bashrc here runs pyenv init
	})
	if err != nil {
		t.Fatal(err)
	}
	actx, acancel := context.WithCancel(ctx)
	s.agentCancel = acancel
	go func() { s.agentDone <- a.Run(actx) }()
	t.Cleanup(func() {
		acancel()
		select {
		case <-s.agentDone:
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop within 10 s of cancellation")
		}
	})
	return s
}

func (s *stack) connect(t *testing.T, ctx context.Context, blockDirect bool) *client.Workspace {
	t.Helper()
	ws, err := client.Connect(ctx, client.Config{
		Coordinator: coordclient.Config{URL: s.url, Token: s.userToken, Fingerprint: s.fp},
		Logger:      testLogger(t).With("side", "client"),
		BlockDirect: blockDirect,
	}, "ws1")
	if err != nil {
		t.Fatalf("connect to ws1: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	return ws
}

// sinkServer listens on the workspace's loopback and answers each
// connection with the SHA-256 of everything it read until EOF.
func sinkServer(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := sha256.New()
				io.Copy(h, c)
				c.Write(h.Sum(nil))
			}()
		}
	}()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// sendVerified pushes size random bytes through conn, half-closes it, and
// checks the far side's digest.
func sendVerified(t *testing.T, conn net.Conn, size int) {
	t.Helper()
	h := sha256.New()
	src := io.TeeReader(io.LimitReader(rand.Reader, int64(size)), h)
	if _, err := io.Copy(conn, src); err != nil {
		t.Fatalf("send: %v", err)
	}
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatalf("half-close: %v", err)
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("read digest: %v", err)
	}
	if !bytes.Equal(got, h.Sum(nil)) {
		t.Fatalf("the far side saw different bytes: digest %x, sent %x", got, h.Sum(nil))
	}
}

func TestAgentOverTailnetDirect(t *testing.T) {
	if os.Getenv("AGENT_TEST_DERP_ONLY") != "" {
		t.Skip("running as the DERP-only subprocess")
	}
	runStackChecks(t, false)
}

// TestAgentOverTailnetDERP runs the same checks with every packet relayed
// through the coordinator's DERP server. Forcing DERP is process-wide in
// Tailscale, so the checks run in a child test process.
func TestAgentOverTailnetDERP(t *testing.T) {
	if os.Getenv("AGENT_TEST_DERP_ONLY") != "" {
		runStackChecks(t, true)
		return
	}
	args := []string{"-test.run=^TestAgentOverTailnetDERP$", "-test.count=1"}
	if testing.Verbose() {
		args = append(args, "-test.v")
	}
	cmd := exec.Command(os.Args[0], args...)
	// Tailscale's knobs behind BlockDirect are set from the environment at
	// start: the agent here is a normal Conn, and the client flipping them
	// while the agent's engine starts would be a data race (and leave the
	// agent's MTU to chance).
	cmd.Env = append(os.Environ(), "AGENT_TEST_DERP_ONLY=1", "TS_DEBUG_ALWAYS_USE_DERP=true", "TS_DEBUG_MTU=9000")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "PASS") {
		t.Fatalf("DERP-only run failed: %v\n%s", err, out)
	}
}

func runStackChecks(t *testing.T, derpOnly bool) {
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	start := time.Now()
	ws := s.connect(t, ctx, derpOnly)
	if err := ws.AwaitReachable(ctx); err != nil {
		t.Fatal(err)
	}
	// How fast is measured by the benchmarks (tailnet's time to first
	// pong); here it is only reported, since -race on two busy cores
	// stretches it.
	t.Logf("tunnel up after %v", time.Since(start))

	res, err := ws.Ping(ctx)
	if err != nil {
		t.Fatalf("ping: %v", err)
	}
	if derpOnly && res.Direct() {
		t.Errorf("pong came directly from %v although direct paths are blocked", res.Endpoint)
	}
	if !derpOnly {
		// Direct needs a disco round; give it a few pings.
		for i := 0; i < 20 && !res.Direct(); i++ {
			time.Sleep(100 * time.Millisecond)
			if res, err = ws.Ping(ctx); err != nil {
				t.Fatalf("ping: %v", err)
			}
		}
		if !res.Direct() {
			t.Errorf("no direct path on loopback after 20 pings: last pong via DERP region %d", res.DERPRegionID)
		}
	}

	// Port forwarding: a server on the workspace's 127.0.0.1 is reached
	// through the tailnet, every byte verified.
	port := sinkServer(t)
	conn, err := ws.DialTCP(ctx, port)
	if err != nil {
		t.Fatalf("dial forwarded port %d: %v", port, err)
	}
	sendVerified(t, conn, 16<<20)
	conn.Close()

	// A closed workspace port is refused at once.
	closed := freePort(t)
	t0 := time.Now()
	if c, err := ws.DialTCP(ctx, closed); err == nil {
		c.Close()
		t.Fatalf("dial to closed port %d succeeded", closed)
	} else if !strings.Contains(err.Error(), "nothing listens") {
		t.Errorf("closed port: error %q does not say nothing listens there", err)
	}
	if d := time.Since(t0); d > time.Second {
		t.Errorf("closed port took %v to refuse; want a reset at once", d)
	}

	// SSH on tailnet port 1.
	sshConn, err := ws.DialTCP(ctx, protocol.PortSSH)
	if err != nil {
		t.Fatalf("dial SSH: %v", err)
	}
	var stdout, stderr bytes.Buffer
	code, err := sshclient.RunCommand(ctx, sshConn, "echo out; echo err >&2; exit 3", nil, &stdout, &stderr)
	if err != nil {
		t.Fatalf("ssh exec: %v", err)
	}
	if code != 3 || stdout.String() != "out\n" || stderr.String() != "err\n" {
		t.Errorf("ssh exec: code %d stdout %q stderr %q; want 3, \"out\\n\", \"err\\n\"", code, stdout.String(), stderr.String())
	}

	// The agent API on port 2 knows who is connected.
	resp, err := ws.HTTPClient().Get("http://agent/api/v1/status")
	if err != nil {
		t.Fatalf("agent API: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"user": "alice"`) {
		t.Errorf("agent API status %d, body %s: want 200 naming user alice", resp.StatusCode, body)
	}
}

func TestAgentStopsPromptly(t *testing.T) {
	if os.Getenv("AGENT_TEST_DERP_ONLY") != "" {
		t.Skip("running as the DERP-only subprocess")
	}
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws := s.connect(t, ctx, false)
	if err := ws.AwaitReachable(ctx); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	s.agentCancel()
	select {
	case err := <-s.agentDone:
		if err != nil {
			t.Errorf("agent returned %v on cancellation; want nil", err)
		}
		s.agentDone <- err
	case <-time.After(5 * time.Second):
		t.Fatal("agent did not stop within 5 s")
	}
	t.Logf("agent stopped in %v", time.Since(t0))
}

func TestAgentRefusesBadToken(t *testing.T) {
	if os.Getenv("AGENT_TEST_DERP_ONLY") != "" {
		t.Skip("running as the DERP-only subprocess")
	}
	s := startStack(t)
	a, err := agent.New(agent.Options{
		Logger:      testLogger(t),
		Coordinator: coordclient.Config{URL: s.url, Token: "agt_" + strings.Repeat("x", 43), Fingerprint: s.fp},
		DataDir:     t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = a.Run(ctx)
	var perm *coordclient.PermanentError
	if !errors.As(err, &perm) {
		t.Fatalf("agent with a wrong token: got %v, want a permanent refusal", err)
	}
	if ctx.Err() != nil {
		t.Fatal("agent kept retrying a wrong token instead of stopping")
	}
}

func freePort(t *testing.T) uint16 {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return uint16(p)
}

// TestRevocationHangsUpWithinBound: revoking the user's token ends, within
// 2 s, the user's SSH session (its process is hung up), a forwarded
// connection, and the client's tunnel with the reason; the agent keeps
// running.
func TestRevocationHangsUpWithinBound(t *testing.T) {
	if os.Getenv("AGENT_TEST_DERP_ONLY") != "" {
		t.Skip("running as the DERP-only subprocess")
	}
	const bound = 2 * time.Second
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ws := s.connect(t, ctx, false)

	// A forwarded connection held open; the workspace's server notes when
	// the agent closes its end.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fwdEnded := make(chan time.Time, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(io.Discard, c)
		fwdEnded <- time.Now()
	}()
	fwd, err := ws.DialTCP(ctx, uint16(ln.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer fwd.Close()
	if _, err := fwd.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}

	// An SSH session running a long command that tells us its PID.
	sshConn, err := ws.DialTCP(ctx, protocol.PortSSH)
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() {
		sshclient.RunCommand(ctx, sshConn, "echo $$; exec sleep 300", nil, pw, io.Discard)
		pw.Close()
	}()
	var pid int
	if _, err := fmt.Fscan(pr, &pid); err != nil {
		t.Fatalf("reading the session's pid: %v", err)
	}
	go io.Copy(io.Discard, pr)

	start := time.Now()
	if _, err := s.adm.RevokeToken(t.Context(), s.userTokenID); err != nil {
		t.Fatal(err)
	}
	select {
	case at := <-fwdEnded:
		t.Logf("the forwarded connection ended %v after the revocation", at.Sub(start))
		if took := at.Sub(start); took > bound {
			t.Errorf("the forwarded connection ended %v after the revocation, want within %v", took, bound)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the forwarded connection is still open in the workspace 10 s after the revocation")
	}
	select {
	case <-ws.Done():
		t.Logf("the client learned %v after the revocation", time.Since(start))
		if took := time.Since(start); took > bound {
			t.Errorf("the client learned after %v, want within %v", took, bound)
		}
		var ae *client.AccessEndedError
		if err := ws.Err(); !errors.As(err, &ae) || !strings.Contains(err.Error(), "token was revoked") {
			t.Errorf("client's reason: %v; want an access-ended error naming the revocation", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the client was never told its access ended")
	}
	// The session's process was hung up (SIGHUP ends sleep at once).
	deadline := time.Now().Add(bound)
	defer func() { t.Logf("the session's process was gone %v after the revocation", time.Since(start)) }()
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("session process %d still runs %v after the revocation", pid, time.Since(start))
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case err := <-s.agentDone:
		t.Fatalf("the agent stopped (%v) when a user's token was revoked", err)
	default:
	}
}

// A client that closes a connection and exits at once still ends it in the
// workspace within a second: its FIN leaves before the tailnet is torn
// down, and the agent passes it on to the workspace's server.
func TestClientExitEndsConnectionPromptly(t *testing.T) {
	if os.Getenv("AGENT_TEST_DERP_ONLY") != "" {
		t.Skip("running as the DERP-only subprocess")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ended := make(chan time.Time, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(io.Discard, c) // returns at the client's FIN
		ended <- time.Now()
	}()

	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ws := s.connect(t, ctx, false)
	conn, err := ws.DialTCP(ctx, uint16(ln.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if _, err := conn.Write([]byte("hello")); err != nil {
		t.Fatalf("write: %v", err)
	}
	closed := time.Now()
	conn.Close()
	ws.Close() // what a client does on its way out
	select {
	case at := <-ended:
		if took := at.Sub(closed); took > time.Second {
			t.Fatalf("the workspace's server saw the end %s after the client closed, want within 1 s", took.Round(time.Millisecond))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the workspace's server never saw the client's end of the connection (the FIN was lost with the tailnet)")
	}
}

package client_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/client"
	"github.com/agentd/agent/coordclient"
	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// env is a coordinator on loopback with user alice owning agent ws1.
type env struct {
	url, fp    string
	userToken  string
	agentToken string
}

func startEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	srv, err := coordinator.New(coordinator.Config{DataDir: dir, Listen: "127.0.0.1:0", STUNAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-served
	})
	adm, err := admin.DialSocket(ctx, admin.SocketPath(dir))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adm.CreateUser("alice"); err != nil {
		t.Fatal(err)
	}
	ag, err := adm.CreateAgent("ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	ut, err := adm.CreateToken(store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return &env{url: srv.URL(), fp: srv.Fingerprint(), userToken: ut.Secret, agentToken: ag.Secret}
}

// agentPeer is the agent's side of the coordination protocol, driven by the
// real coordclient: it publishes a node whose keys nothing holds (like a
// workspace whose network is down, it never answers) and a verdict.
type agentPeer struct {
	cancel context.CancelFunc
	done   chan error
}

func startAgentPeer(t *testing.T, e *env, verdict protocol.NetworkVerdict) *agentPeer {
	t.Helper()
	hellos := make(chan protocol.Hello, 4)
	c := coordclient.New(coordclient.Config{URL: e.url, Token: e.agentToken, Fingerprint: e.fp},
		coordclient.HandlerFuncs{OnHello: func(h protocol.Hello) { hellos <- h }})
	c.ReportNetwork(verdict)
	ctx, cancel := context.WithCancel(context.Background())
	a := &agentPeer{cancel: cancel, done: make(chan error, 1)}
	go func() { a.done <- c.Run(ctx) }()
	t.Cleanup(a.stop)
	select {
	case h := <-hellos:
		c.UpdateNode(&tailnet.Node{ID: h.NodeID, Key: "nodekey:" + randHex(t), DiscoKey: "discokey:" + randHex(t),
			Addresses: h.Addresses, HomeDERP: tailnet.DefaultRegionID, AsOf: time.Now().UTC()})
	case <-time.After(10 * time.Second):
		t.Fatal("the agent peer got no hello")
	}
	return a
}

func (a *agentPeer) stop() {
	a.cancel()
	if a.done != nil {
		<-a.done
		a.done = nil
	}
}

func randHex(t *testing.T) string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func (e *env) connect(ctx context.Context, logs *syncBuffer) (*client.Workspace, error) {
	return client.Connect(ctx, client.Config{
		Coordinator:   coordclient.Config{URL: e.url, Token: e.userToken, Fingerprint: e.fp},
		Logger:        slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})),
		UnhealthyWait: 2 * time.Second,
	}, "ws1")
}

const brokenSummary = "workspace network broken past eth0: the gateway 10.9.0.1 does not answer"

func TestBrokenWorkspaceErrorsNameTheVerdict(t *testing.T) {
	e := startEnv(t)
	at := time.Now().Add(-time.Minute).UTC().Truncate(time.Second)
	agent := startAgentPeer(t, e, protocol.NetworkVerdict{Status: protocol.NetworkBroken, Summary: brokenSummary,
		Codes: []string{"gateway.unreachable"}, At: at, Since: at})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Online but broken: Connect warns, and a dial gives up with the cause
	// instead of waiting for ever.
	var logs syncBuffer
	ws, err := e.connect(ctx, &logs)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	if v := ws.Network(); v == nil || v.Status != protocol.NetworkBroken || v.Summary != brokenSummary {
		t.Fatalf("Network() = %+v", v)
	}
	if got := logs.String(); strings.Count(got, "level=WARN") != 1 || !strings.Contains(got, `workspace \"ws1\" reports its network broken`) ||
		!strings.Contains(got, brokenSummary) {
		t.Fatalf("want one warning naming the verdict before connecting, got:\n%s", got)
	}
	start := time.Now()
	_, err = ws.DialTCP(ctx, client.PortSSH)
	if err == nil {
		t.Fatal("dialled a workspace whose node never answers")
	}
	for _, want := range []string{`workspace "ws1" is not reachable over the tailnet (waited 2s)`, "reports its network broken",
		"agent netcheck at " + at.Local().Format("15:04:05"), brokenSummary, `run "agent netcheck --host" on its node`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("dial error %q does not contain %q", err, want)
		}
	}
	if waited := time.Since(start); waited > 10*time.Second {
		t.Errorf("the dial gave up after %v, want about 2 s", waited)
	}
	pctx, pcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = ws.Ping(pctx)
	pcancel()
	if err == nil || !strings.Contains(err.Error(), brokenSummary) {
		t.Errorf("ping error %v does not name the verdict", err)
	}
	ws.Close()

	// Offline after saying its network was broken: Connect says since when
	// and the last verdict.
	stopped := time.Now()
	agent.stop()
	var logs2 syncBuffer
	_, err = e.connect(ctx, &logs2)
	if err == nil {
		t.Fatal("connected to an offline workspace")
	}
	for _, want := range []string{`workspace "ws1" did not come online (waited 2s)`, "it is offline: its agent disconnected at " + stopped.Format("15:04"),
		"its last network verdict was broken", brokenSummary, `run "agent netcheck --host" on its node`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("connect error %q does not contain %q", err, want)
		}
	}
	if got := logs2.String(); strings.Count(got, "level=WARN") != 1 || !strings.Contains(got, "is offline") {
		t.Errorf("want one offline warning, got:\n%s", got)
	}
}

func TestDegradedWorkspaceWarnsOnce(t *testing.T) {
	e := startEnv(t)
	at := time.Now().UTC().Truncate(time.Second)
	startAgentPeer(t, e, protocol.NetworkVerdict{Status: protocol.NetworkDegraded, Summary: "DNS answers slowly (900 ms)",
		Codes: []string{"dns.slow"}, At: at, Since: at})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var logs syncBuffer
	ws, err := e.connect(ctx, &logs)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer ws.Close()
	got := logs.String()
	if strings.Count(got, "level=WARN") != 1 || !strings.Contains(got, `reports its network degraded`) || !strings.Contains(got, "DNS answers slowly") {
		t.Fatalf("want one degraded warning, got:\n%s", got)
	}
	// Degraded is no reason to give up: the dial waits for the context.
	dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
	defer dcancel()
	_, err = ws.DialTCP(dctx, client.PortSSH)
	if err == nil || strings.Contains(err.Error(), "waited") || !strings.Contains(err.Error(), "deadline exceeded") {
		t.Fatalf("dial error %v: want the context's deadline, not a give-up", err)
	}
}

func TestNeverConnectedWorkspaceIsOffline(t *testing.T) {
	e := startEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var logs syncBuffer
	_, err := e.connect(ctx, &logs)
	if err == nil || !strings.Contains(err.Error(), "it is offline: its agent is not connected to the coordinator") {
		t.Fatalf("connect error %v", err)
	}
}

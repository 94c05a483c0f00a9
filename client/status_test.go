package client_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/client"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/internal/testkit/coordtest"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// warnings is a slog.Handler keeping the messages of warnings, which is
// what a person running a client command sees on stderr.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler           { return w }
func (w *warnings) WithGroup(string) slog.Handler                { return w }

func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, r.Message)
	return nil
}

// only returns the one warning given, failing the test if there were more
// or none.
func (w *warnings) only(t *testing.T) string {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.msgs) != 1 {
		t.Fatalf("want exactly one warning, got %q", w.msgs)
	}
	return w.msgs[0]
}

// wantAll reports each of wants missing from got.
func wantAll(t *testing.T, what, got string, wants ...string) {
	t.Helper()
	for _, want := range wants {
		if !strings.Contains(got, want) {
			t.Errorf("%s %q does not contain %q", what, got, want)
		}
	}
}

// env is a coordinator on loopback with user alice owning agent ws1.
type env struct{ *coordtest.Deployment }

func startEnv(t *testing.T) *env { return &env{coordtest.Start(t, nil)} }

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
	c := coordclient.New(coordclient.Config{URL: e.URL, Token: e.AgentToken, Fingerprint: e.Fingerprint},
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

func (e *env) connect(ctx context.Context, warned *warnings) (*client.Workspace, error) {
	return client.Connect(ctx, client.Config{
		Coordinator:   coordclient.Config{URL: e.URL, Token: e.UserToken, Fingerprint: e.Fingerprint},
		Logger:        slog.New(warned),
		UnhealthyWait: 2 * time.Second,
	}, "ws1")
}

// workspaceSaying starts a coordinator and an agent peer whose network
// verdict is status since at.
func workspaceSaying(t *testing.T, status protocol.NetworkHealth, summary, code string, at time.Time) (*env, *agentPeer) {
	t.Helper()
	e := startEnv(t)
	return e, startAgentPeer(t, e, protocol.NetworkVerdict{Status: status, Summary: summary, Codes: []string{code}, At: at, Since: at})
}

// mustConnect connects to ws1, recording the warnings given.
func (e *env) mustConnect(t *testing.T, ctx context.Context) (*client.Workspace, *warnings) {
	t.Helper()
	warned := &warnings{}
	ws, err := e.connect(ctx, warned)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	return ws, warned
}

const brokenSummary = "workspace network broken past eth0: the gateway 10.9.0.1 does not answer"

func TestBrokenWorkspaceErrorsNameTheVerdict(t *testing.T) {
	at := time.Now().Add(-time.Minute).UTC().Truncate(time.Second)
	e, agent := workspaceSaying(t, protocol.NetworkBroken, brokenSummary, "gateway.unreachable", at)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Online but broken: Connect warns, and a dial gives up with the cause
	// instead of waiting for ever.
	ws, warned := e.mustConnect(t, ctx)
	if v := ws.Network(); v == nil || v.Status != protocol.NetworkBroken || v.Summary != brokenSummary {
		t.Fatalf("Network() = %+v", v)
	}
	wantAll(t, "the warning before connecting", warned.only(t), `workspace "ws1" reports its network broken`, brokenSummary)
	start := time.Now()
	_, err := ws.DialTCP(ctx, protocol.PortSSH)
	if err == nil {
		t.Fatal("dialled a workspace whose node never answers")
	}
	wantAll(t, "dial error", err.Error(), `workspace "ws1" is not reachable over the tailnet (waited 2s)`, "reports its network broken",
		"agent netcheck at "+at.Local().Format("15:04:05"), brokenSummary, `run "agent netcheck --host" on its node`)
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
	var warned2 warnings
	_, err = e.connect(ctx, &warned2)
	if err == nil {
		t.Fatal("connected to an offline workspace")
	}
	wantAll(t, "connect error", err.Error(), `workspace "ws1" did not come online (waited 2s)`, "it is offline: its agent disconnected at "+stopped.Format("15:04"),
		"its last network verdict was broken", brokenSummary, `run "agent netcheck --host" on its node`)
	wantAll(t, "the offline warning", warned2.only(t), `workspace "ws1" is offline`, brokenSummary)
}

func TestDegradedWorkspaceWarnsOnce(t *testing.T) {
	e, _ := workspaceSaying(t, protocol.NetworkDegraded, "DNS answers slowly (900 ms)", "dns.slow", time.Now().UTC().Truncate(time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, warned := e.mustConnect(t, ctx)
	defer ws.Close()
	wantAll(t, "the warning before connecting", warned.only(t), `workspace "ws1" reports its network degraded`, "DNS answers slowly")
	// Degraded is no reason to give up: the dial waits for the context.
	dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
	defer dcancel()
	_, err := ws.DialTCP(dctx, protocol.PortSSH)
	if err == nil || strings.Contains(err.Error(), "waited") || !strings.Contains(err.Error(), "deadline exceeded") {
		t.Fatalf("dial error %v: want the context's deadline, not a give-up", err)
	}
}

func TestNeverConnectedWorkspaceIsOffline(t *testing.T) {
	e := startEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := e.connect(ctx, &warnings{})
	if err == nil || !strings.Contains(err.Error(), "it is offline: its agent is not connected to the coordinator") {
		t.Fatalf("connect error %v", err)
	}
}

// A workspace whose node never answers (its keys are held by nobody): a
// connection to it ends once it has been silent for the bound, naming the
// workspace's silence.
func TestSilentWorkspaceDialGivesUp(t *testing.T) {
	e := startEnv(t)
	startAgentPeer(t, e, protocol.NetworkVerdict{Status: protocol.NetworkOK, At: time.Now()})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, _ := e.mustConnect(t, ctx)
	defer ws.Close()
	const bound = 1500 * time.Millisecond
	sctx, scancel := ws.GiveUpWhenSilent(ctx, bound)
	defer scancel()
	start := time.Now()
	_, err := ws.DialTCP(sctx, protocol.PortSSH)
	took := time.Since(start)
	if err == nil {
		t.Fatal("a dial to a workspace that never answers succeeded")
	}
	var silent *client.ErrWorkspaceSilent
	if !errors.As(context.Cause(sctx), &silent) {
		t.Fatalf("the dial ended with %v (cause %v), want the workspace's silence", err, context.Cause(sctx))
	}
	if took < bound || took > bound+5*time.Second {
		t.Errorf("gave up after %v, want about %v", took.Round(time.Millisecond), bound)
	}
	t.Logf("gave up after %v: %v (%v)", took.Round(time.Millisecond), err, silent)
}

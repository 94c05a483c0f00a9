package coordinator_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// testCoordinator is a coordinator serving on loopback for one test.
type testCoordinator struct {
	*coordinator.Server
	metrics *metrics.Registry
	dir     string
	cancel  context.CancelFunc
	done    chan error
}

type coordOpts struct {
	insecure bool
	tweak    func(*coordinator.Config)
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("COORD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

func startCoordinator(t *testing.T, dir string, o coordOpts) *testCoordinator {
	t.Helper()
	reg := metrics.NewRegistry()
	cfg := coordinator.Config{
		Metrics:      reg,
		DataDir:      dir,
		Listen:       "127.0.0.1:0",
		STUNAddr:     "127.0.0.1:0",
		InsecureHTTP: o.insecure,
		Logger:       testLogger(t),
	}
	if o.tweak != nil {
		o.tweak(&cfg)
	}
	srv, err := coordinator.New(cfg)
	if err != nil {
		t.Fatalf("starting coordinator: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tc := &testCoordinator{Server: srv, metrics: reg, dir: dir, cancel: cancel, done: make(chan error, 1)}
	go func() { tc.done <- srv.Serve(ctx) }()
	t.Cleanup(tc.stop)
	return tc
}

// stop shuts the coordinator down and waits for it (idempotent).
func (tc *testCoordinator) stop() {
	tc.cancel()
	if tc.done != nil {
		<-tc.done
		tc.done = nil
	}
}

func (tc *testCoordinator) admin(t *testing.T) admin.Ops {
	t.Helper()
	c, err := admin.DialSocket(context.Background(), admin.SocketPath(tc.dir))
	if err != nil {
		t.Fatalf("admin socket: %v", err)
	}
	return c
}

// scrape returns the coordinator's metrics in the text format.
func scrape(t *testing.T, tc *testCoordinator) string {
	t.Helper()
	rec := httptest.NewRecorder()
	tc.metrics.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

// must fails the test on err.
func must[T any](t *testing.T) func(v T, err error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// recorder is a coordclient.Handler that queues every event.
type recorder struct {
	mu      sync.Mutex
	hellos  chan protocol.Hello
	peers   chan protocol.Peer
	gone    chan protocol.PeerGone
	tunnels chan protocol.TunnelStatus
	errs    chan protocol.Error
	discs   chan error
	last    protocol.Hello
}

func newRecorder() *recorder {
	return &recorder{
		hellos:  make(chan protocol.Hello, 64),
		peers:   make(chan protocol.Peer, 1024),
		gone:    make(chan protocol.PeerGone, 64),
		tunnels: make(chan protocol.TunnelStatus, 64),
		errs:    make(chan protocol.Error, 64),
		discs:   make(chan error, 64),
	}
}

func (r *recorder) Hello(h protocol.Hello) {
	r.mu.Lock()
	r.last = h
	r.mu.Unlock()
	r.hellos <- h
}
func (r *recorder) PeerUpdate(p protocol.Peer)           { r.peers <- p }
func (r *recorder) PeerGone(g protocol.PeerGone)         { r.gone <- g }
func (r *recorder) TunnelStatus(s protocol.TunnelStatus) { r.tunnels <- s }
func (r *recorder) Error(e protocol.Error)               { r.errs <- e }
func (r *recorder) Disconnected(err error)               { r.discs <- err }

const waitFor = 10 * time.Second

func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitFor):
		t.Fatalf("timed out waiting for %s", what)
		var zero T
		return zero
	}
}

// nothing asserts that nothing arrives on ch for a short while.
func nothing[T any](t *testing.T, ch <-chan T, what string) {
	t.Helper()
	select {
	case v := <-ch:
		t.Fatalf("unexpected %s: %+v", what, v)
	case <-time.After(300 * time.Millisecond):
	}
}

// peerClient is a running coordclient with its recorder.
type peerClient struct {
	*coordclient.Client
	rec    *recorder
	cancel context.CancelFunc
	done   chan error
}

func startClient(t *testing.T, tc *testCoordinator, token string) *peerClient {
	t.Helper()
	rec := newRecorder()
	fp := tc.Fingerprint()
	c := coordclient.New(coordclient.Config{
		URL: tc.URL(), Token: token, Fingerprint: fp, InsecureHTTP: fp == "", Logger: testLogger(t), Software: "test",
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
	}, rec)
	ctx, cancel := context.WithCancel(context.Background())
	pc := &peerClient{Client: c, rec: rec, cancel: cancel, done: make(chan error, 1)}
	go func() { pc.done <- c.Run(ctx) }()
	t.Cleanup(func() { pc.stop() })
	return pc
}

// stop ends the client gracefully and returns Run's error.
func (pc *peerClient) stop() error {
	pc.cancel()
	if pc.done == nil {
		return nil
	}
	err := <-pc.done
	pc.done = nil
	return err
}

// runResult waits for Run to return on its own.
func (pc *peerClient) runResult(t *testing.T) error {
	t.Helper()
	select {
	case err := <-pc.done:
		pc.done = nil
		return err
	case <-time.After(waitFor):
		t.Fatal("Run did not return")
		return nil
	}
}

// fakeNode is a node with fresh random keys for the identity in h. The
// coordinator only relays nodes, so no engine is needed behind them.
func fakeNode(t *testing.T, h protocol.Hello) *tailnet.Node {
	t.Helper()
	return &tailnet.Node{
		ID:        h.NodeID,
		Key:       "nodekey:" + randHex(t),
		DiscoKey:  "discokey:" + randHex(t),
		Addresses: h.Addresses,
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.10:41641")},
		HomeDERP:  tailnet.DefaultRegionID,
		AsOf:      time.Now().UTC().Truncate(time.Second),
	}
}

func randHex(t *testing.T) string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func errCode(err error) protocol.ErrorCode {
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return pe.Code
	}
	return protocol.ErrorCode(fmt.Sprintf("not a protocol error: %v", err))
}

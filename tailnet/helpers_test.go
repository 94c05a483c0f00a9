package tailnet

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
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/util/clientmetric"
)

// testRelay is the coordinator's relay part on loopback: DERP over TLS with
// a pinned self-signed certificate (the production path) plus STUN.
type testRelay struct {
	derp *DERPServer
	stun *STUNServer
	srv  *httptest.Server
	dm   *DERPMap
	// dials counts the TCP connections the relay accepted.
	dials atomic.Int64

	mu      sync.Mutex
	allowed map[string]bool
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("TAILNET_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

func newTestRelay(t testing.TB) *testRelay {
	t.Helper()
	d, err := NewDERPServer(testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	r := &testRelay{derp: d, allowed: map[string]bool{}}
	d.SetAdmitFunc(func(k string) bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.allowed[k]
	})
	mux := http.NewServeMux()
	mux.Handle("/derp", d.Handler())
	mux.Handle("/derp/", d.Handler())
	r.srv = httptest.NewUnstartedServer(mux)
	r.srv.Config.ErrorLog = nil
	r.srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			r.dials.Add(1)
		}
	}
	r.srv.StartTLS()
	t.Cleanup(r.srv.Close)

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	r.stun, err = ListenSTUN(ctx, "127.0.0.1:0", testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.stun.Close() })
	stunPort := r.stun.LocalAddr().(*net.UDPAddr).Port
	fp := CertFingerprint(r.srv.Certificate().Raw)
	r.dm, err = CoordinatorDERPMap(r.srv.Listener.Addr().String(), stunPort, fp)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *testRelay) admit(key string) {
	r.mu.Lock()
	r.allowed[key] = true
	r.mu.Unlock()
}

func testAddr(id NodeID) netip.Prefix {
	return netip.MustParsePrefix(fmt.Sprintf("fd5e:a9e1:7c3b::%x/128", id))
}

type connOpt func(*Options)

func newTestConn(t testing.TB, r *testRelay, id NodeID, acceptInbound bool, mods ...connOpt) *Conn {
	t.Helper()
	opts := Options{
		Logger:        testLogger(t).With("node", id),
		NodeID:        id,
		Addresses:     []netip.Prefix{testAddr(id)},
		DERPMap:       r.dm,
		AcceptInbound: acceptInbound,
		BlockDirect:   os.Getenv(derpOnlyEnv) == "1",
	}
	for _, m := range mods {
		m(&opts)
	}
	c, err := NewConn(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r.admit(c.Node().Key)
	return c
}

// waitNode waits until c has a home DERP, so that its node is usable.
func waitNode(t testing.TB, c *Conn) *Node {
	t.Helper()
	got := make(chan *Node, 1)
	c.SetNodeCallback(func(n *Node) {
		select {
		case got <- n:
		default:
		}
	})
	defer c.SetNodeCallback(nil)
	select {
	case n := <-got:
		return n
	case <-time.After(15 * time.Second):
		t.Fatalf("node %d never got a home DERP", c.Node().ID)
		return nil
	}
}

// link plays coordinator between two conns: each learns the other's node
// now and on every change.
func link(t testing.TB, a, b *Conn) {
	t.Helper()
	na, nb := waitNode(t, a), waitNode(t, b)
	if err := a.UpsertPeer(nb); err != nil {
		t.Fatal(err)
	}
	if err := b.UpsertPeer(na); err != nil {
		t.Fatal(err)
	}
	a.SetNodeCallback(func(n *Node) { b.UpsertPeer(n) })
	b.SetNodeCallback(func(n *Node) { a.UpsertPeer(n) })
}

func addrOf(c *Conn) netip.Addr { return c.Addresses()[0].Addr() }

// reachablePair starts an agent (node 1) and a client (node 2) on one
// relay, tells each about the other, and waits until the client reaches
// the agent.
func reachablePair(t testing.TB) (agent, client *Conn) {
	t.Helper()
	r := newTestRelay(t)
	agent = newTestConn(t, r, 1, true)
	client = newTestConn(t, r, 2, false)
	link(t, agent, client)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := client.AwaitReachable(ctx, addrOf(agent)); err != nil {
		t.Fatal(err)
	}
	return agent, client
}

// transfer sends n random bytes from -> to over TCP port and back the other
// way, and checks both arrive intact.
func transfer(t testing.TB, from, to *Conn, port uint16, n int) {
	t.Helper()
	ln, err := to.Listen(port)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	up := make([]byte, n)
	down := make([]byte, n)
	rand.Read(up)
	rand.Read(down)

	srvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		defer c.Close()
		got := make([]byte, n)
		if _, err := io.ReadFull(c, got); err != nil {
			srvErr <- fmt.Errorf("server read: %w", err)
			return
		}
		if !bytes.Equal(got, up) {
			srvErr <- errors.New("server received corrupted bytes")
			return
		}
		if _, err := c.Write(down); err != nil {
			srvErr <- fmt.Errorf("server write: %w", err)
			return
		}
		srvErr <- nil
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := from.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(to), port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := c.Write(up); err != nil {
		t.Fatalf("client write: %v", err)
	}
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if err := <-srvErr; err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(down) {
		t.Fatal("client received corrupted bytes")
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// clientMetric reads one of Tailscale's process-wide client metrics.
func clientMetric(name string) int64 {
	for _, m := range clientmetric.Metrics() {
		if m.Name() == name {
			return m.Value()
		}
	}
	return 0
}

// serveTCP listens on c's port and hands each connection to handle on its
// own goroutine until the test ends.
func serveTCP(t testing.TB, c *Conn, port uint16, handle func(net.Conn)) {
	t.Helper()
	ln, err := c.Listen(port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(nc)
		}
	}()
}

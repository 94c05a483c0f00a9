package portforward_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/agent/portforward"
	"github.com/agentd/agent/internal/testkit/pftest"
	"github.com/agentd/agent/protocol"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// newPath builds the agent side: a Forwarder behind the loopback stand-in
// for the tailnet.
func newPath(t *testing.T, opts portforward.Options, opaque bool) (*portforward.Forwarder, *pftest.Tunnel) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	if opts.DialTimeout == 0 {
		// 200 concurrent dials under -race on two busy cores can wait
		// seconds for the scheduler; the default is for production.
		opts.DialTimeout = 15 * time.Second
	}
	f := portforward.New(opts)
	tun, err := pftest.NewTunnel(pftest.TunnelOptions{TCP: f.TCP, UDP: f.UDP, Opaque: opaque})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tun.Close()
		f.Close()
	})
	return f, tun
}

func TestForwardThroughTunnel(t *testing.T) {
	pftest.NoLeaks(t)
	f, tun := newPath(t, portforward.Options{}, true)
	pftest.RunAll(t, pftest.Env{DialTCP: tun.DialTCP, DialUDP: tun.DialUDP})
	waitIdle(t, f)
}

func TestForwardThroughClientListener(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opaque bool
	}{{"userspace-copy", true}, {"kernel-splice", false}} {
		t.Run(tc.name, func(t *testing.T) {
			pftest.NoLeaks(t)
			f, tun := newPath(t, portforward.Options{}, tc.opaque)
			path := pftest.NewClientPath(t, tun)
			pftest.RunAll(t, path.Env())
			waitIdle(t, f)
		})
	}
}

// waitIdle requires every flow to have ended once the test's connections
// are closed.
func waitIdle(t *testing.T, f *portforward.Forwarder) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := f.Stats()
		if s.TCP == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("forwarder still carries %d TCP flows after the test", s.TCP)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReservedPortsAreNotForwarded(t *testing.T) {
	f := portforward.New(portforward.Options{})
	defer f.Close()
	src := netip.MustParseAddrPort("100.64.0.2:40000")
	for port := uint16(0); port <= protocol.ReservedPorts; port++ {
		dst := netip.AddrPortFrom(netip.MustParseAddr("100.64.0.1"), port)
		if h, ok := f.TCP(src, dst); ok || h != nil {
			t.Errorf("TCP port %d was accepted for forwarding", port)
		}
		if h, ok := f.UDP(src, dst); ok || h != nil {
			t.Errorf("UDP port %d was accepted for forwarding", port)
		}
	}
}

func TestClosedPortIsRefusedBeforeAccepting(t *testing.T) {
	f := portforward.New(portforward.Options{})
	defer f.Close()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	start := time.Now()
	h, ok := f.TCP(netip.MustParseAddrPort("100.64.0.2:40000"), netip.AddrPortFrom(netip.MustParseAddr("100.64.0.1"), port))
	if ok || h != nil {
		t.Fatalf("closed port %d was accepted", port)
	}
	if took := time.Since(start); took > 50*time.Millisecond {
		t.Fatalf("refusing a closed port took %s", took)
	}
}

// A connection the tailnet never hands over (its handshake failed) must not
// keep the workspace-side connection open.
func TestUnclaimedConnectionIsClosed(t *testing.T) {
	pftest.NoLeaks(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f := portforward.New(portforward.Options{HandlerTimeout: 100 * time.Millisecond, Logger: testLogger(t)})
	defer f.Close()
	h, ok := f.TCP(netip.MustParseAddrPort("100.64.0.2:40000"), netip.AddrPortFrom(netip.MustParseAddr("100.64.0.1"), uint16(ln.Addr().(*net.TCPAddr).Port)))
	if !ok || h == nil {
		t.Fatal("open port was refused")
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("workspace side read %v, want EOF once the unclaimed connection is closed", err)
	}
	// A late handler call must not resurrect it.
	a, b := net.Pipe()
	defer b.Close()
	h(a)
	if _, err := b.Read(make([]byte, 1)); err == nil {
		t.Fatal("late handler kept the tailnet side open")
	}
}

func TestCloseEndsLongLivedFlows(t *testing.T) {
	pftest.NoLeaks(t)
	f, tun := newPath(t, portforward.Options{}, true)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tun.DialTCP(ctx, uint16(ln.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	server := <-accepted
	defer server.Close()
	// The tunnel acknowledges the dial just before the handler starts.
	for deadline := time.Now().Add(5 * time.Second); f.Stats().TCP != 1; {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v, want one TCP flow", f.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	done := make(chan error, 1)
	go func() {
		_, err := server.Read(make([]byte, 1))
		done <- err
	}()
	f.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("workspace side read data after Close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close left the forwarded connection open")
	}
	if s := f.Stats(); s.TCP != 0 {
		t.Fatalf("stats after Close %+v", s)
	}
}

// A reset from the workspace server reaches the client as an error, not as
// a clean end of stream.
func TestResetIsCarried(t *testing.T) {
	_, tun := newPath(t, portforward.Options{}, false)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("x"))
		time.Sleep(50 * time.Millisecond)
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tun.DialTCP(ctx, uint16(ln.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadAll(c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read ended with %v, want a connection reset", err)
	}
}

func TestUDPFlowExpiresWhenIdle(t *testing.T) {
	pftest.NoLeaks(t)
	f, tun := newPath(t, portforward.Options{UDPIdleTimeout: 200 * time.Millisecond}, true)
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tun.DialUDP(ctx, uint16(pc.LocalAddr().(*net.UDPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 16)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("echo %q, %v", buf[:n], err)
	}
	if s := f.Stats(); s.UDP != 1 {
		t.Fatalf("stats %+v, want one UDP flow", s)
	}
	start := time.Now()
	for f.Stats().UDP != 0 {
		if time.Since(start) > 3*time.Second {
			t.Fatal("idle UDP flow did not expire")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The tunnel side sees the flow end too.
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(buf); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("tunnel side of the expired flow stayed open")
	}
}

// Datagrams to a port where nothing is bound yet must not end the flow: the
// service may start a moment later.
func TestUDPFlowSurvivesRefusal(t *testing.T) {
	_, tun := newPath(t, portforward.Options{}, true)
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	pc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tun.DialUDP(ctx, uint16(pc.LocalAddr().(*net.UDPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("early"))
	time.Sleep(100 * time.Millisecond)
	pc, err = net.ListenPacket("udp4", addr)
	if err != nil {
		t.Skipf("port taken in between: %v", err)
	}
	defer pc.Close()
	c.Write([]byte("late"))
	pc.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 16)
	n, _, err := pc.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "late" {
		t.Fatalf("service that started late got %q, %v", buf[:n], err)
	}
}

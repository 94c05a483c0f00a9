package pftest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/agentd/agent/internal/relay"
)

// DialFunc reaches a port in the workspace through the path under test.
type DialFunc func(ctx context.Context, port uint16) (net.Conn, error)

// Env describes the path under test: how to reach a workspace port, and how
// to open servers in the workspace. The servers always bind to loopback,
// because reaching loopback-only servers is the point of forwarding.
type Env struct {
	DialTCP DialFunc
	DialUDP DialFunc
	// Listen opens a server socket in the workspace. Default net.Listen, for
	// a workspace that is this process's own network namespace.
	Listen func(network, address string) (net.Listener, error)
	// ListenPacket opens a UDP socket in the workspace. Default
	// net.ListenPacket.
	ListenPacket func(network, address string) (net.PacketConn, error)
}

func (e Env) listen(tb testing.TB, network, address string) net.Listener {
	tb.Helper()
	listen := e.Listen
	if listen == nil {
		listen = net.Listen
	}
	ln, err := listen(network, address)
	if err != nil {
		tb.Fatalf("workspace listener on %s: %v", address, err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

func (e Env) listenPacket(tb testing.TB, network, address string) net.PacketConn {
	tb.Helper()
	listen := e.ListenPacket
	if listen == nil {
		listen = net.ListenPacket
	}
	pc, err := listen(network, address)
	if err != nil {
		tb.Fatalf("workspace UDP socket on %s: %v", address, err)
	}
	tb.Cleanup(func() { pc.Close() })
	return pc
}

func portOf(a net.Addr) uint16 {
	switch a := a.(type) {
	case *net.TCPAddr:
		return uint16(a.Port)
	case *net.UDPAddr:
		return uint16(a.Port)
	}
	_, p, _ := net.SplitHostPort(a.String())
	n, _ := strconv.Atoi(p)
	return uint16(n)
}

// RunAll runs every check as a subtest of t.
func RunAll(t *testing.T, env Env) {
	t.Run("HTTP", func(t *testing.T) { CheckHTTP(t, env) })
	t.Run("WebSocket", func(t *testing.T) { CheckWebSocket(t, env, 1500*time.Millisecond) })
	t.Run("Concurrent200", func(t *testing.T) { CheckConcurrent(t, env, 200, 64<<10) })
	t.Run("HalfClose", func(t *testing.T) { CheckHalfClose(t, env) })
	t.Run("ClosedPort", func(t *testing.T) { CheckClosedPort(t, env, 100*time.Millisecond) })
	t.Run("IPv6LoopbackOnly", func(t *testing.T) { CheckIPv6Loopback(t, env) })
	if env.DialUDP != nil {
		t.Run("UDPEcho", func(t *testing.T) { CheckUDPEcho(t, env) })
	}
}

// pattern returns n bytes that depend on seed, so a mix-up between
// connections shows as wrong bytes.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// httpClient returns a client whose every connection goes through dial to
// port, whatever the URL's host says.
func httpClient(dial DialFunc, port uint16) *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return dial(ctx, port)
			},
			DisableCompression: true,
		},
	}
}

// CheckHTTP serves a 4 MiB body and an upload echo from a server bound to
// 127.0.0.1 in the workspace and fetches both through the path.
func CheckHTTP(tb testing.TB, env Env) {
	tb.Helper()
	body := pattern(1, 4<<20)
	sum := sha256.Sum256(body)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /blob", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Sha256", hex.EncodeToString(sum[:]))
		w.Write(body)
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(w, r.Body)
	})
	ln := env.listen(tb, "tcp4", "127.0.0.1:0")
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	tb.Cleanup(func() { srv.Close() })

	hc := httpClient(env.DialTCP, portOf(ln.Addr()))
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://workspace/blob")
	if err != nil {
		tb.Fatalf("GET through the forward: %v", err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		tb.Fatalf("reading the body through the forward: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		tb.Fatalf("GET status %s, want 200", resp.Status)
	}
	gotSum := sha256.Sum256(got)
	if !bytes.Equal(gotSum[:], sum[:]) || resp.Header.Get("X-Sha256") != hex.EncodeToString(sum[:]) {
		tb.Fatalf("body through the forward differs: got %d bytes, want %d", len(got), len(body))
	}

	upload := pattern(2, 2<<20)
	resp, err = hc.Post("http://workspace/echo", "application/octet-stream", bytes.NewReader(upload))
	if err != nil {
		tb.Fatalf("POST through the forward: %v", err)
	}
	got, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || !bytes.Equal(got, upload) {
		tb.Fatalf("echoed upload differs (err %v): got %d bytes, want %d", err, len(got), len(upload))
	}
}

// CheckWebSocket keeps a WebSocket open through the path for at least hold,
// with idle gaps between messages, and checks every echo.
func CheckWebSocket(tb testing.TB, env Env, hold time.Duration) {
	tb.Helper()
	ln := env.listen(tb, "tcp4", "127.0.0.1:0")
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		ws.SetReadLimit(1 << 20)
		for {
			typ, msg, err := ws.Read(r.Context())
			if err != nil {
				return
			}
			if err := ws.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	})}
	go srv.Serve(ln)
	tb.Cleanup(func() { srv.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), hold+30*time.Second)
	defer cancel()
	hc := httpClient(env.DialTCP, portOf(ln.Addr()))
	defer hc.CloseIdleConnections()
	ws, _, err := websocket.Dial(ctx, "ws://workspace/", &websocket.DialOptions{HTTPClient: hc})
	if err != nil {
		tb.Fatalf("WebSocket through the forward: %v", err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(1 << 20)
	start := time.Now()
	gap := hold / 3
	for i := 0; time.Since(start) < hold || i < 4; i++ {
		msg := pattern(uint64(100+i), 1000+i*7919%60000)
		if err := ws.Write(ctx, websocket.MessageBinary, msg); err != nil {
			tb.Fatalf("WebSocket write %d after %s: %v", i, time.Since(start).Round(time.Millisecond), err)
		}
		_, got, err := ws.Read(ctx)
		if err != nil {
			tb.Fatalf("WebSocket read %d after %s: %v", i, time.Since(start).Round(time.Millisecond), err)
		}
		if !bytes.Equal(got, msg) {
			tb.Fatalf("WebSocket message %d came back different", i)
		}
		if i%2 == 1 {
			time.Sleep(gap) // idle: the connection must stay up
		}
	}
	if err := ws.Close(websocket.StatusNormalClosure, "done"); err != nil {
		tb.Fatalf("WebSocket close handshake: %v", err)
	}
}

// startEcho serves a TCP echo that copies until the client half-closes, then
// half-closes back.
func startEcho(tb testing.TB, env Env) uint16 {
	ln := env.listen(tb, "tcp4", "127.0.0.1:0")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return portOf(ln.Addr())
}

type closeWriter interface{ CloseWrite() error }

// CheckConcurrent opens n connections through the path at once, then sends
// size distinct bytes on each and checks each echo byte for byte.
func CheckConcurrent(tb testing.TB, env Env, n, size int) {
	tb.Helper()
	port := startEcho(tb, env)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := env.DialTCP(ctx, port)
			if err != nil {
				errs <- fmt.Errorf("connection %d: dial: %w", i, err)
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	for err := range errs {
		tb.Fatal(err)
	}

	// All n are open now; move the bytes on all of them at once.
	errs = make(chan error, n)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- echoOnce(ctx, c, pattern(uint64(1000+i), size))
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
			if failed <= 5 {
				tb.Error(err)
			}
		}
	}
	if failed > 0 {
		tb.Fatalf("%d of %d concurrent connections failed", failed, n)
	}
}

func echoOnce(ctx context.Context, c net.Conn, msg []byte) error {
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	cw, ok := c.(closeWriter)
	if !ok {
		return fmt.Errorf("connection %T cannot half-close", c)
	}
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil {
			err = cw.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("reading echo: %w", err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs: got %d bytes, want %d", len(got), len(msg))
	}
	return nil
}

// CheckHalfClose checks that the end of one direction reaches the other
// side as end of stream while the other direction keeps flowing, both ways
// round.
func CheckHalfClose(tb testing.TB, env Env) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Client finishes first: the server sees EOF, then answers.
	ln := env.listen(tb, "tcp4", "127.0.0.1:0")
	request := pattern(7, 300<<10)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		got, err := io.ReadAll(c) // returns only at the client's FIN
		if err != nil {
			return
		}
		sum := sha256.Sum256(got)
		c.Write([]byte(hex.EncodeToString(sum[:])))
	}()
	c, err := env.DialTCP(ctx, portOf(ln.Addr()))
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(request); err != nil {
		tb.Fatalf("write: %v", err)
	}
	cw, ok := c.(closeWriter)
	if !ok {
		tb.Fatalf("connection %T cannot half-close", c)
	}
	if err := cw.CloseWrite(); err != nil {
		tb.Fatalf("CloseWrite: %v", err)
	}
	reply, err := io.ReadAll(c)
	want := sha256.Sum256(request)
	if err != nil || string(reply) != hex.EncodeToString(want[:]) {
		tb.Fatalf("after the client's half-close the server's answer was %q (err %v), want the request's hash", reply, err)
	}

	// Server finishes first: the client sees EOF, then sends; the server
	// still receives it all.
	ln2 := env.listen(tb, "tcp4", "127.0.0.1:0")
	greeting := pattern(8, 200<<10)
	upload := pattern(9, 200<<10)
	serverGot := make(chan []byte, 1)
	go func() {
		c, err := ln2.Accept()
		if err != nil {
			serverGot <- nil
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write(greeting)
		c.(*net.TCPConn).CloseWrite()
		got, _ := io.ReadAll(c)
		serverGot <- got
	}()
	c2, err := env.DialTCP(ctx, portOf(ln2.Addr()))
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c2) // returns only at the server's FIN
	if err != nil || !bytes.Equal(got, greeting) {
		tb.Fatalf("client read %d bytes before end of stream (err %v), want the %d-byte greeting", len(got), err, len(greeting))
	}
	if _, err := c2.Write(upload); err != nil {
		tb.Fatalf("writing after the server's half-close: %v", err)
	}
	if err := c2.(closeWriter).CloseWrite(); err != nil {
		tb.Fatalf("CloseWrite: %v", err)
	}
	select {
	case got := <-serverGot:
		if !bytes.Equal(got, upload) {
			tb.Fatalf("server received %d bytes after its half-close, want %d", len(got), len(upload))
		}
	case <-ctx.Done():
		tb.Fatal("server never saw the client's end of stream")
	}
}

// CheckClosedPort dials a workspace port nobody listens on and requires a
// failure within limit: either the dial fails as refused, or (through a
// local listener) the connection is reset or ended without any data.
func CheckClosedPort(tb testing.TB, env Env, limit time.Duration) {
	tb.Helper()
	ln := env.listen(tb, "tcp4", "127.0.0.1:0")
	port := portOf(ln.Addr())
	ln.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	c, err := env.DialTCP(ctx, port)
	if err != nil {
		took := time.Since(start)
		// Through a local listener the reset can arrive while connect(2)
		// is still being confirmed, so the dial itself reports it.
		if !relay.IsRefused(err) && !errors.Is(err, syscall.ECONNRESET) {
			tb.Fatalf("dial to closed port %d failed with %v, want a refusal or a reset", port, err)
		}
		if took > limit {
			tb.Fatalf("refusal for closed port %d took %s, want under %s", port, took, limit)
		}
		tb.Logf("closed port %d refused in %s: %v", port, took.Round(time.Microsecond), err)
		return
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	took := time.Since(start)
	if n != 0 || err == nil {
		tb.Fatalf("closed port %d gave data", port)
	}
	if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		tb.Fatalf("closed port %d: connection hung for %s instead of failing", port, took.Round(time.Millisecond))
	}
	if took > limit {
		tb.Fatalf("closed port %d failed after %s, want under %s (%v)", port, took, limit, err)
	}
	tb.Logf("closed port %d failed in %s: %v", port, took.Round(time.Microsecond), err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// CheckIPv6Loopback reaches a server that listens on [::1] only; skipped
// when the workspace has no IPv6 loopback.
func CheckIPv6Loopback(tb testing.TB, env Env) {
	tb.Helper()
	listen := env.Listen
	if listen == nil {
		listen = net.Listen
	}
	ln, err := listen("tcp6", "[::1]:0")
	if err != nil {
		tb.Skipf("no IPv6 loopback in the workspace: %v", err)
	}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello from ::1\n"))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := env.DialTCP(ctx, portOf(ln.Addr()))
	if err != nil {
		tb.Fatalf("dial to a server on [::1] only: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "hello from ::1\n" {
		tb.Fatalf("server on [::1] said %q (err %v)", got, err)
	}
}

// CheckUDPEcho sends datagrams of several sizes to a UDP echo server on
// 127.0.0.1 in the workspace and checks each reply. Each datagram is retried
// a few times, since UDP may drop. The largest is 1200 bytes: the tailnet's
// MTU of 1280 leaves 1232 bytes of UDP payload over IPv6, and larger
// datagrams are not carried.
func CheckUDPEcho(tb testing.TB, env Env) {
	tb.Helper()
	pc := env.listenPacket(tb, "udp4", "127.0.0.1:0")
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := env.DialUDP(ctx, portOf(pc.LocalAddr()))
	if err != nil {
		tb.Fatalf("UDP dial: %v", err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	for i, size := range []int{1, 100, 512, 1000, 1200, 20, 1} {
		msg := pattern(uint64(500+i), size)
		ok := false
		for try := 0; try < 4 && !ok; try++ {
			if _, err := c.Write(msg); err != nil {
				tb.Fatalf("UDP write of %d bytes: %v", size, err)
			}
			c.SetReadDeadline(time.Now().Add(time.Second))
			for {
				n, err := c.Read(buf)
				if err != nil {
					break // timed out: send again
				}
				if bytes.Equal(buf[:n], msg) {
					ok = true
					break
				}
				// A late reply to an earlier try: keep reading.
			}
		}
		if !ok {
			tb.Fatalf("no UDP echo for datagram %d (%d bytes)", i, size)
		}
	}
}

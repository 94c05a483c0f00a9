package coordinator_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

// dialEdge opens one coordination WebSocket with token from source (a
// loopback address; "" for any) and returns the connection, or the HTTP
// status, Retry-After and body of a refusal.
func dialEdge(t *testing.T, tc *testCoordinator, token, source string) (conn *websocket.Conn, status int, retryAfter, body string) {
	t.Helper()
	hc, err := coordclient.HTTPClient(tc.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	hc.Timeout = 0
	if source != "" {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}}
		hc.Transport.(*http.Transport).DialContext = d.DialContext
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, tc.URL()+protocol.CoordinatePath, &websocket.DialOptions{
		HTTPClient:   hc,
		HTTPHeader:   http.Header{"Authorization": {"Bearer " + token}},
		Subprotocols: protocol.Subprotocols(),
	})
	if err == nil {
		t.Cleanup(func() { c.CloseNow() })
		return c, http.StatusSwitchingProtocols, "", ""
	}
	if resp == nil {
		t.Fatalf("dial from %q: %v", source, err)
	}
	b, _ := io.ReadAll(resp.Body)
	return nil, resp.StatusCode, resp.Header.Get("Retry-After"), string(b)
}

func rateLimitedCount(t *testing.T, tc *testCoordinator) string {
	for _, line := range strings.Split(scrape(t, tc), "\n") {
		if strings.HasPrefix(line, `coordinator_messages_rejected_total{reason="rate_limited"}`) {
			return strings.TrimSpace(strings.TrimPrefix(line, `coordinator_messages_rejected_total{reason="rate_limited"}`))
		}
	}
	return ""
}

// TestOneAbusiveTokenCannotStopOthers: a token that opens sessions without
// end hits its own cap and is told which limit and when to retry, counted
// as rate_limited, while other users keep connecting.
func TestOneAbusiveTokenCannotStopOthers(t *testing.T) {
	f := newFixture(t, coordOpts{tweak: func(c *coordinator.Config) {
		c.Limits = coordinator.EdgeLimits{MaxSessionsPerToken: 5}
	}})
	// Bob's token holds its five sessions...
	for i := range 5 {
		pc := startClient(t, f.tc, f.bobToken)
		recv(t, pc.rec.hellos, fmt.Sprintf("bob's session %d", i+1))
	}
	// ...and then hammers the coordinator from many goroutines.
	var refused atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, status, retry, body := dialEdge(t, f.tc, f.bobToken, ""); status == http.StatusTooManyRequests {
					if retry == "" || !strings.Contains(body, "the limit is 5") || !strings.Contains(body, "--max-sessions-per-token") || !strings.Contains(body, "retry in") {
						t.Errorf("refusal: Retry-After %q, body %s", retry, body)
					}
					refused.Add(1)
				}
			}
		}()
	}
	// Meanwhile Alice and Carol connect as usual.
	alice := startClient(t, f.tc, f.aliceToken)
	recv(t, alice.rec.hellos, "alice's hello while bob's token is over its limit")
	carol := startClient(t, f.tc, f.carolToken)
	recv(t, carol.rec.hellos, "carol's hello while bob's token is over its limit")
	close(stop)
	wg.Wait()
	if refused.Load() == 0 {
		t.Fatal("bob's token was never refused over its limit")
	}
	if got := rateLimitedCount(t, f.tc); got == "" || got == "0" {
		t.Fatalf("coordinator_messages_rejected_total{reason=\"rate_limited\"} = %q after %d refusals", got, refused.Load())
	}
}

// TestSessionRateAndAddressLimits: the new-session rate of one token, and
// the sessions of one address, are limited without touching others.
func TestSessionRateAndAddressLimits(t *testing.T) {
	f := newFixture(t, coordOpts{tweak: func(c *coordinator.Config) {
		c.Limits = coordinator.EdgeLimits{SessionRatePerToken: 0.5, SessionBurstPerToken: 3, MaxSessionsPerAddress: 3}
	}})
	// Rate: three at once from bob's token, then a refusal that says when
	// (from an address of its own, to keep the address count below exact).
	for i := range 3 {
		c, status, _, body := dialEdge(t, f.tc, f.bobToken, "127.0.0.3")
		if c == nil {
			t.Fatalf("bob's session %d within the burst: %d %s", i+1, status, body)
		}
		c.CloseNow()
	}
	_, status, retry, body := dialEdge(t, f.tc, f.bobToken, "127.0.0.3")
	if status != http.StatusTooManyRequests || retry == "" || !strings.Contains(body, "per second") || !strings.Contains(body, "--session-rate-per-token") {
		t.Fatalf("bob over the rate: %d Retry-After %q %s", status, retry, body)
	}
	// Alice's token has its own bucket.
	if c, status, _, body := dialEdge(t, f.tc, f.aliceToken, "127.0.0.1"); c == nil {
		t.Fatalf("alice while bob is over the rate: %d %s", status, body)
	}
	// Address: 127.0.0.1 holds alice's session; two more fill it.
	for range 2 {
		if c, status, _, body := dialEdge(t, f.tc, f.carolToken, "127.0.0.1"); c == nil {
			t.Fatalf("carol from 127.0.0.1: %d %s", status, body)
		}
	}
	_, status, retry, body = dialEdge(t, f.tc, f.carolToken, "127.0.0.1")
	if status != http.StatusTooManyRequests || retry == "" || !strings.Contains(body, "from this address") || !strings.Contains(body, "--max-sessions-per-address") {
		t.Fatalf("fourth session from 127.0.0.1: %d Retry-After %q %s", status, retry, body)
	}
	// Another address is not affected.
	if c, status, _, body := dialEdge(t, f.tc, f.carolToken, "127.0.0.2"); c == nil {
		t.Fatalf("carol from 127.0.0.2: %d %s", status, body)
	}
}

// TestIdleKeepAliveConnectionsAreClosed holds 500 keep-alive connections
// idle after one request each, as the test did, and checks that
// the coordinator closes every one after its idle timeout; a connection
// that never finishes its headers is closed after the header timeout.
func TestIdleKeepAliveConnectionsAreClosed(t *testing.T) {
	const n = 500
	idle := 2 * time.Second
	f := newFixture(t, coordOpts{tweak: func(c *coordinator.Config) {
		c.Limits = coordinator.EdgeLimits{HTTPIdleTimeout: idle, HTTPHeaderTimeout: idle}
	}})
	hc, err := coordclient.HTTPClient(f.tc.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg := hc.Transport.(*http.Transport).TLSClientConfig
	addr := f.tc.Addr().String()

	conns := make([]*tls.Conn, n)
	readers := make([]*bufio.Reader, n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, tlsCfg)
			if err != nil {
				errs <- err
				return
			}
			if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: coordinator\r\n\r\n"); err != nil {
				errs <- err
				return
			}
			br := bufio.NewReader(c)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				errs <- err
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.Close {
				errs <- fmt.Errorf("request %d: %s, close=%v", i, resp.Status, resp.Close)
				return
			}
			conns[i], readers[i] = c, br
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	lastRequest := time.Now()

	// A slow client that never finishes its headers.
	slow, err := tls.Dial("tcp", addr, tlsCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	io.WriteString(slow, "GET /healthz HTTP/1.1\r\nHost: coordinator\r\n")

	// Every idle connection ends (EOF) within the idle timeout plus slack
	// for a loaded machine; none is left open.
	deadline := lastRequest.Add(idle + 20*time.Second)
	var open atomic.Int64
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(deadline)
			_, err := readers[i].ReadByte()
			if errors.Is(err, io.EOF) || isReset(err) {
				return
			}
			open.Add(1)
		}()
	}
	wg.Wait()
	if o := open.Load(); o > 0 {
		t.Fatalf("%d of %d idle keep-alive connections were still open %v after their last request (idle timeout %v)", o, n, time.Since(lastRequest).Round(time.Millisecond), idle)
	}
	t.Logf("%d idle keep-alive connections closed %v after their last request (idle timeout %v)", n, time.Since(lastRequest).Round(time.Millisecond), idle)

	slow.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadAll(slow); err != nil && !isReset(err) {
		t.Fatalf("a connection stuck in its headers was not closed: %v", err)
	}
}

func isReset(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe"))
}

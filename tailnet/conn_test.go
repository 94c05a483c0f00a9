package tailnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

const derpOnlyEnv = "TAILNET_TEST_DERP_ONLY"

// pingUntil pings until cond holds for the result or the deadline passes.
func pingUntil(t *testing.T, c *Conn, ip netip.Addr, cond func(PingResult) bool) PingResult {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var last PingResult
	var lastErr error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		last, lastErr = c.Ping(ctx, ip)
		cancel()
		if lastErr == nil && cond(last) {
			return last
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("ping %v never satisfied the condition; last result %+v, err %v", ip, last, lastErr)
	return last
}

func awaitFast(t *testing.T, c *Conn, ip netip.Addr) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.AwaitReachable(ctx, ip); err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	// WireGuard retries a lost first handshake after 5 s; staying well
	// below that shows the pings got through without that stall.
	if d > 3*time.Second {
		t.Fatalf("AwaitReachable took %v; the first handshake stalled", d)
	}
	return d
}

func testPath(t *testing.T, wantDirect bool) {
	r := newTestRelay(t)
	start := time.Now()
	agent := newTestConn(t, r, 1, true)
	client := newTestConn(t, r, 2, false)
	link(t, agent, client)
	// Both nodes have a home relay that admitted them. Without UDP, a
	// network check that waits for STUN answers takes over 3 s to get
	// here (about 0.07 s when it measures over HTTPS at once; -race and a
	// loaded machine stretch both, so the figure is only logged).
	t.Logf("both nodes reported their home relay after %v", time.Since(start))
	if !wantDirect {
		if n := clientMetric("netcheck_stun_send_ipv4") + clientMetric("netcheck_stun_send_ipv6"); n != 0 {
			t.Fatalf("with direct paths blocked, the network check sent %d STUN probes and waited for answers that cannot come", n)
		}
		if clientMetric("netcheck_https_measure") == 0 {
			t.Fatal("with direct paths blocked, the relays were never measured over HTTPS")
		}
	}

	d := awaitFast(t, client, addrOf(agent))
	t.Logf("first TSMP pong after %v", d)

	if wantDirect {
		res := pingUntil(t, client, addrOf(agent), PingResult.Direct)
		if res.Endpoint.Port() == 0 || res.DERPRegionID != 0 {
			t.Fatalf("direct ping result %+v", res)
		}
		t.Logf("direct pong from %v in %v", res.Endpoint, res.Latency)
	} else {
		res := pingUntil(t, client, addrOf(agent), func(PingResult) bool { return true })
		if res.Direct() || res.DERPRegionID != DefaultRegionID || res.DERPRegionCode != "coord" {
			t.Fatalf("with direct blocked, ping went %+v; want DERP region %d (coord)", res, DefaultRegionID)
		}
	}

	transfer(t, client, agent, 80, 4<<20)

	st := client.PeerStatus()
	if len(st) != 1 || st[0].ID != 1 {
		t.Fatalf("peer status %+v", st)
	}
	if st[0].TxBytes < 4<<20 || st[0].RxBytes < 4<<20 || st[0].LastHandshake.IsZero() {
		t.Fatalf("peer status counters %+v", st[0])
	}
	path := st[0].Path
	if wantDirect && (path.Kind != PathDirect || !path.Endpoint.IsValid() || path.RegionCode != "") {
		t.Fatalf("peer path %+v, want direct with an endpoint", path)
	}
	if !wantDirect && (path != PeerPath{Kind: PathRelayed, RegionID: DefaultRegionID, RegionCode: "coord"}) {
		t.Fatalf("peer path %+v, want relayed through region %d (coord)", path, DefaultRegionID)
	}
}

func TestDirectPath(t *testing.T) {
	if os.Getenv(derpOnlyEnv) == "1" {
		t.Skip("direct path is blocked in this process")
	}
	testPath(t, true)
}

// TestDERPOnly runs the DERP-only checks in a child process, because
// blocking direct paths is a process-wide switch in Tailscale.
func TestDERPOnly(t *testing.T) {
	if os.Getenv(derpOnlyEnv) == "1" {
		testPath(t, false)
		return
	}
	args := []string{"-test.run=^TestDERPOnly$", "-test.v"}
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), derpOnlyEnv+"=1")
	out, err := cmd.CombinedOutput()
	t.Logf("child output:\n%s", out)
	if err != nil {
		t.Fatalf("DERP-only child failed: %v", err)
	}
	if !strings.Contains(string(out), "--- PASS: TestDERPOnly") {
		t.Fatal("DERP-only child did not run the test")
	}
}

func TestPeerRestartNewDiscoKey(t *testing.T) {
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true)
	client := newTestConn(t, r, 2, false)
	link(t, agent, client)
	awaitFast(t, client, addrOf(agent))
	transfer(t, client, agent, 80, 64<<10)

	// The agent restarts: same node key and address, new disco key.
	oldDisco := agent.Node().DiscoKey
	priv := agent.PrivateKey()
	agent.Close()
	agent2 := newTestConn(t, r, 1, true, func(o *Options) { o.PrivateKey = priv })
	if agent2.Node().DiscoKey == oldDisco {
		t.Fatal("restarted node kept its disco key")
	}
	link(t, agent2, client)
	d := awaitFast(t, client, addrOf(agent2))
	t.Logf("reachable again %v after the peer's restart was announced", d)
	transfer(t, client, agent2, 80, 64<<10)
}

func TestFilterAndUnknownPeers(t *testing.T) {
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true)
	client := newTestConn(t, r, 2, false)
	stranger := newTestConn(t, r, 3, true)
	link(t, agent, client)
	awaitFast(t, client, addrOf(agent))

	ln, err := agent.Listen(22)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.Copy(c, c)
			c.Close()
		}
	}()

	dialFails := func(from, to *Conn, port uint16, why string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		defer cancel()
		c, err := from.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(to), port))
		if err == nil {
			c.Close()
			t.Fatalf("%s: dial succeeded", why)
		}
	}

	// The stranger knows the agent, but the agent was never told about
	// the stranger: WireGuard does not answer its handshake.
	if err := stranger.UpsertPeer(waitNode(t, agent)); err != nil {
		t.Fatal(err)
	}
	dialFails(stranger, agent, 22, "unknown peer to agent")

	// A client accepts no inbound flows, even from a known peer.
	cln, err := client.Listen(22)
	if err != nil {
		t.Fatal(err)
	}
	defer cln.Close()
	dialFails(agent, client, 22, "agent to client (AcceptInbound=false)")

	// Known client to agent works...
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(agent), 22))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("hi"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("echo: %q %v", buf, err)
	}
	c.Close()

	// ...until the agent removes it.
	agent.RemovePeer(client.Node().ID)
	client.SetNodeCallback(nil)
	dialFails(client, agent, 22, "removed peer to agent")
	if _, err := agent.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(client), 22)); err == nil {
		t.Fatal("dial to a removed peer's address succeeded")
	}
}

func TestFallbacks(t *testing.T) {
	r := newTestRelay(t)
	agent := newTestConn(t, r, 1, true)
	client := newTestConn(t, r, 2, false)
	link(t, agent, client)
	awaitFast(t, client, addrOf(agent))

	agent.SetTCPFallback(func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		if src.Addr() != addrOf(client) {
			t.Errorf("fallback src %v, want %v", src, addrOf(client))
		}
		if dst.Port() != 7000 {
			return nil, false
		}
		return func(c net.Conn) { io.Copy(c, c); c.Close() }, true
	})
	agent.SetUDPFallback(func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		if dst.Port() != 5353 {
			return nil, false
		}
		return func(c net.Conn) {
			defer c.Close()
			buf := make([]byte, 1500)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			c.Write(append([]byte("echo:"), buf[:n]...))
		}, true
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(agent), 7000))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("ping"))
	if cw, ok := c.(interface{ CloseWrite() error }); !ok {
		t.Fatal("dialed conn has no CloseWrite")
	} else if err := cw.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "ping" {
		t.Fatalf("tcp fallback echo %q, %v", got, err)
	}
	c.Close()

	// A refused port resets at once instead of timing out.
	start := time.Now()
	_, err = client.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(agent), 7001))
	if err == nil {
		t.Fatal("dial to a refused port succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("refused dial took %v; want an immediate reset", d)
	}

	u, err := client.DialContextUDP(ctx, netip.AddrPortFrom(addrOf(agent), 5353))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.Write([]byte("hello"))
	u.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	n, err := u.Read(buf)
	if err != nil || string(buf[:n]) != "echo:hello" {
		t.Fatalf("udp fallback reply %q, %v", buf[:n], err)
	}
}

func TestListenerClose(t *testing.T) {
	r := newTestRelay(t)
	c := newTestConn(t, r, 1, true)
	ln, err := c.Listen(22)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Listen(22); err == nil {
		t.Fatal("second Listen on the same port succeeded")
	}
	done := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		done <- err
	}()
	ln.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
	ln2, err := c.Listen(22)
	if err != nil {
		t.Fatalf("listen again after close: %v", err)
	}
	ln2.Close()
	if _, err := c.Listen(0); err == nil {
		t.Fatal("Listen(0) succeeded")
	}
}

func TestUpsertPeerRefusesBadNodes(t *testing.T) {
	r := newTestRelay(t)
	a := newTestConn(t, r, 1, true)
	b := newTestConn(t, r, 2, true)
	nb := b.Node()
	nb.HomeDERP = DefaultRegionID

	bad := nb.Clone()
	bad.Addresses = a.Addresses()
	if err := a.UpsertPeer(bad); err == nil || !strings.Contains(err.Error(), "our own address") {
		t.Fatalf("peer claiming our address: %v", err)
	}
	bad = nb.Clone()
	bad.DiscoKey = ""
	if err := a.UpsertPeer(bad); err == nil {
		t.Fatal("peer without disco key accepted")
	}
	if err := a.UpsertPeer(nb); err != nil {
		t.Fatal(err)
	}
	other := nb.Clone()
	other.ID = 3
	other.Key = a.Node().Key
	if err := a.UpsertPeer(other); err == nil {
		t.Fatal("peer with our own key accepted")
	}
	other = nb.Clone()
	other.ID = 3
	other.Key = "nodekey:" + strings.Repeat("11", 32)
	if err := a.UpsertPeer(other); err == nil || !strings.Contains(err.Error(), "belongs to peer 2") {
		t.Fatalf("peer claiming another peer's address: %v", err)
	}
}

func TestTwoAddressesAndClose(t *testing.T) {
	r := newTestRelay(t)
	withV4 := func(id NodeID) connOpt {
		return func(o *Options) {
			o.Addresses = append(o.Addresses, netip.MustParsePrefix(fmt.Sprintf("100.64.0.%d/32", id)))
		}
	}
	agent := newTestConn(t, r, 1, true, withV4(1))
	client := newTestConn(t, r, 2, false, withV4(2))
	link(t, agent, client)
	awaitFast(t, client, addrOf(agent))

	ln, err := agent.Listen(22)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(c.LocalAddr().String()))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, a := range agent.Addresses() {
		dst := netip.AddrPortFrom(a.Addr(), 22)
		c, err := client.DialContextTCP(ctx, dst)
		if err != nil {
			t.Fatalf("dial %v: %v", dst, err)
		}
		got, _ := io.ReadAll(c)
		c.Close()
		if string(got) != dst.String() {
			t.Fatalf("dial %v reached %q", dst, got)
		}
	}

	client.Close()
	if _, err := client.DialContextTCP(ctx, netip.AddrPortFrom(addrOf(agent), 22)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("dial after Close: %v", err)
	}
	if _, err := client.Listen(22); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("listen after Close: %v", err)
	}
	if err := client.UpsertPeer(agent.Node()); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("upsert after Close: %v", err)
	}
	client.RemovePeer(1)
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestLargeUDPOverIPv4 sends a datagram larger than the MTU, which IPv4
// fragments and reassembles inside the tailnet. (Over IPv6 tailnet
// addresses such datagrams are dropped by Tailscale's netstack in
// v1.102.5: see docs/architecture.md.)
func TestLargeUDPOverIPv4(t *testing.T) {
	r := newTestRelay(t)
	v4 := func(id NodeID) connOpt {
		return func(o *Options) {
			o.Addresses = []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("100.64.0.%d/32", id))}
		}
	}
	agent := newTestConn(t, r, 1, true, v4(1))
	client := newTestConn(t, r, 2, false, v4(2))
	link(t, agent, client)
	awaitFast(t, client, addrOf(agent))
	agent.SetUDPFallback(func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		return func(c net.Conn) {
			defer c.Close()
			buf := make([]byte, 65535)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := c.Read(buf); err == nil {
				c.Write(buf[:n])
			}
		}, true
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u, err := client.DialContextUDP(ctx, netip.AddrPortFrom(addrOf(agent), 9))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	dgram := []byte(strings.Repeat("0123456789", 400))
	u.Write(dgram)
	u.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65535)
	n, err := u.Read(buf)
	if err != nil || string(buf[:n]) != string(dgram) {
		t.Fatalf("4000-byte datagram echo: %d bytes, %v", n, err)
	}
}

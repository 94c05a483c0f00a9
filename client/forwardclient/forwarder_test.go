package forwardclient_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/agent/portforward"
	"github.com/agentd/agent/client/forwardclient"
	"github.com/agentd/agent/internal/testkit/pftest"
)

func TestParseMappings(t *testing.T) {
	lo := netip.MustParseAddr("127.0.0.1")
	v6 := netip.MustParseAddr("::1")
	tcp := func(bind netip.Addr, l, r uint16) forwardclient.Mapping {
		return forwardclient.Mapping{Network: "tcp", Bind: bind, Local: l, Remote: r}
	}
	for _, tc := range []struct {
		spec string
		want []forwardclient.Mapping
	}{
		{"5432", []forwardclient.Mapping{tcp(netip.Addr{}, 5432, 5432)}},
		{"8080:3000", []forwardclient.Mapping{tcp(netip.Addr{}, 8080, 3000)}},
		{"8000-8002", []forwardclient.Mapping{tcp(netip.Addr{}, 8000, 8000), tcp(netip.Addr{}, 8001, 8001), tcp(netip.Addr{}, 8002, 8002)}},
		{"18000-18001:8000-8001", []forwardclient.Mapping{tcp(netip.Addr{}, 18000, 8000), tcp(netip.Addr{}, 18001, 8001)}},
		{"127.0.0.1:9000:9001", []forwardclient.Mapping{tcp(lo, 9000, 9001)}},
		{"127.0.0.1:9000", []forwardclient.Mapping{tcp(lo, 9000, 9000)}},
		{"[::1]:9000:9000", []forwardclient.Mapping{tcp(v6, 9000, 9000)}},
		{"0:3000", []forwardclient.Mapping{tcp(netip.Addr{}, 0, 3000)}},
	} {
		got, err := forwardclient.ParseMappings("tcp", []string{tc.spec})
		if err != nil {
			t.Errorf("%q: %v", tc.spec, err)
			continue
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%q: got %v, want %v", tc.spec, got, tc.want)
		}
	}
	for _, tc := range []struct{ spec, wantErr string }{
		{"", "empty"},
		{"abc", `port "abc" is not a number`},
		{"70000", `port "70000" is not a number`},
		{"8080:2", "belong to the agent"},
		{"3", "belong to the agent"},
		{"8010-8000", "runs backwards"},
		{"8000-8010:9000-9001", "has 11 ports but workspace range 9000-9001 has 2"},
		{"1-5000:10-5009", "at most 1024"},
		{"host:80:80", `"host" is not an IP address`},
		{"::1:80:80", "too many colons"},
		{"[::1]80", "IPv6 address must look like"},
		{"0-3:10-13", "cannot start a range"},
	} {
		_, err := forwardclient.ParseMappings("tcp", []string{tc.spec})
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%q: error %v, want one containing %q", tc.spec, err, tc.wantErr)
		}
	}
	if _, err := forwardclient.ParseMappings("sctp", []string{"80"}); err == nil {
		t.Error("an unknown network was accepted")
	}
}

// agentPath is the agent side behind the loopback stand-in for the tailnet.
func agentPath(t *testing.T) *pftest.Tunnel {
	t.Helper()
	f := portforward.New(portforward.Options{})
	tun, err := pftest.NewTunnel(pftest.TunnelOptions{TCP: f.TCP, UDP: f.UDP, Opaque: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tun.Close()
		f.Close()
	})
	return tun
}

func TestLocalPortInUse(t *testing.T) {
	busy, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port := uint16(busy.Addr().(*net.TCPAddr).Port)
	ms, err := forwardclient.ParseMappings("tcp", []string{fmt.Sprintf("%d:3000", port), "0:3001"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = forwardclient.Listen(forwardclient.Options{Dialer: agentPath(t)}, ms)
	want := fmt.Sprintf("local tcp port %d on 127.0.0.1 is already in use: choose another local port", port)
	if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("error %v, want one line containing %q", err, want)
	}
}

func TestDuplicateLocalPort(t *testing.T) {
	ms, _ := forwardclient.ParseMappings("tcp", []string{"18080:3000", "18080:3001"})
	_, err := forwardclient.Listen(forwardclient.Options{Dialer: agentPath(t)}, ms)
	if err == nil || !strings.Contains(err.Error(), "local tcp port 18080 is given twice") {
		t.Fatalf("error %v", err)
	}
}

// The person at the terminal is told in one line that nothing listens in
// the workspace, and the local client is reset at once.
func TestClosedWorkspacePortIsReported(t *testing.T) {
	pftest.NoLeaks(t)
	path := pftest.NewClientPath(t, agentPath(t))
	pftest.CheckClosedPort(t, path.Env(), 100*time.Millisecond)
	deadline := time.Now().Add(2 * time.Second)
	for len(path.Notices()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	notices := path.Notices()
	if len(notices) != 1 || !strings.HasPrefix(notices[0], "nothing listens on port ") || !strings.Contains(notices[0], " in the workspace") {
		t.Fatalf("notices %q, want one saying nothing listens on the port in the workspace", notices)
	}
}

// Several mappings at once, a range among them, each reaching its own
// workspace server; one line per mapping; IPv6 loopback too when present.
func TestManyMappingsAndDefaultBind(t *testing.T) {
	pftest.NoLeaks(t)
	tun := agentPath(t)
	var remotes []uint16
	for i := range 3 {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		remotes = append(remotes, uint16(ln.Addr().(*net.TCPAddr).Port))
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "server %d\n", i)
				c.Close()
			}
		}()
	}
	var ms []forwardclient.Mapping
	for _, r := range remotes {
		ms = append(ms, forwardclient.Mapping{Network: "tcp", Remote: r})
	}
	f, err := forwardclient.Listen(forwardclient.Options{Dialer: tun}, ms)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- f.Serve(ctx) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	active := f.Active()
	if len(active) != 3 {
		t.Fatalf("%d active mappings, want 3", len(active))
	}
	_, v6err := net.Listen("tcp6", "[::1]:0")
	for i, a := range active {
		line := a.String()
		if strings.Count(line, "\n") != 0 || !strings.Contains(line, fmt.Sprintf("-> workspace port %d", remotes[i])) {
			t.Errorf("mapping line %q", line)
		}
		if a.Addrs[0].Addr() != netip.MustParseAddr("127.0.0.1") {
			t.Errorf("first address %v, want 127.0.0.1", a.Addrs[0])
		}
		if v6err == nil && (len(a.Addrs) != 2 || a.Addrs[1].Addr() != netip.IPv6Loopback() || a.Addrs[1].Port() != a.Addrs[0].Port()) {
			t.Errorf("addresses %v, want 127.0.0.1 and ::1 on the same port", a.Addrs)
		}
		for _, addr := range a.Addrs {
			c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(c)
			c.Close()
			if err != nil || string(got) != fmt.Sprintf("server %d\n", i) {
				t.Errorf("through %v: %q, %v", addr, got, err)
			}
		}
	}
}

// Closing the forwarder ends open connections and UDP flows and leaves no
// goroutines or sockets behind.
func TestCloseEndsEverything(t *testing.T) {
	pftest.NoLeaks(t)
	tun := agentPath(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
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
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ms := []forwardclient.Mapping{
		{Network: "tcp", Bind: netip.MustParseAddr("127.0.0.1"), Remote: uint16(ln.Addr().(*net.TCPAddr).Port)},
		{Network: "udp", Bind: netip.MustParseAddr("127.0.0.1"), Remote: uint16(pc.LocalAddr().(*net.UDPAddr).Port)},
	}
	f, err := forwardclient.Listen(forwardclient.Options{Dialer: tun}, ms)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- f.Serve(context.Background()) }()
	var conns []net.Conn
	for range 20 {
		c, err := net.Dial("tcp4", f.Active()[0].Addrs[0].String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	u, err := net.Dial("udp4", f.Active()[1].Addrs[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.Write([]byte("hello"))
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := pc.ReadFrom(make([]byte, 16)); err != nil {
		t.Fatalf("datagram did not arrive: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		tcpConns, udpFlows := f.Stats()
		if tcpConns == 40 && udpFlows == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats %d TCP connections and %d UDP flows, want 40 and 1", tcpConns, udpFlows)
		}
		time.Sleep(5 * time.Millisecond)
	}
	f.Close()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a connection stayed open after Close")
		}
	}
	if tcpConns, udpFlows := f.Stats(); tcpConns != 0 || udpFlows != 0 {
		t.Fatalf("after Close: %d TCP connections, %d UDP flows", tcpConns, udpFlows)
	}
}

func TestListPortsAndTable(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	srv := httptest.NewServer(portforward.NewDiscovery(portforward.DiscoveryOptions{SelfPID: -1, CacheFor: -1}))
	defer srv.Close()
	ports, err := forwardclient.ListPorts(context.Background(), srv.Client(), srv.URL+"/")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := forwardclient.WritePortsTable(&b, ports); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(b.String(), "\n")
	if !strings.HasPrefix(lines[0], "PORT") || !strings.Contains(lines[0], "PROCESS") {
		t.Fatalf("table heading %q", lines[0])
	}
	found := false
	for _, l := range lines[1:] {
		if strings.HasPrefix(l, fmt.Sprintf("%d ", port)) && strings.Contains(l, "127.0.0.1") {
			found = true
		}
	}
	if !found {
		t.Fatalf("port %d not in table:\n%s", port, b.String())
	}

	b.Reset()
	forwardclient.WritePortsTable(&b, nil)
	if b.String() != "No TCP ports are listening in the workspace.\n" {
		t.Fatalf("empty table %q", b.String())
	}

	srv.Close()
	if _, err := forwardclient.ListPorts(context.Background(), srv.Client(), srv.URL); err == nil || !strings.Contains(err.Error(), "asking the agent for listening ports") {
		t.Fatalf("error %v", err)
	}
}

func TestBindAddressNotHere(t *testing.T) {
	ms := []forwardclient.Mapping{{Network: "tcp", Bind: netip.MustParseAddr("192.0.2.1"), Local: 18080, Remote: 3000}}
	_, err := forwardclient.Listen(forwardclient.Options{Dialer: agentPath(t)}, ms)
	want := "cannot listen on 192.0.2.1:18080: 192.0.2.1 is not an address of this machine; use --bind with a local address"
	if err == nil || err.Error() != want {
		t.Fatalf("error %v, want %q", err, want)
	}
}

package netlab

import (
	"bufio"
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestTwoSitesNAT builds the coordinator-and-two-sites topology and checks
// that hosts reach the coordinator across their NAT, that the coordinator
// sees the routers' public addresses (masquerade), that the mapping keeps
// the source port (endpoint-independent), and that DropUDP blocks UDP but
// not TCP. It also checks that everything is gone after cleanup.
func TestTwoSitesNAT(t *testing.T) {
	var names []string
	t.Run("lab", func(t *testing.T) {
		lab := New(t)
		ts := lab.NewTwoSites(NATEndpointIndependent)
		for _, ns := range []*Namespace{ts.Internet.NS, ts.Coordinator, ts.Site1.Router, ts.Site2.Router, ts.Host1, ts.Host2} {
			names = append(names, ns.Name())
			if len(ns.Name()) > 15 {
				t.Errorf("namespace name %q longer than 15 characters", ns.Name())
			}
		}

		// ICMP across the NAT, with the system's ping.
		if _, err := lookPath("ping"); err == nil {
			ts.Host1.MustRun("ping", "-c", "1", "-W", "2", ts.CoordinatorAddr.String())
		}
		// The private sides are not reachable from the internet.
		if out, err := ts.Coordinator.Run(context.Background(), "ping", "-c", "1", "-W", "1", ts.Host1Addr.String()); err == nil {
			t.Errorf("coordinator reached a private address across NAT:\n%s", out)
		}

		// TCP: the coordinator sees router1's public address.
		ln, err := ts.Coordinator.Listen("tcp", net.JoinHostPort(ts.CoordinatorAddr.String(), "0"))
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
				_, _ = c.Write([]byte(c.RemoteAddr().String() + "\n"))
				c.Close()
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := ts.Host1.DialContext(ctx, "tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("host1 → coordinator over TCP: %v", err)
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		seen := netip.MustParseAddrPort(strings.TrimSpace(line))
		if seen.Addr() != ts.Site1.Public {
			t.Errorf("coordinator saw %v, want router1's public address %v", seen, ts.Site1.Public)
		}

		// UDP from one socket to two ports: the same public port both times.
		echo := func(port string) (net.PacketConn, error) {
			pc, err := ts.Coordinator.ListenPacket("udp", net.JoinHostPort(ts.CoordinatorAddr.String(), port))
			if err != nil {
				return nil, err
			}
			go func() {
				buf := make([]byte, 1500)
				for {
					_, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					_, _ = pc.WriteTo([]byte(from.String()), from)
				}
			}()
			return pc, nil
		}
		e1, err := echo("0")
		if err != nil {
			t.Fatal(err)
		}
		defer e1.Close()
		e2, err := echo("0")
		if err != nil {
			t.Fatal(err)
		}
		defer e2.Close()
		client, err := ts.Host2.ListenPacket("udp", ":0")
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		ask := func(to net.Addr) (netip.AddrPort, error) {
			if _, err := client.WriteTo([]byte("?"), to); err != nil {
				return netip.AddrPort{}, err
			}
			_ = client.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 100)
			n, _, err := client.ReadFrom(buf)
			if err != nil {
				return netip.AddrPort{}, err
			}
			return netip.ParseAddrPort(string(buf[:n]))
		}
		m1, err := ask(e1.LocalAddr())
		if err != nil {
			t.Fatalf("UDP through NAT: %v", err)
		}
		m2, err := ask(e2.LocalAddr())
		if err != nil {
			t.Fatalf("UDP through NAT: %v", err)
		}
		if m1.Addr() != ts.Site2.Public || m1 != m2 {
			t.Errorf("mappings %v and %v: want the same port on %v (endpoint-independent)", m1, m2, ts.Site2.Public)
		}

		// Block UDP at router2: UDP fails, TCP still works.
		ts.Site2.Router.DropUDP(53)
		if m, err := ask(e1.LocalAddr()); err == nil {
			t.Errorf("UDP passed a router with DropUDP (mapped %v)", m)
		}
		c, err = ts.Host2.DialContext(ctx, "tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("TCP through a router with DropUDP: %v", err)
		}
		c.Close()
		ts.Site2.Router.AllowUDP()
		if _, err := ask(e1.LocalAddr()); err != nil {
			t.Errorf("UDP after AllowUDP: %v", err)
		}

		// WriteEtc reaches programs started in the namespace.
		ts.Host1.WriteEtc("hosts", "203.0.113.10 coordinator.test\n")
		if out := ts.Host1.MustRun("cat", "/etc/hosts"); !strings.Contains(out, "coordinator.test") {
			t.Errorf("/etc/hosts in the namespace is %q", out)
		}
	})
	for _, n := range names {
		if _, err := os.Stat(filepath.Join("/run/netns", n)); !os.IsNotExist(err) {
			t.Errorf("namespace %s still exists after cleanup", n)
		}
		if _, err := os.Stat(filepath.Join("/etc/netns", n)); !os.IsNotExist(err) {
			t.Errorf("/etc/netns/%s still exists after cleanup", n)
		}
	}
}

// TestHardNAT checks that NATEndpointDependent gives a different public port
// per destination.
func TestHardNAT(t *testing.T) {
	lab := New(t)
	in := lab.Internet()
	srv := in.Host("srv", "203.0.113.20")
	site := in.NATRouter("r", "203.0.113.21", "10.9.0.0/24", NATEndpointDependent)
	host, _ := site.Host("h")

	var echoes []net.PacketConn
	for range 2 {
		pc, err := srv.ListenPacket("udp", "203.0.113.20:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		echoes = append(echoes, pc)
		go func() {
			buf := make([]byte, 100)
			for {
				_, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo([]byte(from.String()), from)
			}
		}()
	}
	client, err := host.ListenPacket("udp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	var seen []string
	for _, e := range echoes {
		if _, err := client.WriteTo([]byte("?"), e.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		_ = client.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 100)
		n, _, err := client.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, string(buf[:n]))
	}
	if seen[0] == seen[1] {
		t.Errorf("hard NAT mapped both destinations to %s", seen[0])
	}
}

// TestBridgeAndMTU covers the node-with-a-bridge shape netcheck uses.
func TestBridgeAndMTU(t *testing.T) {
	lab := New(t)
	node := lab.Namespace("node")
	pod := lab.Namespace("pod")
	node.Bridge("cni0", "10.88.0.1/24")
	lab.Link(node, "veth1", "", pod, "eth0", "10.88.0.2/24")
	node.Attach("veth1", "cni0")
	pod.Route("default via 10.88.0.1")
	node.SetMTU("veth1", 1400)
	if out := node.IP("-o", "link", "show", "veth1"); !strings.Contains(out, "master cni0") || !strings.Contains(out, "mtu 1400") {
		t.Errorf("veth1: %s", out)
	}
	if _, err := lookPath("ping"); err == nil {
		pod.MustRun("ping", "-c", "1", "-W", "2", "10.88.0.1")
	}
}

// TestConntrackClash shows the two router kinds apart. Host2 sends to
// host1's public address and port first (a laptop's early hole punching),
// then host1 sends from that port to host2. Behind a home router
// (DropUnsolicited) host1's packet leaves with its port kept and host2's
// router lets it in as a reply. Behind a router that accepts unsolicited
// UDP, host2's packet left a conntrack entry on router1 that owns the port,
// so host1's flow leaves from another port and host2's router drops it.
func TestConntrackClash(t *testing.T) {
	for _, tc := range []struct {
		name     string
		fw       Firewall
		wantRecv bool
	}{
		{"DropUnsolicited", DropUnsolicited, true},
		{"AcceptUnsolicited", AcceptUnsolicited, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lab := New(t)
			ts := lab.NewTwoSitesWith(NATEndpointIndependent, tc.fw, DropUnsolicited)
			h1, err := ts.Host1.ListenPacket("udp4", ":0")
			if err != nil {
				t.Fatal(err)
			}
			defer h1.Close()
			h2, err := ts.Host2.ListenPacket("udp4", ":0")
			if err != nil {
				t.Fatal(err)
			}
			defer h2.Close()
			p1 := h1.LocalAddr().(*net.UDPAddr).Port
			p2 := h2.LocalAddr().(*net.UDPAddr).Port
			// Endpoint-independent mapping keeps the ports when they are free.
			pub1 := &net.UDPAddr{IP: ts.Site1.Public.AsSlice(), Port: p1}
			pub2 := &net.UDPAddr{IP: ts.Site2.Public.AsSlice(), Port: p2}
			if _, err := h2.WriteTo([]byte("early"), pub1); err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
			if _, err := h1.WriteTo([]byte("hello"), pub2); err != nil {
				t.Fatal(err)
			}
			_ = h2.SetReadDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 100)
			n, from, err := h2.ReadFrom(buf)
			got := err == nil && string(buf[:n]) == "hello"
			if got != tc.wantRecv {
				t.Errorf("host2 received host1's packet: %v (from %v, err %v), want %v", got, from, err, tc.wantRecv)
			}
			if got && from.String() != pub1.String() {
				t.Errorf("host1's packet came from %v, want its kept port %v", from, pub1)
			}
		})
	}
}

package netlab

import (
	"fmt"
	"net/netip"
	"sync"
)

// Internet is a flat public network, 203.0.113.0/24 unless told otherwise:
// a namespace holding a bridge that every public host and NAT router plugs
// into. The bridge itself has the first address of the prefix and acts as
// everyone's default gateway.
type Internet struct {
	lab    *Lab
	NS     *Namespace
	Prefix netip.Prefix
	// Gateway is the bridge's own address, the public hosts' default route.
	Gateway netip.Addr

	mu    sync.Mutex
	ports int
}

// Internet creates the public network on 203.0.113.0/24.
func (l *Lab) Internet() *Internet {
	l.t.Helper()
	return l.InternetOn(netip.MustParsePrefix("203.0.113.0/24"))
}

// InternetOn creates a public network on another prefix (a documentation
// range, e.g. 198.51.100.0/24).
func (l *Lab) InternetOn(prefix netip.Prefix) *Internet {
	l.t.Helper()
	prefix = prefix.Masked()
	gw := prefix.Addr().Next()
	ns := l.Namespace("inet")
	ns.Bridge("br0", cidr(gw, prefix))
	return &Internet{lab: l, NS: ns, Prefix: prefix, Gateway: gw}
}

func cidr(a netip.Addr, p netip.Prefix) string {
	return netip.PrefixFrom(a, p.Bits()).String()
}

// plug connects ns to the internet's bridge through a new veth whose inside
// end is ifname and gets addr.
func (in *Internet) plug(ns *Namespace, ifname string, addr netip.Addr) {
	in.lab.t.Helper()
	if !in.Prefix.Contains(addr) {
		in.lab.t.Fatalf("netlab: %s is outside the internet's %s", addr, in.Prefix)
	}
	in.mu.Lock()
	in.ports++
	port := fmt.Sprintf("p%d", in.ports)
	in.mu.Unlock()
	in.lab.Link(in.NS, port, "", ns, ifname, cidr(addr, in.Prefix))
	in.NS.Attach(port, "br0")
}

// Host creates a namespace with a public address on the internet (eth0,
// default route via the internet's gateway), e.g. a coordinator.
func (in *Internet) Host(name, addr string) *Namespace {
	in.lab.t.Helper()
	a := netip.MustParseAddr(addr)
	ns := in.lab.Namespace(name)
	in.plug(ns, "eth0", a)
	ns.Route("default via " + in.Gateway.String())
	return ns
}

// Site is a private network behind a NAT router.
type Site struct {
	lab    *Lab
	Router *Namespace
	// Public is the router's address on the internet (its "wan0").
	Public netip.Addr
	// LAN is the private prefix; Gateway, its first address, sits on the
	// router's bridge "lan0".
	LAN     netip.Prefix
	Gateway netip.Addr

	mu    sync.Mutex
	hosts int
}

// NATRouter creates a router on the internet with public address publicAddr
// (interface wan0) and a private LAN lanCIDR (e.g. "10.1.0.0/24") on bridge
// lan0, with forwarding on and nftables masquerade of everything leaving
// wan0 in the given mode.
func (in *Internet) NATRouter(name, publicAddr, lanCIDR string, mode NATMode) *Site {
	in.lab.t.Helper()
	return in.NATRouterWith(name, publicAddr, lanCIDR, mode, DropUnsolicited)
}

// NATRouterWith is NATRouter with the given treatment of unsolicited
// inbound UDP: DropUnsolicited for a home router, AcceptUnsolicited for a
// Kubernetes node.
func (in *Internet) NATRouterWith(name, publicAddr, lanCIDR string, mode NATMode, fw Firewall) *Site {
	in.lab.t.Helper()
	pub := netip.MustParseAddr(publicAddr)
	lan := netip.MustParsePrefix(lanCIDR).Masked()
	gw := lan.Addr().Next()
	r := in.lab.Namespace(name)
	in.plug(r, "wan0", pub)
	r.Route("default via " + in.Gateway.String())
	r.Bridge("lan0", cidr(gw, lan))
	r.EnableForwarding()
	r.MasqueradeWith("wan0", mode, fw)
	return &Site{lab: in.lab, Router: r, Public: pub, LAN: lan, Gateway: gw}
}

// Host creates a namespace behind the router: eth0 with the next free LAN
// address, default route via the router. It returns the namespace and its
// address.
func (s *Site) Host(name string) (*Namespace, netip.Addr) {
	s.lab.t.Helper()
	s.mu.Lock()
	s.hosts++
	n := s.hosts
	s.mu.Unlock()
	addr := s.Gateway
	for range n {
		addr = addr.Next()
	}
	if !s.LAN.Contains(addr) {
		s.lab.t.Fatalf("netlab: LAN %s is full", s.LAN)
	}
	ns := s.lab.Namespace(name)
	port := fmt.Sprintf("h%d", n)
	s.lab.Link(s.Router, port, "", ns, "eth0", cidr(addr, s.LAN))
	s.Router.Attach(port, "lan0")
	ns.Route("default via " + s.Gateway.String())
	return ns, addr
}

// TwoSites is the usual tailnet test topology: a coordinator on the
// internet and two NAT'd sites with one host each.
//
//	coordinator 203.0.113.10 ─┐
//	                          inet br0 203.0.113.1
//	site1 router 203.0.113.11 ┤ NAT ── 10.1.0.1/24 ── host1 10.1.0.2
//	site2 router 203.0.113.12 ┘ NAT ── 10.2.0.1/24 ── host2 10.2.0.2
type TwoSites struct {
	Internet        *Internet
	Coordinator     *Namespace
	CoordinatorAddr netip.Addr
	Site1, Site2    *Site
	Host1, Host2    *Namespace
	Host1Addr       netip.Addr
	Host2Addr       netip.Addr
}

// NewTwoSites builds the TwoSites topology with both routers in the given
// NAT mode.
func (l *Lab) NewTwoSites(mode NATMode) *TwoSites {
	l.t.Helper()
	return l.NewTwoSitesWith(mode, DropUnsolicited, DropUnsolicited)
}

// NewTwoSitesWith builds the TwoSites topology with each router's treatment
// of unsolicited inbound UDP given: site1 (the workspace's, in the e2e
// tests) AcceptUnsolicited and site2 DropUnsolicited is a pod on a
// Kubernetes node reached from a laptop at home.
func (l *Lab) NewTwoSitesWith(mode NATMode, site1, site2 Firewall) *TwoSites {
	l.t.Helper()
	in := l.Internet()
	ts := &TwoSites{Internet: in, CoordinatorAddr: netip.MustParseAddr("203.0.113.10")}
	ts.Coordinator = in.Host("coord", ts.CoordinatorAddr.String())
	ts.Site1 = in.NATRouterWith("router1", "203.0.113.11", "10.1.0.0/24", mode, site1)
	ts.Site2 = in.NATRouterWith("router2", "203.0.113.12", "10.2.0.0/24", mode, site2)
	ts.Host1, ts.Host1Addr = ts.Site1.Host("host1")
	ts.Host2, ts.Host2Addr = ts.Site2.Host("host2")
	return ts
}

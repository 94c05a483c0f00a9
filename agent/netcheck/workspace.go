package netcheck

import (
	"context"
	"errors"
	"fmt"
	"github.com/agentd/agent/agent/netcheck/internal/netstate"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hostHint is the pointer every pod-side finding gives to the node side.
const hostHint = "run `agent netcheck --host` on the node (or the netcheck DaemonSet) to see the host-side cause"

// safeMTU is the smallest MTU at which a tunnel still carries full-size
// packets: gVisor's 1280 plus WireGuard (32), UDP (8) and IP (up to 60)
// overhead, rounded as coder does.
const safeMTU = 1378

// primary is the interface the default route uses, with its gateway.
type primary struct {
	link    netlink.Link
	gateway netip.Addr
	route   *netlink.Route
}

// localChecks inspects links, addresses and routes and picks the primary
// interface for the active probes.
func localChecks(st *netstate.State, opts *Options) ([]*CheckBuilder, *primary) {
	linkC := NewCheck("link", "Interface, carrier and MTU")
	addrC := NewCheck("address", "Addresses")
	routeC := NewCheck("route", "Default route")
	p := &primary{}

	defaults := st.DefaultRoutes()
	if opts.Interface != "" {
		for _, l := range st.Links {
			if l.Attrs().Name == opts.Interface {
				p.link = l
			}
		}
		if p.link == nil {
			linkC.Fail(StatusBroken, "link.missing", fmt.Sprintf("interface %s does not exist", opts.Interface),
				[]string{fmt.Sprintf("links present: %s", linkNames(st))},
				Remedy{Text: "check the interface name, or restart the workspace so its network is set up again"})
		}
		for i := range defaults {
			if p.link != nil && defaults[i].LinkIndex == p.link.Attrs().Index {
				p.route = &defaults[i]
			}
		}
	} else if len(defaults) > 0 {
		p.route = &defaults[0]
		p.link = st.ByIdx[defaults[0].LinkIndex]
	} else {
		// No default route: judge the first interface with a global address.
		for _, l := range st.Links {
			if l.Attrs().Name != "lo" && len(st.GlobalAddrs(l.Attrs().Index)) > 0 {
				p.link = l
				break
			}
		}
		if p.link == nil {
			for _, l := range st.Links {
				if l.Attrs().Name != "lo" {
					p.link = l
					break
				}
			}
		}
	}
	if p.route != nil && p.route.Gw != nil {
		p.gateway = netstate.ToAddr(p.route.Gw)
	}

	// Link.
	if p.link == nil {
		if opts.Interface == "" {
			linkC.Fail(StatusBroken, "link.none", "the workspace has no network interface besides loopback",
				[]string{fmt.Sprintf("links present: %s", linkNames(st))},
				Remedy{Text: "the container was started without a network (or its interface was deleted on the host); restart the workspace and " + hostHint})
		}
	} else {
		a := p.link.Attrs()
		linkC.Detail("interface", a.Name)
		linkC.Detail("index", a.Index)
		linkC.Detail("mtu", a.MTU)
		linkC.Detail("kind", p.link.Type())
		linkC.Detail("admin_up", netstate.AdminUp(p.link))
		linkC.Detail("carrier", netstate.Carrier(p.link))
		linkC.Detail("oper_state", a.OperState.String())
		if a.ParentIndex > 0 && p.link.Type() == "veth" {
			linkC.Detail("peer_ifindex", a.ParentIndex)
		}
		if v := netstate.SysfsValue(a.Name, "carrier_changes"); v != "" {
			linkC.Detail("carrier_changes", v)
		}
		peer := ""
		if a.ParentIndex > 0 && p.link.Type() == "veth" {
			peer = fmt.Sprintf(", host-side peer ifindex %d", a.ParentIndex)
		}
		linkC.Summary = fmt.Sprintf("%s %s, mtu %d%s", a.Name, upDown(p.link), a.MTU, peer)
		switch {
		case !netstate.AdminUp(p.link):
			linkC.Fail(StatusBroken, "link.down", fmt.Sprintf("interface %s is administratively down", a.Name),
				[]string{fmt.Sprintf("%s flags: %v", a.Name, a.Flags)},
				Remedy{Text: "bring it up (needs CAP_NET_ADMIN), or restart the workspace", Commands: []string{"ip link set " + a.Name + " up"}})
		case !netstate.Carrier(p.link):
			linkC.Fail(StatusBroken, "link.no_carrier", fmt.Sprintf("interface %s has no carrier: its host-side peer is down or deleted", a.Name),
				[]string{fmt.Sprintf("%s is up but lacks LOWER_UP (oper state %s)", a.Name, a.OperState)},
				Remedy{Text: "the veth's other end on the node is gone or down; " + hostHint + ", then restart the workspace"})
		case a.MTU < safeMTU:
			linkC.Fail(StatusDegraded, "link.mtu_low", fmt.Sprintf("interface %s has MTU %d, below %d: tunnelled traffic will be fragmented or dropped", a.Name, a.MTU, safeMTU),
				[]string{fmt.Sprintf("%s mtu %d", a.Name, a.MTU)},
				Remedy{Text: fmt.Sprintf("raise the network's MTU to at least %d in the CNI or runtime configuration; the node's bridge, veths and uplink must carry that size too (the mtu check says whether they do)", safeMTU)})
		}
	}

	// Addresses.
	if p.link != nil {
		idx := p.link.Attrs().Index
		global := st.GlobalAddrs(idx)
		addrC.Detail("addresses", netstate.AddrStrings(global))
		addrC.Summary = fmt.Sprintf("%s has %v", p.link.Attrs().Name, netstate.AddrStrings(global))
		if len(global) == 0 {
			addrC.Fail(StatusBroken, "address.none", fmt.Sprintf("interface %s has no global address", p.link.Attrs().Name),
				[]string{fmt.Sprintf("addresses on %s: %v", p.link.Attrs().Name, netstate.AddrStrings(st.Addrs[idx]))},
				Remedy{Text: "the CNI or DHCP did not configure the interface; restart the workspace and check the CNI plugin's logs; " + hostHint})
		}
		for _, a := range global {
			if a.Flags&unix.IFA_F_DADFAILED != 0 {
				addrC.Fail(StatusBroken, "address.dad_failed", fmt.Sprintf("address %s failed duplicate address detection", a.IPNet),
					[]string{fmt.Sprintf("%s flags dadfailed", a.IPNet)},
					Remedy{Text: "another host uses the same address; fix the address assignment (IPAM) so it is unique"})
			} else if a.Flags&unix.IFA_F_TENTATIVE != 0 {
				addrC.Fail(StatusDegraded, "address.tentative", fmt.Sprintf("address %s is still tentative (duplicate address detection running)", a.IPNet),
					[]string{fmt.Sprintf("%s flags tentative", a.IPNet)},
					Remedy{Text: "wait a second and check again; if it stays tentative the link has no carrier"})
			}
		}
	} else {
		addrC.Skip("no interface")
	}

	// Default route.
	switch {
	case p.link == nil:
		routeC.Skip("no interface")
	case p.route == nil:
		ifname := p.link.Attrs().Name
		gwGuess := "GATEWAY"
		if g := st.GlobalAddrs(p.link.Attrs().Index); len(g) > 0 && g[0].IP.To4() != nil {
			if pfx, err := netip.ParsePrefix(g[0].IPNet.String()); err == nil {
				gwGuess = pfx.Masked().Addr().Next().String()
			}
		}
		routeC.Summary = "no default route"
		routeC.Fail(StatusBroken, "route.no_default", "there is no default route: nothing outside the local subnet is reachable",
			[]string{fmt.Sprintf("main routing table has %d routes, none default", len(st.Routes))},
			Remedy{Text: "the CNI or runtime did not install the route (or something deleted it); restart the workspace, or add it where CAP_NET_ADMIN is available",
				Commands: []string{fmt.Sprintf("ip route add default via %s dev %s", gwGuess, ifname)}})
	default:
		r := p.route
		routeC.Detail("interface", p.link.Attrs().Name)
		if p.gateway.IsValid() {
			routeC.Detail("gateway", p.gateway.String())
			routeC.Summary = fmt.Sprintf("default via %s dev %s", p.gateway, p.link.Attrs().Name)
			if r.Flags&int(netlink.FLAG_ONLINK) == 0 && !st.OnLink(r.LinkIndex, r.Gw) {
				routeC.Fail(StatusBroken, "route.gateway_not_onlink", fmt.Sprintf("gateway %s is not on any subnet of %s", p.gateway, p.link.Attrs().Name),
					[]string{fmt.Sprintf("addresses on %s: %v", p.link.Attrs().Name, netstate.AddrStrings(st.Addrs[r.LinkIndex]))},
					Remedy{Text: "add a link route to the gateway (Calico/AWS-style /32 gateways need one)",
						Commands: []string{fmt.Sprintf("ip route add %s dev %s scope link", p.gateway, p.link.Attrs().Name)}})
			}
		} else {
			routeC.Summary = fmt.Sprintf("default dev %s (no gateway)", p.link.Attrs().Name)
		}
		if r.MTU > 0 {
			routeC.Detail("route_mtu", r.MTU)
		}
	}
	return []*CheckBuilder{linkC.Done(), addrC.Done(), routeC.Done()}, p
}

func linkNames(st *netstate.State) []string {
	var out []string
	for _, l := range st.Links {
		out = append(out, l.Attrs().Name)
	}
	sort.Strings(out)
	return out
}

func upDown(l netlink.Link) string {
	switch {
	case !netstate.AdminUp(l):
		return "down"
	case !netstate.Carrier(l):
		return "up, no carrier"
	}
	return "up, carrier"
}

// probeResult is what the gateway round trip found; the MTU check and the
// final diagnosis read it.
type probeResult struct {
	method     string
	reachable  bool
	definitive bool // an ICMP echo was possible, so silence means loss
	rtt        time.Duration
	icmp       *pinger
}

// gatewayCheck proves or disproves a round trip to the default gateway.
// ICMP first (ping socket or raw), then TCP connects to common ports: an
// answer of any kind, even "connection refused", proves the path.
func gatewayCheck(ctx context.Context, p *primary, png *pinger, seq *atomic.Uint32, budget time.Duration) (*CheckBuilder, *probeResult) {
	c := NewCheck("gateway", "Round trip to the gateway")
	res := &probeResult{}
	if p.link == nil || !p.gateway.IsValid() {
		c.Skip("no gateway to probe")
		return c.Done(), res
	}
	gw := p.gateway
	c.Detail("gateway", gw.String())
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()

	if png != nil && gw.Is4() {
		res.method, res.definitive, res.icmp = string(png.method), true, png
		// Three echoes, a little apart, so one lost packet is not an outage.
		type reply struct {
			rtt time.Duration
			err error
		}
		replies := make(chan reply, 3)
		for i := range 3 {
			go func() {
				select {
				case <-time.After(time.Duration(i) * 150 * time.Millisecond):
				case <-ctx.Done():
					replies <- reply{err: ctx.Err()}
					return
				}
				rtt, err := png.echo(ctx, gw, uint16(seq.Add(1)), 84)
				replies <- reply{rtt, err}
				if err == nil {
					cancel()
				}
			}()
		}
		var lastErr error
		for range 3 {
			r := <-replies
			if r.err == nil && !res.reachable {
				res.reachable, res.rtt = true, r.rtt
			} else if r.err != nil && !errors.Is(r.err, context.Canceled) {
				lastErr = r.err
			}
		}
		c.Detail("method", res.method)
		if res.reachable {
			c.Detail("rtt_ms", ms(res.rtt))
			c.Summary = fmt.Sprintf("%s answers %s in %.2f ms", gw, res.method, ms(res.rtt))
			return c.Done(), res
		}
		c.Summary = fmt.Sprintf("%s does not answer ICMP echo", gw)
		ev := []string{
			fmt.Sprintf("3 ICMP echo requests to %s over %s: no reply within %v (%v)", gw, p.link.Attrs().Name, budget, lastErr),
			fmt.Sprintf("%s is %s with a default route via %s, so local state looks healthy", p.link.Attrs().Name, upDown(p.link), gw),
		}
		if n := neighState(p.link.Attrs().Index, gw); n != "" {
			ev = append(ev, fmt.Sprintf("neighbour entry for %s: %s (ARP can be answered by a detached host veth; not proof of a path)", gw, n))
		}
		c.Fail(StatusBroken, "gateway.unreachable", fmt.Sprintf("workspace network broken past %s: the gateway %s does not answer", p.link.Attrs().Name, gw), ev,
			Remedy{Text: "the host side of this interface is detached from its bridge, the bridge lost its address, or the bridge is gone (systemd-networkd managing container interfaces does this); " + hostHint + "; restarting the workspace recreates its veth"})
		return c.Done(), res
	}

	// No ICMP: TCP connects. Refused or accepted both prove the round trip.
	res.method = "tcp connect"
	c.Detail("method", res.method)
	ports := []int{53, 80, 443, 22, 1}
	type answer struct {
		port int
		rtt  time.Duration
		ok   bool
	}
	answers := make(chan answer, len(ports))
	for _, port := range ports {
		go func() {
			start := time.Now()
			var d net.Dialer
			conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(gw.String(), strconv.Itoa(port)))
			if err == nil {
				conn.Close()
				answers <- answer{port, time.Since(start), true}
				return
			}
			answers <- answer{port, time.Since(start), errors.Is(err, syscall.ECONNREFUSED)}
		}()
	}
	for range ports {
		a := <-answers
		if a.ok && !res.reachable {
			res.reachable, res.rtt = true, a.rtt
			c.Summary = fmt.Sprintf("%s answers TCP on port %d in %.2f ms (ICMP not permitted)", gw, a.port, ms(a.rtt))
			c.Detail("rtt_ms", ms(a.rtt))
			cancel()
		}
	}
	if res.reachable {
		return c.Done(), res
	}
	c.Summary = fmt.Sprintf("%s does not answer TCP (ICMP not permitted)", gw)
	c.Fail(StatusDegraded, "gateway.no_answer", fmt.Sprintf("the gateway %s does not answer TCP and ICMP is not permitted, so the path is unproven", gw),
		[]string{
			fmt.Sprintf("TCP connects to %s ports %v: no answer within %v", gw, ports, budget),
			fmt.Sprintf("ICMP: no CAP_NET_RAW and gid outside net.ipv4.ping_group_range (%s)", pingGroupRange()),
		},
		Remedy{Text: "allow unprivileged ping so the probe is decisive (the pod's securityContext sysctl, or Docker's default), then run netcheck again",
			Commands: []string{`sysctl -w net.ipv4.ping_group_range="0 2147483647"`}})
	return c.Done(), res
}

func neighState(idx int, ip netip.Addr) string {
	fam := netlink.FAMILY_V4
	if ip.Is6() {
		fam = netlink.FAMILY_V6
	}
	neighs, err := netlink.NeighList(idx, fam)
	if err != nil {
		return ""
	}
	for _, n := range neighs {
		if netstate.ToAddr(n.IP) == ip {
			return neighStateName(n.State)
		}
	}
	return "none"
}

func neighStateName(s int) string {
	names := []struct {
		bit  int
		name string
	}{
		{netlink.NUD_PERMANENT, "PERMANENT"}, {netlink.NUD_REACHABLE, "REACHABLE"}, {netlink.NUD_STALE, "STALE"},
		{netlink.NUD_DELAY, "DELAY"}, {netlink.NUD_PROBE, "PROBE"}, {netlink.NUD_FAILED, "FAILED"},
		{netlink.NUD_INCOMPLETE, "INCOMPLETE"}, {netlink.NUD_NOARP, "NOARP"},
	}
	for _, n := range names {
		if s&n.bit != 0 {
			return n.name
		}
	}
	return fmt.Sprintf("state %#x", s)
}

func ms(d time.Duration) float64 {
	return float64(d.Microseconds()) / 1000
}

// mtuCheck sends don't-fragment probes at the interface's full size and at a
// reduced size to the gateway (and to the coordinator when it answers
// ICMP). Full size lost while reduced arrives is an MTU black hole: small
// requests work and bulk transfers stall.
func mtuCheck(ctx context.Context, p *primary, gw *probeResult, coordinator func() netip.Addr, seq *atomic.Uint32, budget time.Duration) *CheckBuilder {
	c := NewCheck("mtu", "Path MTU (don't-fragment probes)")
	if p.link == nil {
		c.Skip("no interface")
		return c.Done()
	}
	ifMTU := p.link.Attrs().MTU
	if p.route != nil && p.route.MTU > 0 && p.route.MTU < ifMTU {
		ifMTU = p.route.MTU
	}
	c.Detail("interface_mtu", ifMTU)
	if gw.icmp == nil {
		c.Skip(fmt.Sprintf("ICMP not permitted (ping_group_range %s, no CAP_NET_RAW); interface MTU %d", pingGroupRange(), ifMTU))
		return c.Done()
	}
	if !gw.reachable {
		c.Skip("gateway does not answer; path MTU not measurable")
		return c.Done()
	}
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()

	// A ladder of sizes sent at once; the largest answered one bounds the
	// path MTU from below.
	sizes := []int{ifMTU}
	for _, s := range []int{1280, 1360, 1400, 1420, 1440, 1460, 1480, 1492} {
		if s < ifMTU {
			sizes = append(sizes, s)
		}
	}
	sort.Ints(sizes)
	reduced := sizes[0]
	probe := func(dst netip.Addr) (largest int, lostFull bool) {
		type r struct {
			size int
			ok   bool
		}
		results := make(chan r, len(sizes))
		for _, s := range sizes {
			go func() {
				// Two tries per size so a single lost packet is not a verdict.
				for range 2 {
					pctx, pcancel := context.WithTimeout(ctx, budget/2)
					_, err := gw.icmp.echo(pctx, dst, uint16(seq.Add(1)), s)
					pcancel()
					if err == nil {
						results <- r{s, true}
						return
					}
					if errors.Is(err, errTooBig) {
						break
					}
				}
				results <- r{s, false}
			}()
		}
		okFull := false
		for range sizes {
			x := <-results
			if x.ok && x.size > largest {
				largest = x.size
			}
			if x.size == ifMTU && x.ok {
				okFull = true
			}
		}
		return largest, !okFull
	}
	largest, lostFull := probe(p.gateway)
	c.Detail("gateway_largest_ok", largest)
	target := p.gateway.String()
	if !lostFull {
		// The first hop carries full size; try the coordinator if it answers.
		dst := coordinator()
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < budget/2 && dst.IsValid() {
			// The coordinator's address came late (a slow or partly dead
			// resolver): too little time is left to tell loss from no time.
			c.Detail("coordinator_probe", "not run: its address arrived too late")
			dst = netip.Addr{}
		}
		if dst.IsValid() && dst.Is4() && dst != p.gateway {
			pctx, pcancel := context.WithTimeout(ctx, budget/3)
			_, err := gw.icmp.echo(pctx, dst, uint16(seq.Add(1)), 84)
			pcancel()
			if err == nil {
				l2, lost2 := probe(dst)
				c.Detail("coordinator_largest_ok", l2)
				// It just answered a small echo, so nothing at all
				// answering now is the budget running out, not the path.
				if lost2 && l2 > 0 {
					largest, lostFull, target = l2, true, dst.String()
				}
			}
		}
	}
	if !lostFull {
		c.Summary = fmt.Sprintf("%d-byte packets with don't-fragment reach %s", ifMTU, target)
		return c.Done()
	}
	c.Summary = fmt.Sprintf("packets above %d bytes are lost on the way to %s (interface MTU %d)", largest, target, ifMTU)
	c.Detail("path_mtu_at_least", largest)
	if largest == 0 {
		c.Fail(StatusBroken, "mtu.all_lost", fmt.Sprintf("don't-fragment probes of every size to %s are lost", target),
			[]string{fmt.Sprintf("sizes %v: no replies", sizes)},
			Remedy{Text: "the path drops even " + strconv.Itoa(reduced) + "-byte packets; " + hostHint})
		return c.Done()
	}
	sev := StatusBroken
	if largest >= safeMTU {
		sev = StatusDegraded
	}
	c.Fail(sev, "mtu.blackhole", fmt.Sprintf("MTU black hole: %s takes %d-byte packets but silently drops %d-byte ones; small requests work, bulk transfers stall", target, largest, ifMTU),
		[]string{
			fmt.Sprintf("don't-fragment ICMP of %d bytes to %s: reply", largest, target),
			fmt.Sprintf("don't-fragment ICMP of %d bytes (interface MTU) to %s: no reply, no fragmentation-needed error", ifMTU, target),
		},
		mtuRemedy(p.link.Attrs().Name, largest, ifMTU))
	return c.Done()
}

// mtuRemedy is the one fix for a black hole that does not contradict
// link.mtu_low: lowering the workspace MTU is advised only down to a size
// tunnels still fit in; below that, the path must be raised instead.
func mtuRemedy(ifname string, largest, ifMTU int) Remedy {
	if largest >= safeMTU {
		return Remedy{Text: fmt.Sprintf("make the MTUs agree along the path: set the workspace network's MTU to %d (CNI \"mtu\" setting or the runtime's network MTU), or raise the host bridge/veth MTU to %d", largest, ifMTU),
			Commands: []string{fmt.Sprintf("ip link set %s mtu %d   # in the workspace, needs CAP_NET_ADMIN; the lasting fix is the CNI/runtime MTU", ifname, largest)}}
	}
	return Remedy{Text: fmt.Sprintf("the path carries only %d bytes, below the %d tunnelled traffic needs, so lowering this interface's MTU would trade one fault for another: raise the MTU of the node's bridge, this workspace's host-side veth and the node's uplink to %d (check with `agent netcheck --host` on the node)", largest, safeMTU, ifMTU)}
}

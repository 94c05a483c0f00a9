package node

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/agentd/agent/agent/netcheck"
	"github.com/agentd/agent/agent/netcheck/internal/netstate"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// podNet is a container network on this node: its bridge and subnet.
type podNet struct {
	bridge netlink.Link
	subnet netip.Prefix
	// masq: the configuration asks the node to masquerade the subnet
	// (CNI ipMasq, Docker's default).
	masq   bool
	source string
}

// podNets are the present, addressed container bridges with the subnet
// their containers use.
func podNets(inv *inventory) []podNet {
	var out []podNet
	seen := map[string]bool{}
	for _, e := range inv.expected {
		l := linkByName(inv.st, e.name)
		if l == nil || !e.gateway.IsValid() || !e.gateway.Addr().Is4() {
			continue
		}
		seen[e.name] = true
		out = append(out, podNet{bridge: l, subnet: e.gateway.Masked(), masq: e.masq, source: e.source})
	}
	for _, l := range inv.container {
		if l.Type() != "bridge" || seen[l.Attrs().Name] || !hasVethPorts(inv.st, l) {
			continue
		}
		for _, a := range inv.st.Addrs[l.Attrs().Index] {
			if p, ok := netip.AddrFromSlice(a.IP.To4()); ok && a.IPNet != nil {
				ones, _ := a.IPNet.Mask.Size()
				out = append(out, podNet{bridge: l, subnet: netip.PrefixFrom(p, ones).Masked(), source: "address of " + l.Attrs().Name})
				break
			}
		}
	}
	return out
}

// sysctl reads a value under /proc/sys of this network namespace.
func sysctl(key string) (string, error) {
	b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(key, ".", "/"))
	return strings.TrimSpace(string(b)), err
}

// podAddr is an address containers on the subnet use (the first after
// the gateway), for route and rule evaluation.
func (p podNet) podAddr() netip.Addr {
	a := p.subnet.Addr().Next().Next()
	if !p.subnet.Contains(a) {
		return p.subnet.Addr()
	}
	return a
}

// forwardingCheck checks what the kernel needs to forward pod traffic:
// ip_forward, and that the route back to each pod subnet is its bridge
// (with strict rp_filter a wrong route also drops the pods' packets on
// the way in).
func forwardingCheck(inv *inventory) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("forwarding", "The node forwards pod traffic: ip_forward, rp_filter, routes to pod subnets")
	nets := podNets(inv)
	if len(nets) == 0 {
		c.Skip("no addressed container bridge to check forwarding for")
		return c.Done()
	}
	fwd, err := sysctl("net.ipv4.ip_forward")
	switch {
	case err != nil:
		c.Fail(netcheck.StatusDegraded, "forwarding.unreadable", fmt.Sprintf("cannot read net.ipv4.ip_forward: %v", err), nil,
			netcheck.Remedy{Text: "run the node check in the node's network namespace with /proc mounted (hostNetwork: true)"})
	case fwd != "1":
		c.Fail(netcheck.StatusBroken, "forwarding.disabled", "the node does not forward IPv4 (net.ipv4.ip_forward=0): pods reach their bridge but nothing beyond the node", []string{"/proc/sys/net/ipv4/ip_forward: " + fwd},
			netcheck.Remedy{Text: "turn forwarding on, and keep it on across reboots",
				Commands: []string{"sysctl -w net.ipv4.ip_forward=1", "echo net.ipv4.ip_forward=1 > /etc/sysctl.d/90-agent-forwarding.conf"}})
	}
	c.Detail("ip_forward", fwd)
	var summary []string
	for _, n := range nets {
		br := n.bridge.Attrs().Name
		all, _ := sysctl("net.ipv4.conf.all.rp_filter")
		own, _ := sysctl("net.ipv4.conf." + br + ".rp_filter")
		strict := all == "1" || own == "1"
		if max(all, own) != "" {
			c.Detail("rp_filter_"+br, max(all, own))
		}
		pod := n.podAddr()
		r, ok := bestRoute(inv.st, pod)
		switch {
		case !ok:
			c.Fail(netcheck.StatusBroken, "forwarding.no_pod_route", fmt.Sprintf("the node has no route to the pod subnet %s: replies to pods on %s go nowhere", n.subnet, br), nil,
				netcheck.Remedy{Text: "give the bridge its gateway address (its connected route covers the subnet) or add the route",
					Commands: []string{fmt.Sprintf("ip route replace %s dev %s", n.subnet, br)}})
		case r.LinkIndex != n.bridge.Attrs().Index:
			if len(netstate.IPv4Of(inv.st.Addrs[n.bridge.Attrs().Index])) == 0 {
				continue // bridge.no_address says it, with the fix
			}
			via := "dev " + linkName(inv.st, r.LinkIndex)
			if r.Gw != nil {
				via = "via " + r.Gw.String() + " " + via
			}
			dst := "default"
			if r.Dst != nil && !netstate.IsDefault(r) {
				dst = r.Dst.String()
			}
			ev := []string{fmt.Sprintf("route to %s (a pod address on %s): %s %s, not %s", pod, n.subnet, dst, via, br)}
			if strict {
				ev = append(ev, fmt.Sprintf("rp_filter is strict (all=%s, %s=%s): the pods' own packets are dropped on the way in as well", all, br, own))
			}
			c.Fail(netcheck.StatusBroken, "forwarding.pod_route", fmt.Sprintf("the node routes the pod subnet %s away from %s: pods' replies leave by the wrong interface", n.subnet, br), ev,
				netcheck.Remedy{Text: "remove the route that takes the pod subnet elsewhere (a stale CNI or VPN route)",
					Commands: []string{fmt.Sprintf("ip route del %s %s", dst, via)}})
		}
		summary = append(summary, fmt.Sprintf("%s → %s", n.subnet, br))
	}
	if c.Status == netcheck.StatusOK {
		c.Summary = fmt.Sprintf("forwarding on; routes %s", strings.Join(summary, ", "))
	} else {
		c.Summary = fmt.Sprintf("%d problem(s) in the forwarding path", len(c.Findings))
	}
	return c.Done()
}

// bestRoute is the main table's longest-prefix unicast route for a.
func bestRoute(st *netstate.State, a netip.Addr) (netlink.Route, bool) {
	var best netlink.Route
	bestLen := -1
	ip := net.IP(a.AsSlice())
	for _, r := range st.Routes {
		if r.Family != netlink.FAMILY_V4 || (r.Table != 0 && r.Table != unix.RT_TABLE_MAIN) || r.Type != unix.RTN_UNICAST {
			continue
		}
		n := 0
		if r.Dst != nil {
			if !r.Dst.Contains(ip) {
				continue
			}
			n, _ = r.Dst.Mask.Size()
		}
		if n > bestLen {
			best, bestLen = r, n
		}
	}
	return best, bestLen >= 0
}

func linkName(st *netstate.State, idx int) string {
	if l := st.ByIdx[idx]; l != nil {
		return l.Attrs().Name
	}
	return fmt.Sprintf("ifindex %d", idx)
}

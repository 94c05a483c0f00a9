package tailnet

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// WhyNotDirect explains, from what each side has measured, why the path to
// the peer at ip is relayed, and what to change. peerName names the peer in
// the text ("ws1"). Each line is one finding: ours first, then the peer's,
// then the conclusion.
func (c *Conn) WhyNotDirect(ctx context.Context, ip netip.Addr, peerName string) []string {
	c.mu.RLock()
	p, ok := c.byIP[ip]
	var peerEPs []netip.AddrPort
	if ok {
		peerEPs = slices.Clone(p.node.Endpoints)
	}
	ourEPs := slices.Clone(c.endpoints)
	dm := c.derpMap.Clone()
	c.mu.RUnlock()
	if !ok {
		return []string{fmt.Sprintf("no peer has address %v", ip)}
	}
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	rep := c.mc.GetLastNetcheckReport(rctx)

	var lines []string
	ourUDP := rep != nil && rep.UDP
	ourHard := rep != nil && rep.MappingVariesByDestIP.EqualBool(true)
	// With a second STUN port the mapping can be measured: a fresh
	// socket's public port as two destinations see it.
	mapping := ""
	if ourUDP && dm.hasSecondSTUN() {
		if nr, err := Netcheck(ctx, c.logger, dm); err == nil && nr.MappingVariesByDestIP != nil {
			ourHard = *nr.MappingVariesByDestIP
			mapping = "; the NAT keeps one public port for every destination (endpoint-independent mapping, checked against two STUN ports)"
			if ourHard {
				mapping = ""
			}
		}
	}
	switch {
	case rep == nil:
		lines = append(lines, "this side: no network check has finished yet")
	case !ourUDP:
		lines = append(lines, "this side: no STUN answer from the coordinator: outbound UDP is blocked here (allow outbound UDP, at least to the coordinator's STUN port and to the internet)")
	case ourHard:
		lines = append(lines, fmt.Sprintf("this side: the NAT maps each destination to another public port (hard NAT, endpoint-dependent mapping; public %v): a direct path needs the other side to be reachable", rep.GlobalV4))
	default:
		d := describeMapping(rep.GlobalV4, ourEPs)
		if mapping != "" {
			d = strings.Replace(d, " (endpoint-independent NAT, as far as one STUN server can tell)", "", 1)
		}
		lines = append(lines, "this side: UDP works; "+d+mapping)
	}

	pub, priv := splitEndpoints(peerEPs)
	peerUDP := len(pub) > 0
	switch {
	case len(peerEPs) == 0:
		lines = append(lines, fmt.Sprintf("%s: announces no UDP endpoint at all (its network check has not finished, or it relays only)", peerName))
	case !peerUDP:
		lines = append(lines, fmt.Sprintf("%s: announces only private addresses %v, no public one: its STUN probe got no answer, so its outbound UDP is blocked (allow outbound UDP from the workspace, e.g. a NetworkPolicy egress rule)", peerName, priv))
	default:
		lines = append(lines, fmt.Sprintf("%s: UDP works; %s", peerName, describeMapping(pub[0], peerEPs)))
	}

	switch {
	case !ourUDP || !peerUDP:
		lines = append(lines, "so: UDP is blocked on at least one side; traffic stays on the DERP relay until it is allowed")
	case ourHard && !portKept(pub[0], peerEPs):
		lines = append(lines, "so: both NATs change ports per destination (hard NAT on both sides); give one side a fixed, published UDP port (agent run --listen-port with a host port)")
	default:
		lines = append(lines, fmt.Sprintf("so: both sides reach the internet over UDP, yet no direct packet got through. Suspect a firewall between that drops UDP to %v, or a router in front of the workspace that accepts unsolicited UDP (a Kubernetes node masquerading pods, INPUT policy accept): a conntrack entry left by early packets makes masquerade move the agent's flow to another port. This client lets the agent send first, which avoids that clash; if it persists, drop new inbound UDP on that node's public interface (nft: iifname <wan> meta l4proto udp ct state new drop) or give the agent a fixed UDP port published on the node (agent run --listen-port)", pub[0]))
	}
	return lines
}

// hasSecondSTUN reports whether a node offers a second STUN port.
func (m *DERPMap) hasSecondSTUN() bool {
	for _, r := range m.Regions {
		for _, n := range r.Nodes {
			if n.STUNPort2 != 0 && n.STUNPort >= 0 {
				return true
			}
		}
	}
	return false
}

// describeMapping says whether the public endpoint kept the local port.
func describeMapping(public netip.AddrPort, eps []netip.AddrPort) string {
	if !public.IsValid() {
		return "no public address known"
	}
	if portKept(public, eps) {
		return fmt.Sprintf("public %v keeps the local port (endpoint-independent NAT, as far as one STUN server can tell)", public)
	}
	return fmt.Sprintf("public %v does not keep the local port (the NAT rewrites ports; if it does so per destination, the direct path needs the other side)", public)
}

// portKept reports whether a private endpoint has the same port as public.
func portKept(public netip.AddrPort, eps []netip.AddrPort) bool {
	for _, ep := range eps {
		if ep != public && !isPublic(ep.Addr()) && ep.Port() == public.Port() {
			return true
		}
	}
	return false
}

func splitEndpoints(eps []netip.AddrPort) (pub, priv []netip.AddrPort) {
	for _, ep := range eps {
		if isPublic(ep.Addr()) {
			pub = append(pub, ep)
		} else {
			priv = append(priv, ep)
		}
	}
	return pub, priv
}

// cgnat is 100.64.0.0/10 (RFC 6598), shared address space behind carrier NAT.
var cgnat = netip.MustParsePrefix("100.64.0.0/10")

// isPublic reports whether a is routable on the internet. Documentation
// ranges count as public: the namespace tests use them as the internet.
func isPublic(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsGlobalUnicast() && !a.IsPrivate() && !cgnat.Contains(a)
}

package tailnet

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"time"

	"tailscale.com/net/netcheck"
	"tailscale.com/net/netmon"
	"tailscale.com/net/netns"
	"tailscale.com/util/eventbus"
)

// NetcheckReport is what a standalone network check found: whether UDP
// works (STUN answered), our address as the relays see it, and how far
// each relay region is.
type NetcheckReport struct {
	// UDP is true when at least one STUN round trip completed.
	UDP  bool `json:"udp"`
	IPv4 bool `json:"ipv4"`
	IPv6 bool `json:"ipv6"`
	// IPv4CanSend / IPv6CanSend: a packet could at least be sent.
	IPv4CanSend bool `json:"ipv4_can_send"`
	IPv6CanSend bool `json:"ipv6_can_send"`
	// OSHasIPv6: a socket could be bound to ::1.
	OSHasIPv6 bool `json:"os_has_ipv6"`
	// GlobalV4 / GlobalV6 are our addresses as seen by STUN ("ip:port"),
	// empty if unknown.
	GlobalV4 string `json:"global_v4,omitempty"`
	GlobalV6 string `json:"global_v6,omitempty"`
	// MappingVariesByDestIP is true for a hard NAT (different public port
	// per destination); nil when it could not be determined, which needs
	// STUN answers from two different server addresses.
	MappingVariesByDestIP *bool `json:"mapping_varies_by_dest_ip,omitempty"`
	// PreferredDERP is the region with the lowest latency; 0 if none
	// answered.
	PreferredDERP int `json:"preferred_derp"`
	// RegionLatency is the best latency per region ID (STUN, or HTTPS
	// when UDP is blocked); regions that did not answer are absent.
	RegionLatency   map[int]time.Duration `json:"region_latency"`
	RegionV4Latency map[int]time.Duration `json:"region_v4_latency,omitempty"`
	RegionV6Latency map[int]time.Duration `json:"region_v6_latency,omitempty"`
	// CaptivePortal is not checked (it would contact Tailscale's servers).
}

// Netcheck runs one standalone network check against the relays in m,
// from its own UDP sockets (it does not need a Conn). Like NewConn, it turns
// off Tailscale's socket marking for the process.
func Netcheck(ctx context.Context, logger *slog.Logger, m *DERPMap) (*NetcheckReport, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("netcheck: %w", err)
	}
	logf := func(format string, args ...any) {
		logger.Debug(strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "netcheck")
	}
	netns.SetEnabled(false)
	bus := eventbus.New()
	defer bus.Close()
	mon, err := netmon.New(bus, logf)
	if err != nil {
		return nil, fmt.Errorf("netcheck: network monitor: %w", err)
	}
	defer mon.Close()
	mon.Start()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	client := &netcheck.Client{NetMon: mon, Logf: logf}
	if err := client.Standalone(ctx, ":0"); err != nil {
		return nil, fmt.Errorf("netcheck: open UDP sockets: %w", err)
	}
	r, err := client.GetReport(ctx, m.withSecondSTUN(), nil)
	if err != nil {
		return nil, fmt.Errorf("netcheck: %w", err)
	}
	out := &NetcheckReport{
		UDP:             r.UDP,
		IPv4:            r.IPv4,
		IPv6:            r.IPv6,
		IPv4CanSend:     r.IPv4CanSend,
		IPv6CanSend:     r.IPv6CanSend,
		OSHasIPv6:       r.OSHasIPv6,
		PreferredDERP:   r.PreferredDERP,
		RegionLatency:   maps.Clone(r.RegionLatency),
		RegionV4Latency: maps.Clone(r.RegionV4Latency),
		RegionV6Latency: maps.Clone(r.RegionV6Latency),
	}
	if out.RegionLatency == nil {
		out.RegionLatency = map[int]time.Duration{}
	}
	if r.GlobalV4.IsValid() {
		out.GlobalV4 = r.GlobalV4.String()
	}
	if r.GlobalV6.IsValid() {
		out.GlobalV6 = r.GlobalV6.String()
	}
	if v, ok := r.MappingVariesByDestIP.Get(); ok {
		out.MappingVariesByDestIP = &v
	}
	// The second-port regions only serve the mapping check.
	for _, lat := range []map[int]time.Duration{out.RegionLatency, out.RegionV4Latency, out.RegionV6Latency} {
		maps.DeleteFunc(lat, func(id int, _ time.Duration) bool { return id >= secondSTUNRegionBase })
	}
	if out.PreferredDERP >= secondSTUNRegionBase {
		out.PreferredDERP = 0
		for id, d := range out.RegionLatency {
			if out.PreferredDERP == 0 || d < out.RegionLatency[out.PreferredDERP] {
				out.PreferredDERP = id
			}
		}
	}
	return out, nil
}

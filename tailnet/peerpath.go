// A peer's path as a typed value, so callers branch on a kind instead of
// parsing the display text the engine's status uses.

package tailnet

import (
	"net/netip"

	"tailscale.com/ipn/ipnstate"
)

// PathKind says how traffic to a peer travels.
type PathKind int

const (
	// PathUnknown: the engine has no path yet (no packet has gone out, or
	// the peer is unknown to magicsock).
	PathUnknown PathKind = iota
	// PathDirect: UDP straight to one of the peer's endpoints.
	PathDirect
	// PathRelayed: through a DERP relay region.
	PathRelayed
)

// String is "unknown", "direct" or "derp".
func (k PathKind) String() string {
	switch k {
	case PathDirect:
		return "direct"
	case PathRelayed:
		return "derp"
	}
	return "unknown"
}

// PeerPath is the path traffic to a peer takes as the engine sees it.
type PeerPath struct {
	Kind PathKind
	// Endpoint is the peer's UDP address on a direct path.
	Endpoint netip.AddrPort
	// RegionID and RegionCode name the relay on a relayed path. RegionID is
	// 0 when the region is missing from our DERP map.
	RegionID   int
	RegionCode string
}

// String is "direct <ip:port>", "derp <region code>" or "" when unknown:
// the text the agent's status API has always shown.
func (p PeerPath) String() string {
	switch p.Kind {
	case PathDirect:
		return "direct " + p.Endpoint.String()
	case PathRelayed:
		return "derp " + p.RegionCode
	}
	return ""
}

// peerPathOf reads the path from the engine's status of a peer. A direct
// address the engine wrote in a form we cannot parse counts as no direct
// path, rather than a direct path to nowhere.
func peerPathOf(s *ipnstate.PeerStatus, derpMap *DERPMap) PeerPath {
	if s == nil {
		return PeerPath{}
	}
	if s.CurAddr != "" {
		if ep, err := netip.ParseAddrPort(s.CurAddr); err == nil {
			return PeerPath{Kind: PathDirect, Endpoint: ep}
		}
	}
	if s.Relay != "" {
		p := PeerPath{Kind: PathRelayed, RegionCode: s.Relay}
		if derpMap != nil {
			for _, r := range derpMap.Regions {
				if r.Code == s.Relay {
					p.RegionID = r.ID
					break
				}
			}
		}
		return p
	}
	return PeerPath{}
}

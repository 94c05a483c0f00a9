package tailnet

import (
	"net/netip"
	"testing"

	"tailscale.com/ipn/ipnstate"
)

func TestPeerPathOf(t *testing.T) {
	dm := &DERPMap{Regions: []DERPRegion{{ID: 900, Code: "coord"}, {ID: 901, Code: "eu"}}}
	ep := netip.MustParseAddrPort("[2001:db8::1]:41641")
	tests := []struct {
		name string
		st   *ipnstate.PeerStatus
		want PeerPath
		text string
	}{
		{"no status", nil, PeerPath{}, ""},
		{"no path yet", &ipnstate.PeerStatus{}, PeerPath{}, ""},
		{"direct", &ipnstate.PeerStatus{CurAddr: ep.String(), Relay: "coord"},
			PeerPath{Kind: PathDirect, Endpoint: ep}, "direct [2001:db8::1]:41641"},
		{"direct IPv4", &ipnstate.PeerStatus{CurAddr: "192.0.2.7:9"},
			PeerPath{Kind: PathDirect, Endpoint: netip.MustParseAddrPort("192.0.2.7:9")}, "direct 192.0.2.7:9"},
		{"relayed", &ipnstate.PeerStatus{Relay: "eu"},
			PeerPath{Kind: PathRelayed, RegionID: 901, RegionCode: "eu"}, "derp eu"},
		{"relayed, region not in map", &ipnstate.PeerStatus{Relay: "gone"},
			PeerPath{Kind: PathRelayed, RegionCode: "gone"}, "derp gone"},
		{"unparsable direct address falls back to the relay", &ipnstate.PeerStatus{CurAddr: "bogus", Relay: "coord"},
			PeerPath{Kind: PathRelayed, RegionID: 900, RegionCode: "coord"}, "derp coord"},
		{"unparsable direct address and no relay", &ipnstate.PeerStatus{CurAddr: "bogus"}, PeerPath{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := peerPathOf(tt.st, dm)
			if got != tt.want {
				t.Errorf("peerPathOf = %+v, want %+v", got, tt.want)
			}
			if got.String() != tt.text {
				t.Errorf("String() = %q, want %q", got.String(), tt.text)
			}
		})
	}
	if got := peerPathOf(&ipnstate.PeerStatus{Relay: "coord"}, nil); got != (PeerPath{Kind: PathRelayed, RegionCode: "coord"}) {
		t.Errorf("without a DERP map: %+v", got)
	}
}

func TestPathKindString(t *testing.T) {
	for k, want := range map[PathKind]string{PathUnknown: "unknown", PathDirect: "direct", PathRelayed: "derp", PathKind(7): "unknown"} {
		if got := k.String(); got != want {
			t.Errorf("PathKind(%d).String() = %q, want %q", k, got, want)
		}
	}
}

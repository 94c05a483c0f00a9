package tailnet

import (
	"net/netip"
	"testing"
)

func TestEndpointClassification(t *testing.T) {
	ap := netip.MustParseAddrPort
	for a, want := range map[string]bool{
		"10.1.0.2": false, "192.168.1.5": false, "100.64.3.4": false, "fd00::1": false,
		"203.0.113.11": true, "8.8.8.8": true, "2001:db8::1": true, "127.0.0.1": false, "fe80::1": false,
	} {
		if got := isPublic(netip.MustParseAddr(a)); got != want {
			t.Errorf("isPublic(%s) = %v, want %v", a, got, want)
		}
	}
	eps := []netip.AddrPort{ap("10.1.0.2:41641"), ap("203.0.113.11:41641")}
	if !portKept(ap("203.0.113.11:41641"), eps) {
		t.Error("a public endpoint with the local port: want kept")
	}
	if portKept(ap("203.0.113.11:5000"), append(eps[:1:1], ap("203.0.113.11:5000"))) {
		t.Error("a public endpoint with another port: want not kept")
	}
	pub, priv := splitEndpoints(eps)
	if len(pub) != 1 || len(priv) != 1 {
		t.Errorf("split %v: public %v private %v", eps, pub, priv)
	}
}

package tailnet

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestCoordinatorDERPMap(t *testing.T) {
	fp := CertFingerprint([]byte("not really a certificate"))
	m, err := CoordinatorDERPMap("coord.example.com:8443", 3478, strings.ToUpper(fp))
	if err != nil {
		t.Fatal(err)
	}
	// Round trip through JSON, as the coordinator serves it.
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var back DERPMap
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	dm := back.toTailcfg()
	reg := dm.Regions[DefaultRegionID]
	if reg == nil || len(reg.Nodes) != 1 {
		t.Fatalf("converted map %+v", dm)
	}
	n := reg.Nodes[0]
	if n.HostName != "coord.example.com" || n.DERPPort != 8443 || n.STUNPort != 3478 || n.RegionID != DefaultRegionID {
		t.Fatalf("node %+v", n)
	}
	if n.CertName != "sha256-raw:"+fp || n.IPv4 != "" || n.IPv6 != "" || n.InsecureForTests {
		t.Fatalf("node %+v", n)
	}
	if back.regionCode(DefaultRegionID) != "coord" {
		t.Fatal("region code lost")
	}

	m, err = CoordinatorDERPMap("[2001:db8::1]:443", -1, "")
	if err != nil {
		t.Fatal(err)
	}
	if n := m.Regions[0].Nodes[0]; n.IPv4 != "none" || n.IPv6 != "2001:db8::1" || n.STUNPort != -1 {
		t.Fatalf("literal IPv6 node %+v", n)
	}
}

func TestDERPMapValidate(t *testing.T) {
	bad := map[string]func(*DERPMap){
		"no regions":      func(m *DERPMap) { m.Regions = nil },
		"zero id":         func(m *DERPMap) { m.Regions[0].ID = 0 },
		"duplicate id":    func(m *DERPMap) { m.Regions = append(m.Regions, m.Regions[0]) },
		"no nodes":        func(m *DERPMap) { m.Regions[0].Nodes = nil },
		"no host":         func(m *DERPMap) { m.Regions[0].Nodes[0].HostName = "" },
		"bad fingerprint": func(m *DERPMap) { m.Regions[0].Nodes[0].CertFingerprint = "abc" },
		"bad ip":          func(m *DERPMap) { m.Regions[0].Nodes[0].IPv4 = "coord" },
		"bad port":        func(m *DERPMap) { m.Regions[0].Nodes[0].DERPPort = 70000 },
	}
	for name, mutate := range bad {
		m, err := CoordinatorDERPMap("127.0.0.1:443", 3478, "")
		if err != nil {
			t.Fatal(err)
		}
		mutate(m)
		if err := m.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	for _, addr := range []string{"coord", "coord:0", "coord:https"} {
		if _, err := CoordinatorDERPMap(addr, 3478, ""); err == nil {
			t.Errorf("CoordinatorDERPMap(%q) accepted", addr)
		}
	}
}

func TestNodeCallbackWaitsForHomeDERP(t *testing.T) {
	r := newTestRelay(t)
	c := newTestConn(t, r, 1, true)
	got := make(chan *Node, 10)
	c.SetNodeCallback(func(n *Node) { got <- n })
	// Every report has a home DERP; the endpoints may follow in a later one.
	deadline := time.After(15 * time.Second)
	for withEndpoints := false; !withEndpoints; {
		select {
		case n := <-got:
			if n.HomeDERP != DefaultRegionID {
				t.Fatalf("node reported with home DERP %d", n.HomeDERP)
			}
			if err := n.Validate(); err != nil {
				t.Fatal(err)
			}
			if n.Key != c.Node().Key || n.ID != 1 {
				t.Fatalf("node %+v", n)
			}
			withEndpoints = len(n.Endpoints) > 0
		case <-deadline:
			t.Fatal("node callback never reported endpoints")
		}
	}
	// A new callback is told the current node at once.
	again := make(chan *Node, 1)
	c.SetNodeCallback(func(n *Node) { again <- n })
	select {
	case <-again:
	case <-time.After(5 * time.Second):
		t.Fatal("new node callback not called with the current node")
	}

	// A callback may close its own conn.
	closed := make(chan struct{})
	c.SetNodeCallback(func(*Node) {
		c.Close()
		close(closed)
	})
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close from inside the node callback hung")
	}

	if _, err := NewConn(Options{NodeID: 1, DERPMap: r.dm}); err == nil {
		t.Fatal("NewConn without addresses succeeded")
	}
	if _, err := NewConn(Options{NodeID: 1, Addresses: c.Addresses(), DERPMap: r.dm, PrivateKey: "privkey:zz"}); err == nil {
		t.Fatal("NewConn with a bad private key succeeded")
	}
}

func TestSetDERPMapMovesHome(t *testing.T) {
	r1, r2 := newTestRelay(t), newTestRelay(t)
	c := newTestConn(t, r1, 1, true)
	r2.admit(c.Node().Key)
	if n := waitNode(t, c); n.HomeDERP != DefaultRegionID {
		t.Fatalf("home DERP %d", n.HomeDERP)
	}
	m2 := r2.dm.Clone()
	m2.Regions[0].ID = DefaultRegionID + 1
	m2.Regions[0].Code = "coord2"

	moved := make(chan int, 10)
	c.SetNodeCallback(func(n *Node) { moved <- n.HomeDERP })
	c.SetDERPMap(&DERPMap{}) // invalid: ignored
	c.SetDERPMap(m2)
	deadline := time.After(15 * time.Second)
	for {
		select {
		case home := <-moved:
			if home == DefaultRegionID+1 {
				return
			}
		case <-deadline:
			t.Fatal("home DERP never moved to the new map's region")
		}
	}
}

func TestSecondSTUNPort(t *testing.T) {
	m, err := CoordinatorDERPMap("203.0.113.10:8443", 3478, "")
	if err != nil {
		t.Fatal(err)
	}
	if m.hasSecondSTUN() || len(m.withSecondSTUN().Regions) != 1 {
		t.Fatal("a map without a second STUN port grew one")
	}
	m.Regions[0].Nodes[0].STUNPort2 = 3478
	if err := m.Validate(); err == nil {
		t.Error("a second STUN port equal to the first was accepted")
	}
	m.Regions[0].Nodes[0].STUNPort2 = 3479
	if err := m.Validate(); err != nil {
		t.Fatal(err)
	}
	dm := m.withSecondSTUN()
	if len(dm.Regions) != 2 {
		t.Fatalf("want the relay region and one STUN-only region, got %d regions", len(dm.Regions))
	}
	for id, r := range dm.Regions {
		if id == m.Regions[0].ID {
			continue
		}
		if !r.Avoid || len(r.Nodes) != 1 || !r.Nodes[0].STUNOnly || r.Nodes[0].STUNPort != 3479 || r.Nodes[0].IPv4 != "203.0.113.10" {
			t.Errorf("second-port region %d: %+v %+v", id, r, r.Nodes[0])
		}
	}
	if len(m.toTailcfg().Regions) != 1 {
		t.Error("the map magicsock gets must not carry the second port")
	}
}

// TestFallbackChangeKeepsRelayConnection: a new map that lists other
// fallback relays after the same first node (a coordinator replica
// started or stopped) leaves the working relay connection alone, and
// peers still reach each other over it; a changed first node is applied.
func TestFallbackChangeKeepsRelayConnection(t *testing.T) {
	r := newTestRelay(t)
	a, b := newTestConn(t, r, 1, true), newTestConn(t, r, 2, true)
	link(t, a, b)
	pingUntil(t, a, addrOf(b), func(PingResult) bool { return true })
	before := r.dials.Load()

	m := r.dm.Clone()
	if err := m.AddRelay("900-other", "https://192.0.2.1:8443", ""); err != nil {
		t.Fatal(err)
	}
	a.SetDERPMap(m)
	m2 := r.dm.Clone()
	if err := m2.AddRelay("900-else", "https://192.0.2.2:8443", ""); err != nil {
		t.Fatal(err)
	}
	a.SetDERPMap(m2)
	time.Sleep(500 * time.Millisecond)
	pingUntil(t, a, addrOf(b), func(PingResult) bool { return true })
	if n := r.dials.Load() - before; n != 0 {
		t.Errorf("the relay saw %d new connections after a fallback-only map change, want none", n)
	}

	kept := m2.keepWorkingRegions(r.dm)
	if len(kept.Regions[0].Nodes) != 1 {
		t.Errorf("fallback-only change applied: %+v", kept.Regions[0].Nodes)
	}
	m3 := r.dm.Clone()
	m3.Regions[0].Nodes[0].DERPPort++
	if got := m3.keepWorkingRegions(r.dm); got.Regions[0].Nodes[0] != m3.Regions[0].Nodes[0] {
		t.Errorf("a changed first node was not applied: %+v", got.Regions[0].Nodes[0])
	}
}

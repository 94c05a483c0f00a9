package tailnet

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

const testMeshKey = "6d6573682d6b65792d666f722d74657374732d6f6e6c792d2d2d2d2d2d2d2d21"

// meshPair starts two relays meshed both ways with the given keys.
func meshPair(t *testing.T, keyA, keyB string) (a, b *testRelay, errs *atomic.Int64) {
	a, b = newTestRelay(t), newTestRelay(t)
	if err := a.derp.SetMeshKey(keyA); err != nil {
		t.Fatal(err)
	}
	if err := b.derp.SetMeshKey(keyB); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	errs = &atomic.Int64{}
	onErr := func(error) { errs.Add(1) }
	for _, p := range [][2]*testRelay{{a, b}, {b, a}} {
		from, to := p[0], p[1]
		go from.derp.MeshWith(ctx, "https://"+to.srv.Listener.Addr().String(), to.dm.Regions[0].Nodes[0].CertFingerprint, onErr, nil)
	}
	return a, b, errs
}

// TestDERPMesh: a client of one relay reaches a client of the other
// through the mesh; each relay admits only its own registered keys.
func TestDERPMesh(t *testing.T) {
	a, b, errs := meshPair(t, testMeshKey, testMeshKey)
	xKey, yKey := key.NewNode(), key.NewNode()
	a.admit(xKey.Public().String())
	b.admit(yKey.Public().String())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	x, y := derpClient(t, a, xKey), derpClient(t, b, yKey)
	if err := x.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if err := y.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	got := packets(y)
	// The watch connections learn of y shortly; keep sending until then.
	deadline := time.After(15 * time.Second)
	for {
		if err := x.Send(yKey.Public(), []byte("across the mesh")); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-got:
			if string(p.Data) != "across the mesh" || p.Source != xKey.Public() {
				t.Fatalf("got %q from %v", p.Data, p.Source.ShortString())
			}
			if n := errs.Load(); n != 0 {
				t.Fatalf("%d mesh errors with matching keys", n)
			}
			return
		case <-time.After(200 * time.Millisecond):
		case <-deadline:
			t.Fatal("no packet crossed the mesh")
		}
	}
}

// TestDERPMeshKeyMismatch: relays with different keys do not mesh, and
// say so.
func TestDERPMeshKeyMismatch(t *testing.T) {
	other := strings.Repeat("ab", 32)
	_, _, errs := meshPair(t, testMeshKey, other)
	deadline := time.Now().Add(15 * time.Second)
	for errs.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no error reported for a mesh key mismatch")
		}
		time.Sleep(50 * time.Millisecond)
	}
	r := newTestRelay(t)
	if err := r.derp.SetMeshKey("short"); err == nil || !strings.Contains(err.Error(), "64 hex digits") {
		t.Fatalf("bad mesh key: %v", err)
	}
}

// TestDERPRegionFailover: with a second replica's relay added to the
// region, a client whose relay stops moves to the other node and is
// reached there.
func TestDERPRegionFailover(t *testing.T) {
	a, b, _ := meshPair(t, testMeshKey, testMeshKey)
	dm := a.dm.Clone()
	bNode := b.dm.Regions[0].Nodes[0]
	if err := dm.AddRelay("900-b", "https://"+b.srv.Listener.Addr().String(), bNode.CertFingerprint); err != nil {
		t.Fatal(err)
	}
	// Adding the same relay again, or the first one, changes nothing.
	if err := dm.AddRelay("900-b2", "https://"+b.srv.Listener.Addr().String(), bNode.CertFingerprint); err != nil {
		t.Fatal(err)
	}
	if err := dm.AddRelay("900-a", "https://"+a.srv.Listener.Addr().String(), bNode.CertFingerprint); err != nil {
		t.Fatal(err)
	}
	if n := len(dm.Regions[0].Nodes); n != 2 {
		t.Fatalf("region has %d nodes, want 2: %+v", n, dm.Regions[0].Nodes)
	}
	if err := dm.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := dm.AddRelay("x", "ftp://host", ""); err == nil || !strings.Contains(err.Error(), "want https://") {
		t.Fatalf("bad relay URL: %v", err)
	}

	xKey, yKey := key.NewNode(), key.NewNode()
	for _, r := range []*testRelay{a, b} {
		r.admit(xKey.Public().String())
		r.admit(yKey.Public().String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	region := dm.toTailcfg().Regions[DefaultRegionID]
	x := derphttp.NewRegionClient(xKey, t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	t.Cleanup(func() { x.Close() })
	y := derpClient(t, b, yKey)
	if err := x.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if got := x.ServerPublicKey(); got != a.derp.srv.PublicKey() {
		t.Fatalf("client started on relay %v, want the first node's", got.ShortString())
	}
	if err := y.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	got := packets(y)

	// Relay A stops: its listener closes and its connections drop.
	a.srv.Close()
	a.derp.Close()
	deadline := time.After(15 * time.Second)
	for {
		// A send on the dropped connection fails; the next one redials
		// the region and lands on the node that still answers.
		_ = x.Send(yKey.Public(), []byte("after failover"))
		select {
		case p := <-got:
			if string(p.Data) != "after failover" || p.Source != xKey.Public() {
				t.Fatalf("got %q from %v", p.Data, p.Source.ShortString())
			}
			if got := x.ServerPublicKey(); got != b.derp.srv.PublicKey() {
				t.Fatalf("client is on relay %v after failover, want the second node's", got.ShortString())
			}
			return
		case <-time.After(200 * time.Millisecond):
		case <-deadline:
			t.Fatal("the client did not move to the region's other relay")
		}
	}
}

// TestDERPMeshLinkState: a mesh link reports up once it carries pings,
// and down once the other relay stops.
func TestDERPMeshLinkState(t *testing.T) {
	a, b := newTestRelay(t), newTestRelay(t)
	for _, r := range []*testRelay{a, b} {
		if err := r.derp.SetMeshKey(testMeshKey); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var up atomic.Bool
	go a.derp.MeshWith(ctx, "https://"+b.srv.Listener.Addr().String(), b.dm.Regions[0].Nodes[0].CertFingerprint, nil, up.Store)
	waitLink := func(want bool) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for up.Load() != want {
			if time.Now().After(deadline) {
				t.Fatalf("mesh link never reported up=%v", want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitLink(true)
	b.srv.Close()
	b.derp.Close()
	waitLink(false)
}

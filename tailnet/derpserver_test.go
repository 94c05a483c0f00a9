package tailnet

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

func derpClient(t *testing.T, r *testRelay, priv key.NodePrivate) *derphttp.Client {
	t.Helper()
	region := r.dm.toTailcfg().Regions[DefaultRegionID]
	c := derphttp.NewRegionClient(priv, t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	t.Cleanup(func() { c.Close() })
	return c
}

// packets reads c until it fails, passing on the data packets.
func packets(c *derphttp.Client) <-chan derp.ReceivedPacket {
	ch := make(chan derp.ReceivedPacket, 16)
	go func() {
		defer close(ch)
		for {
			m, err := c.Recv()
			if err != nil {
				return
			}
			if p, ok := m.(derp.ReceivedPacket); ok {
				ch <- derp.ReceivedPacket{Source: p.Source, Data: bytes.Clone(p.Data)}
			}
		}
	}()
	return ch
}

func TestDERPAdmission(t *testing.T) {
	r := newTestRelay(t)
	recvKey, sendKey, strangerKey := key.NewNode(), key.NewNode(), key.NewNode()
	r.admit(recvKey.Public().String())
	r.admit(sendKey.Public().String())

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	recv := derpClient(t, r, recvKey)
	if err := recv.Connect(ctx); err != nil {
		t.Fatalf("admitted client (pinned TLS cert) could not connect: %v", err)
	}
	got := packets(recv)

	// The stranger's packets never reach the receiver.
	stranger := derpClient(t, r, strangerKey)
	stranger.Connect(ctx)
	stranger.Send(recvKey.Public(), []byte("from stranger"))
	if _, err := stranger.Recv(); err == nil {
		t.Fatal("unadmitted client kept a working relay connection")
	}

	// An admitted sender gets through, and is the first thing the receiver
	// sees: the stranger's packet was dropped.
	sender := derpClient(t, r, sendKey)
	if err := sender.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sender.Send(recvKey.Public(), []byte("hello")); err != nil {
		t.Fatal(err)
	}
	var p derp.ReceivedPacket
	select {
	case p = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("admitted sender's packet never arrived")
	}
	if string(p.Data) != "hello" || p.Source != sendKey.Public() {
		t.Fatalf("got %q from %v", p.Data, p.Source.ShortString())
	}
}

func TestDERPAdmissionFailsClosed(t *testing.T) {
	d, err := NewDERPServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// No admit function at all: nobody gets in.
	body, _ := json.Marshal(tailcfg.DERPAdmitClientRequest{NodePublic: key.NewNode().Public()})
	res, err := http.Post("http://derp:"+d.secret+"@"+d.ln.Addr().String()+"/derp-admit", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var out tailcfg.DERPAdmitClientResponse
	json.NewDecoder(res.Body).Decode(&out)
	res.Body.Close()
	if out.Allow {
		t.Fatal("admission allowed a key with no admit function set")
	}
	// The admission listener is loopback only.
	if ip := d.ln.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
		t.Fatalf("admission listener on %v", ip)
	}
}

// TestDERPAdmissionAnswersOnlyTheRelay: any local user can connect to the
// loopback admission listener, but without the relay's password it says
// nothing about which node keys are registered.
func TestDERPAdmissionAnswersOnlyTheRelay(t *testing.T) {
	d, err := NewDERPServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	k := key.NewNode().Public()
	d.SetAdmitFunc(func(string) bool { return true })
	body, _ := json.Marshal(tailcfg.DERPAdmitClientRequest{NodePublic: k})
	for _, u := range []string{
		"http://" + d.ln.Addr().String() + "/derp-admit",
		"http://derp:wrong@" + d.ln.Addr().String() + "/derp-admit",
	} {
		res, err := http.Post(u, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		var out tailcfg.DERPAdmitClientResponse
		json.NewDecoder(res.Body).Decode(&out)
		res.Body.Close()
		if res.StatusCode != http.StatusUnauthorized || out.Allow {
			t.Fatalf("admission without the relay's password: %s allow=%v, want 401", res.Status, out.Allow)
		}
	}
}

func TestDERPProbe(t *testing.T) {
	r := newTestRelay(t)
	client := r.srv.Client()
	for _, path := range []string{"/derp/probe", "/derp/latency-check"} {
		res, err := client.Get(r.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s", path, res.Status)
		}
	}
	res, err := client.Get(r.srv.URL + "/derp")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET /derp: %s, want 426", res.Status)
	}
}

func TestDERPOverWebSocket(t *testing.T) {
	r := newTestRelay(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u := "wss" + strings.TrimPrefix(r.srv.URL, "https") + "/derp"
	c, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: r.srv.Client(), Subprotocols: []string{"derp"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	typ, msg, err := c.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The first DERP frame is the server key: a 5-byte frame header, then
	// the magic.
	if typ != websocket.MessageBinary || !bytes.Contains(msg, []byte(derp.Magic)) {
		t.Fatalf("first WebSocket message (%v) %q does not carry the DERP server key", typ, msg)
	}
}

func TestNetcheck(t *testing.T) {
	r := newTestRelay(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rep, err := Netcheck(ctx, testLogger(t), r.dm)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", rep)
	if !rep.UDP || !rep.IPv4 {
		t.Fatalf("STUN on loopback did not answer: %+v", rep)
	}
	if rep.PreferredDERP != DefaultRegionID {
		t.Fatalf("preferred DERP %d, want %d", rep.PreferredDERP, DefaultRegionID)
	}
	if _, ok := rep.RegionLatency[DefaultRegionID]; !ok {
		t.Fatalf("no latency for region %d: %v", DefaultRegionID, rep.RegionLatency)
	}
	if !strings.HasPrefix(rep.GlobalV4, "127.0.0.1:") {
		t.Fatalf("global v4 %q, want 127.0.0.1:<port>", rep.GlobalV4)
	}

	// A relay that is not there: no UDP. (As root, netcheck may still
	// reach the host by ICMP and call it preferred.)
	dead, err := CoordinatorDERPMap("127.0.0.1:9", 9, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	rep, err = Netcheck(ctx2, nil, dead)
	if err == nil && rep.UDP {
		t.Fatalf("netcheck against nothing: %+v", rep)
	}
}

func TestDERPClosePeer(t *testing.T) {
	r := newTestRelay(t)
	goneKey, stayKey := key.NewNode(), key.NewNode()
	r.admit(goneKey.Public().String())
	r.admit(stayKey.Public().String())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	gone := derpClient(t, r, goneKey)
	stay := derpClient(t, r, stayKey)
	for _, c := range []*derphttp.Client{gone, stay} {
		if err := c.Connect(ctx); err != nil {
			t.Fatal(err)
		}
	}
	goneRecv := make(chan error, 1)
	go func() {
		for {
			if _, err := gone.Recv(); err != nil {
				goneRecv <- err
				return
			}
		}
	}()
	stayPackets := packets(stay)
	// The server registers a connection's key once it has read the client
	// info, which Connect does not wait for: retry until it is tracked.
	deadline := time.Now().Add(5 * time.Second)
	for r.derp.ClosePeer(goneKey.Public().String()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("ClosePeer found no connection for a connected key")
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case <-goneRecv:
	case <-time.After(2 * time.Second):
		t.Fatal("the closed peer's relay connection still reads after ClosePeer")
	}
	// The other peer's connection still works.
	sender := derpClient(t, r, goneKey)
	r.admit(goneKey.Public().String())
	if err := sender.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sender.Send(stayKey.Public(), []byte("still here")); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-stayPackets:
		if string(p.Data) != "still here" {
			t.Fatalf("got %q", p.Data)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the other peer's relay connection stopped working")
	}
	if n := r.derp.ClosePeer("nodekey:nonsense"); n != 0 {
		t.Fatalf("ClosePeer of a malformed key closed %d connections", n)
	}
}

package coordinator_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

// rawPeer speaks the protocol by hand, so tests can misbehave.
type rawPeer struct {
	conn    *websocket.Conn
	version int
}

func dialRaw(t *testing.T, tc *testCoordinator, token string) *rawPeer {
	t.Helper()
	return dialRawVersion(t, tc, token, protocol.Version)
}

// dialRawVersion connects offering only protocol version v.
func dialRawVersion(t *testing.T, tc *testCoordinator, token string, v int) *rawPeer {
	t.Helper()
	tlsCfg, err := coordclient.TLSConfig(tc.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, tc.URL()+protocol.CoordinatePath, &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg.Clone()}},
		HTTPHeader:   http.Header{"Authorization": {"Bearer " + token}},
		Subprotocols: []string{protocol.SubprotocolFor(v)},
	})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if got := conn.Subprotocol(); got != protocol.SubprotocolFor(v) {
		t.Fatalf("coordinator chose subprotocol %q, want %q", got, protocol.SubprotocolFor(v))
	}
	conn.SetReadLimit(1 << 20)
	t.Cleanup(func() { conn.CloseNow() })
	return &rawPeer{conn: conn, version: v}
}

func (r *rawPeer) sendRaw(t *testing.T, data []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := r.conn.Write(ctx, websocket.MessageText, data); err != nil {
		t.Fatalf("write: %v", err)
	}
}

func (r *rawPeer) send(t *testing.T, m *protocol.PeerMessage) {
	t.Helper()
	data, err := protocol.EncodePeer(r.version, m)
	if err != nil {
		t.Fatal(err)
	}
	r.sendRaw(t, data)
}

func (r *rawPeer) read(t *testing.T) (*protocol.ServerMessage, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	_, data, err := r.conn.Read(ctx)
	if err != nil {
		return nil, err
	}
	m, e := protocol.DecodeServer(r.version, data)
	if e != nil {
		t.Fatalf("coordinator sent an invalid message: %v: %s", e, data)
	}
	return m, nil
}

func (r *rawPeer) hello(t *testing.T) protocol.Hello {
	t.Helper()
	r.send(t, &protocol.PeerMessage{Type: protocol.TypeHello, Hello: &protocol.PeerHello{Software: "raw"}})
	m, err := r.read(t)
	if err != nil {
		t.Fatal(err)
	}
	if m.Type != protocol.TypeHello {
		t.Fatalf("first message %q, want hello", m.Type)
	}
	return *m.Hello
}

// expectClosedWith reads until the coordinator closes the connection and
// returns the error message it sent before closing (if any).
func (r *rawPeer) expectClosedWith(t *testing.T, code protocol.ErrorCode) {
	t.Helper()
	var got *protocol.Error
	for {
		m, err := r.read(t)
		if err != nil {
			if got == nil || got.Code != code || !got.Fatal || got.Message == "" {
				t.Fatalf("connection ended (%v) with error %+v, want a fatal %s with a message", err, got, code)
			}
			if s := websocket.CloseStatus(err); s == -1 {
				t.Fatalf("connection ended without a close frame: %v", err)
			}
			return
		}
		if m.Type == protocol.TypeError {
			got = m.Error
		}
	}
}

func TestMisbehavingPeersAreClosedOthersKeepWorking(t *testing.T) {
	f := newFixture(t, coordOpts{tweak: func(c *coordinator.Config) { c.HelloTimeout = 500 * time.Millisecond }})

	// A healthy pair, watched throughout.
	ws1 := startClient(t, f.tc, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	ws1Node := fakeNode(t, h1)
	ws1.UpdateNode(ws1Node)
	alice := startClient(t, f.tc, f.aliceToken)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	recv(t, alice.rec.peers, "ws1 at alice")
	recv(t, ws1.rec.peers, "alice at ws1")

	cases := []struct {
		name  string
		token string
		run   func(t *testing.T, r *rawPeer)
		code  protocol.ErrorCode
	}{
		{"not JSON", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.sendRaw(t, []byte("{nope"))
		}, protocol.CodeBadMessage},
		{"unknown type", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.sendRaw(t, []byte(`{"v":3,"type":"teleport","teleport":{}}`))
		}, protocol.CodeBadMessage},
		{"unknown field", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.sendRaw(t, []byte(`{"v":3,"type":"tunnel","tunnel":{"agent":"ws1","sneaky":true}}`))
		}, protocol.CodeBadMessage},
		{"wrong version", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.sendRaw(t, []byte(`{"v":4,"type":"hello","hello":{}}`))
		}, protocol.CodeUnsupportedVer},
		{"tunnel before hello", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.send(t, &protocol.PeerMessage{Type: protocol.TypeTunnel, Tunnel: &protocol.TunnelRequest{Agent: "ws2"}})
		}, protocol.CodeUnexpectedMessage},
		{"hello twice", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.send(t, &protocol.PeerMessage{Type: protocol.TypeHello, Hello: &protocol.PeerHello{}})
		}, protocol.CodeUnexpectedMessage},
		{"no hello in time", f.bobToken, func(t *testing.T, r *rawPeer) {}, protocol.CodeUnexpectedMessage},
		{"binary frame", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.conn.Write(context.Background(), websocket.MessageBinary, []byte{1, 2, 3})
		}, protocol.CodeBadMessage},
		{"node with another id", f.bobToken, func(t *testing.T, r *rawPeer) {
			h := r.hello(t)
			n := fakeNode(t, h)
			n.ID = h1.NodeID
			r.send(t, &protocol.PeerMessage{Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *n}})
		}, protocol.CodeNodeRejected},
		{"node with foreign address", f.bobToken, func(t *testing.T, r *rawPeer) {
			h := r.hello(t)
			n := fakeNode(t, h)
			n.Addresses = h1.Addresses
			r.send(t, &protocol.PeerMessage{Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *n}})
		}, protocol.CodeNodeRejected},
		{"invalid node", f.bobToken, func(t *testing.T, r *rawPeer) {
			h := r.hello(t)
			n := fakeNode(t, h)
			n.DiscoKey = "discokey:00"
			data, _ := json.Marshal(&protocol.PeerMessage{V: protocol.Version, Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *n}})
			r.sendRaw(t, data)
		}, protocol.CodeNodeRejected},
		{"another agent's key", f.ws2Token, func(t *testing.T, r *rawPeer) {
			h := r.hello(t)
			n := fakeNode(t, h)
			n.Key = ws1Node.Key
			r.send(t, &protocol.PeerMessage{Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *n}})
		}, protocol.CodeKeyInUse},
		{"agent opens a tunnel", f.ws2Token, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.send(t, &protocol.PeerMessage{Type: protocol.TypeTunnel, Tunnel: &protocol.TunnelRequest{Agent: "ws1"}})
		}, protocol.CodeUnexpectedMessage},
		{"client reports a network status", f.bobToken, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.send(t, &protocol.PeerMessage{Type: protocol.TypeNetworkStatus, NetworkStatus: &protocol.NetworkStatus{Verdict: brokenVerdict()}})
		}, protocol.CodeUnexpectedMessage},
		{"network status with an unknown status", f.ws2Token, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			r.sendRaw(t, []byte(`{"v":3,"type":"network_status","network_status":{"verdict":{"status":"sideways","summary":"x","at":"2026-01-02T03:04:05Z","since":"2026-01-02T03:04:05Z"}}}`))
		}, protocol.CodeBadMessage},
		{"network status with an oversized summary", f.ws2Token, func(t *testing.T, r *rawPeer) {
			r.hello(t)
			v := brokenVerdict()
			v.Summary = strings.Repeat("x", protocol.MaxNetworkSummary+1)
			data, _ := json.Marshal(&protocol.PeerMessage{V: protocol.Version, Type: protocol.TypeNetworkStatus, NetworkStatus: &protocol.NetworkStatus{Verdict: v}})
			r.sendRaw(t, data)
		}, protocol.CodeBadMessage},
		{"network status on a version 1 connection", f.ws2Token, func(t *testing.T, r *rawPeer) {
			r.version = 1
			r.hello(t)
			data, _ := json.Marshal(&protocol.PeerMessage{V: 1, Type: protocol.TypeNetworkStatus, NetworkStatus: &protocol.NetworkStatus{Verdict: brokenVerdict()}})
			r.sendRaw(t, data)
		}, protocol.CodeBadMessage},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := dialRaw(t, f.tc, c.token)
			if strings.Contains(c.name, "version 1") {
				r = dialRawVersion(t, f.tc, c.token, 1)
			}
			c.run(t, r)
			r.expectClosedWith(t, c.code)
		})
	}

	t.Run("oversized", func(t *testing.T) {
		r := dialRaw(t, f.tc, f.bobToken)
		r.hello(t)
		big := `{"v":2,"type":"hello","hello":{"software":"` + strings.Repeat("x", protocol.MaxMessageSize) + `"}}`
		r.sendRaw(t, []byte(big))
		for {
			_, err := r.read(t)
			if err != nil {
				if s := websocket.CloseStatus(err); s != websocket.StatusMessageTooBig {
					t.Fatalf("closed with %v (%v), want StatusMessageTooBig", s, err)
				}
				break
			}
		}
	})

	// Through all of that the healthy pair kept working.
	n2 := ws1Node.Clone()
	n2.HomeDERP = 902
	ws1.UpdateNode(n2)
	if p := recv(t, alice.rec.peers, "update after the misbehaviour"); p.Node.HomeDERP != 902 {
		t.Fatalf("got %+v", p)
	}
	nothing(t, alice.rec.gone, "peer gone at alice")
	nothing(t, alice.rec.discs, "alice disconnected")
	nothing(t, ws1.rec.discs, "ws1 disconnected")
}

func TestUnsupportedSubprotocolRefused(t *testing.T) {
	f := newFixture(t, coordOpts{})
	tlsCfg, _ := coordclient.TLSConfig(f.tc.Fingerprint())
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	_, resp, err := websocket.Dial(ctx, f.tc.URL()+protocol.CoordinatePath, &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg}},
		HTTPHeader:   http.Header{"Authorization": {"Bearer " + f.aliceToken}},
		Subprotocols: []string{"agentd-coordinate.v0"},
	})
	if err == nil || resp == nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("dial with an old subprotocol: %v %v", resp, err)
	}
	var e protocol.Error
	json.NewDecoder(resp.Body).Decode(&e)
	if e.Code != protocol.CodeUnsupportedVer {
		t.Fatalf("got %+v", e)
	}
}

func TestReplacedSession(t *testing.T) {
	f := newFixture(t, coordOpts{})
	old := dialRaw(t, f.tc, f.ws1Token)
	old.hello(t)
	newer := startClient(t, f.tc, f.ws1Token)
	recv(t, newer.rec.hellos, "new hello")
	old.expectClosedWith(t, protocol.CodeReplaced)
	nothing(t, newer.rec.discs, "newer disconnected")
}

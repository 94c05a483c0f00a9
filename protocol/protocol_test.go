package protocol

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/tailnet"
)

const (
	testKey   = "nodekey:5f1c2b3a4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8"
	testDisco = "discokey:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
)

func testNode() tailnet.Node {
	return tailnet.Node{
		ID:        42,
		Key:       testKey,
		DiscoKey:  testDisco,
		Addresses: []netip.Prefix{AgentAddress(42)},
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")},
		HomeDERP:  900,
		AsOf:      time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

func testDERPMap(t testing.TB) *tailnet.DERPMap {
	m, err := tailnet.CoordinatorDERPMap("coord.example:8443", 3478, strings.Repeat("ab", 32))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// peerSeeds are valid peer messages, one per type.
func peerSeeds(t testing.TB) [][]byte {
	n := testNode()
	msgs := []*PeerMessage{
		{Type: TypeHello, Hello: &PeerHello{Software: "agent 1.0", ResumeToken: "abc.def"}},
		{Type: TypeNode, Node: &NodeUpdate{Node: n}},
		{Type: TypeTunnel, Tunnel: &TunnelRequest{Agent: "ws1"}},
		{Type: TypeUntunnel, Untunnel: &TunnelRequest{Agent: "ws1"}},
		{Type: TypeDisconnect, Disconnect: &Disconnect{}},
		{Type: TypeNetworkStatus, NetworkStatus: &NetworkStatus{Verdict: testVerdict(), History: []NetworkVerdict{testOKVerdict()}}},
	}
	var out [][]byte
	for _, m := range msgs {
		data, err := EncodePeer(Version, m)
		if err != nil {
			t.Fatalf("encoding %s: %v", m.Type, err)
		}
		out = append(out, data)
	}
	return out
}

func serverSeeds(t testing.TB) [][]byte {
	n := testNode()
	msgs := []*ServerMessage{
		{Type: TypeHello, Hello: &Hello{Role: RoleClient, NodeID: 7, Addresses: []netip.Prefix{ClientAddress(7)},
			Name: "jane.doe", User: "jane.doe", DERPMap: testDERPMap(t), ResumeToken: "x.y"}},
		{Type: TypePeer, Peer: &Peer{Node: n, Role: RoleAgent, Name: "ws1", User: "jane.doe"}},
		{Type: TypePeerGone, PeerGone: &PeerGone{NodeID: 42, Name: "ws1", Reason: GoneLost}},
		{Type: TypeTunnelStatus, TunnelStatus: &TunnelStatus{Agent: "ws1", NodeID: 42, Addresses: []netip.Prefix{AgentAddress(42)}, Online: true}},
		{Type: TypeTunnelStatus, TunnelStatus: &TunnelStatus{Agent: "ws1", NodeID: 42, Addresses: []netip.Prefix{AgentAddress(42)},
			Network: new(testVerdict()), OfflineSince: time.Date(2026, 1, 2, 3, 5, 0, 0, time.UTC), OfflineReason: GoneLost}},
		{Type: TypeError, Error: &Error{Code: CodeForbidden, Message: "no grant", Agent: "ws1"}},
	}
	var out [][]byte
	for _, m := range msgs {
		data, err := EncodeServer(Version, m)
		if err != nil {
			t.Fatalf("encoding %s: %v", m.Type, err)
		}
		out = append(out, data)
	}
	return out
}

func TestRoundTrip(t *testing.T) {
	for _, data := range peerSeeds(t) {
		m, e := DecodePeer(Version, data)
		if e != nil {
			t.Fatalf("decoding %s: %v", data, e)
		}
		again, err := EncodePeer(Version, m)
		if err != nil || string(again) != string(data) {
			t.Fatalf("round trip changed %s into %s (%v)", data, again, err)
		}
	}
	for _, data := range serverSeeds(t) {
		m, e := DecodeServer(Version, data)
		if e != nil {
			t.Fatalf("decoding %s: %v", data, e)
		}
		again, err := EncodeServer(Version, m)
		if err != nil || string(again) != string(data) {
			t.Fatalf("round trip changed %s into %s (%v)", data, again, err)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	node, _ := json.Marshal(testNode())
	cases := []struct {
		name, in string
		code     ErrorCode
		want     string
	}{
		{"not json", `{nope`, CodeBadMessage, "not a valid message"},
		{"empty", ``, CodeBadMessage, "not a valid message"},
		{"null", `null`, CodeUnsupportedVer, "version 0"},
		{"array", `[]`, CodeBadMessage, "not a valid message"},
		{"trailing", `{"v":1,"type":"disconnect","disconnect":{}} {}`, CodeBadMessage, "trailing data"},
		{"no version", `{"type":"disconnect","disconnect":{}}`, CodeUnsupportedVer, "version 0"},
		{"future version", `{"v":2,"type":"disconnect","disconnect":{}}`, CodeUnsupportedVer, "version 2"},
		{"unknown type", `{"v":1,"type":"bogus"}`, CodeBadMessage, `unknown message type "bogus"`},
		{"server type from peer", `{"v":1,"type":"peer_gone"}`, CodeBadMessage, "unknown message type"},
		{"unknown field", `{"v":1,"type":"disconnect","disconnect":{},"x":1}`, CodeBadMessage, `unknown field "x"`},
		{"unknown nested field", `{"v":1,"type":"tunnel","tunnel":{"agent":"ws1","x":1}}`, CodeBadMessage, `unknown field "x"`},
		{"missing body", `{"v":1,"type":"tunnel"}`, CodeBadMessage, "exactly one body"},
		{"two bodies", `{"v":1,"type":"tunnel","tunnel":{"agent":"ws1"},"disconnect":{}}`, CodeBadMessage, "exactly one body"},
		{"wrong body", `{"v":1,"type":"tunnel","untunnel":{"agent":"ws1"}}`, CodeBadMessage, "exactly one body"},
		{"bad agent name", `{"v":1,"type":"tunnel","tunnel":{"agent":"WS 1"}}`, CodeBadMessage, "agent name"},
		{"empty agent name", `{"v":1,"type":"tunnel","tunnel":{"agent":""}}`, CodeBadMessage, "is empty"},
		{"control chars", `{"v":1,"type":"hello","hello":{"software":"a\u0007b"}}`, CodeBadMessage, "control characters"},
		{"long software", `{"v":1,"type":"hello","hello":{"software":"` + strings.Repeat("a", MaxSoftwareLength+1) + `"}}`, CodeBadMessage, "software is"},
		{"bad node", `{"v":1,"type":"node","node":{"node":{"id":0}}}`, CodeNodeRejected, "node id is zero"},
		{"node bad address", `{"v":1,"type":"node","node":{"node":` + strings.Replace(string(node), `"fd5e`, `"zz`, 1) + `}}`, CodeBadMessage, "not a valid message"},
		{"too large", `{"v":1,"type":"hello","hello":{"software":"` + strings.Repeat("a", MaxMessageSize) + `"}}`, CodeMessageTooLarge, "limit is 65536"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m, e := DecodePeer(1, []byte(c.in))
			if e == nil {
				t.Fatalf("accepted %s as %+v", c.in, m)
			}
			if e.Code != c.code || !strings.Contains(e.Message, c.want) || !e.Fatal {
				t.Fatalf("got %s %q, want %s containing %q", e.Code, e.Message, c.code, c.want)
			}
			if strings.ContainsAny(e.Message, "\n\r") || len(e.Message) > MaxErrorTextLength {
				t.Fatalf("error text is not one bounded line: %q", e.Message)
			}
		})
	}
}

func TestDecodeServerRejectsPeerTypes(t *testing.T) {
	for _, data := range peerSeeds(t) {
		var probe struct{ Type Type }
		json.Unmarshal(data, &probe)
		if probe.Type == TypeHello {
			continue // hello exists in both directions, with different bodies
		}
		if _, e := DecodeServer(Version, data); e == nil {
			t.Fatalf("server decoder accepted a peer message: %s", data)
		}
	}
}

func TestEncodeRefusesInvalid(t *testing.T) {
	if _, err := EncodePeer(Version, &PeerMessage{Type: TypeTunnel}); err == nil {
		t.Fatal("encoded a tunnel without a body")
	}
	if _, err := EncodeServer(Version, &ServerMessage{Type: TypeError, Error: &Error{Code: "x", Message: "two\nlines"}}); err == nil {
		t.Fatal("encoded an error text with a newline")
	}
}

func TestNames(t *testing.T) {
	for _, ok := range []string{"ws1", "a", "my-workspace", strings.Repeat("a", 63)} {
		if err := ValidAgentName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-ws", "ws-", "WS", "ws.1", "ws_1", "w s", strings.Repeat("a", 64), "wß"} {
		if err := ValidAgentName(bad); err == nil {
			t.Errorf("agent name %q accepted", bad)
		}
	}
	for _, ok := range []string{"jane.doe", "j_d", "bob"} {
		if err := ValidUserName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{".jane", "jane.", "Jane", "ja ne"} {
		if err := ValidUserName(bad); err == nil {
			t.Errorf("user name %q accepted", bad)
		}
	}
}

func TestAddresses(t *testing.T) {
	a := AgentAddress(0x0102030405060708)
	if a.String() != "fd5e:a9e1:7c3b:a:102:304:506:708/128" {
		t.Fatalf("agent address %v", a)
	}
	c := ClientAddress(5)
	if !TailnetPrefix().Contains(a.Addr()) || !TailnetPrefix().Contains(c.Addr()) {
		t.Fatal("addresses outside the tailnet prefix")
	}
	if !IsAgentAddress(a.Addr()) || IsClientAddress(a.Addr()) || !IsClientAddress(c.Addr()) || IsAgentAddress(c.Addr()) {
		t.Fatal("agent and client halves are not told apart")
	}
	if IsAgentAddress(netip.MustParseAddr("fd00::a")) || IsClientAddress(netip.MustParseAddr("192.0.2.1")) {
		t.Fatal("foreign address classified as ours")
	}
}

func TestPermanentCodes(t *testing.T) {
	for _, c := range []ErrorCode{CodeTokenMissing, CodeTokenInvalid, CodeTokenExpired, CodeTokenRevoked, CodeUnsupportedVer} {
		if !c.Permanent() {
			t.Errorf("%s should be permanent", c)
		}
	}
	for _, c := range []ErrorCode{CodeBadMessage, CodeSlowConsumer, CodeReplaced, CodeForbidden} {
		if c.Permanent() {
			t.Errorf("%s should not be permanent", c)
		}
	}
}

// FuzzDecode feeds arbitrary frames to both decoders: they must never
// panic, must bound their error text, and whatever they accept must encode
// again into something they accept (so nothing invalid passes through).
func FuzzDecode(f *testing.F) {
	for _, s := range peerSeeds(f) {
		f.Add(s)
	}
	for _, s := range serverSeeds(f) {
		f.Add(s)
	}
	for _, s := range []string{``, `{}`, `null`, `{"v":1}`, `{"v":1,"type":"node","node":{"node":{}}}`,
		`{"v":1,"type":"tunnel","tunnel":{"agent":"ws1"}} x`, `{"v":1,"type":"hello","hello":{"software":"\u0000"}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for v := MinVersion; v <= Version; v++ {
			fuzzOne(t, v, data, DecodePeer, EncodePeer)
			fuzzOne(t, v, data, DecodeServer, EncodeServer)
		}
	})
}

// fuzzOne decodes data with one direction's decoder for version v: a
// refusal must be sendable, an acceptance must encode into something the
// decoder accepts again.
func fuzzOne[M any](t *testing.T, v int, data []byte, decode func(int, []byte) (M, *Error), encode func(int, M) ([]byte, error)) {
	m, e := decode(v, data)
	if e != nil {
		checkError(t, e)
		return
	}
	again, err := encode(v, m)
	if err != nil {
		t.Fatalf("accepted %q but cannot encode it: %v", data, err)
	}
	if _, e := decode(v, again); e != nil {
		t.Fatalf("re-encoded %q is refused: %v", again, e)
	}
}

func checkError(t *testing.T, e *Error) {
	if e.Code == "" || !e.Fatal {
		t.Fatalf("decode error without code or not fatal: %+v", e)
	}
	if err := e.validate(); err != nil {
		t.Fatalf("decode error could not be sent back: %v (%q)", err, e.Message)
	}
}

func TestHelloIdentityNeedsVersion3(t *testing.T) {
	id := `"identity":{"host_key":"ssh-ed25519 AAAA","signature":"c2ln"}`
	if _, e := DecodePeer(2, []byte(`{"v":2,"type":"hello","hello":{`+id+`}}`)); e == nil || e.Code != CodeBadMessage {
		t.Fatalf("identity on a version 2 connection: %v, want bad_message", e)
	}
	m, e := DecodePeer(3, []byte(`{"v":3,"type":"hello","hello":{`+id+`}}`))
	if e != nil || m.Hello.Identity == nil || m.Hello.Identity.HostKey != "ssh-ed25519 AAAA" {
		t.Fatalf("identity on version 3: %+v, %v", m, e)
	}
	if _, e := DecodePeer(3, []byte(`{"v":3,"type":"hello","hello":{"identity":{"host_key":"ssh-ed25519 AAAA","signature":""}}}`)); e == nil {
		t.Fatal("identity without a signature accepted")
	}
}

package protocol

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func testVerdict() NetworkVerdict {
	return NetworkVerdict{
		Status:  NetworkBroken,
		Summary: "workspace network broken past eth0: the gateway 10.9.0.1 does not answer",
		Codes:   []string{"gateway.unreachable", "dns.unreachable"},
		At:      time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		Since:   time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

func testOKVerdict() NetworkVerdict {
	return NetworkVerdict{Status: NetworkOK, Summary: "workspace network ok",
		At: time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC), Since: time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC)}
}

// networkFrame is a network_status frame of version v with the verdict
// changed by edit.
func networkFrame(t *testing.T, v int, edit func(*NetworkStatus)) []byte {
	t.Helper()
	ns := NetworkStatus{Verdict: testVerdict()}
	if edit != nil {
		edit(&ns)
	}
	data, err := json.Marshal(PeerMessage{V: v, Type: TypeNetworkStatus, NetworkStatus: &ns})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestNetworkStatusDecodes(t *testing.T) {
	m, e := DecodePeer(2, networkFrame(t, 2, func(ns *NetworkStatus) {
		for range MaxNetworkHistory {
			ns.History = append(ns.History, testOKVerdict())
		}
		ns.Verdict.Summary = strings.Repeat("é", MaxNetworkSummary/2)
	}))
	if e != nil {
		t.Fatalf("a network_status at every limit was refused: %v", e)
	}
	if m.NetworkStatus.Verdict.Status != NetworkBroken || len(m.NetworkStatus.History) != MaxNetworkHistory {
		t.Fatalf("decoded %+v", m.NetworkStatus)
	}
}

func TestNetworkStatusRejects(t *testing.T) {
	cases := []struct {
		name string
		v    int
		edit func(*NetworkStatus)
		want string
	}{
		{"version 1", 1, nil, "needs protocol version 2"},
		{"bad status", 2, func(ns *NetworkStatus) { ns.Verdict.Status = "fine" }, `unknown network status "fine"`},
		{"skipped status", 2, func(ns *NetworkStatus) { ns.Verdict.Status = "skipped" }, "unknown network status"},
		{"empty status", 2, func(ns *NetworkStatus) { ns.Verdict.Status = "" }, "unknown network status"},
		{"long summary", 2, func(ns *NetworkStatus) { ns.Verdict.Summary = strings.Repeat("a", MaxNetworkSummary+1) }, "summary is 513 bytes"},
		{"two-line summary", 2, func(ns *NetworkStatus) { ns.Verdict.Summary = "a\nb" }, "not one printable line"},
		{"too many codes", 2, func(ns *NetworkStatus) { ns.Verdict.Codes = slices.Repeat([]string{"a.b"}, MaxNetworkCodes+1) }, "17 codes"},
		{"bad code", 2, func(ns *NetworkStatus) { ns.Verdict.Codes = []string{"Gateway Down"} }, "finding code"},
		{"long code", 2, func(ns *NetworkStatus) { ns.Verdict.Codes = []string{strings.Repeat("a", MaxNetworkCodeLength+1)} }, "finding code"},
		{"no time", 2, func(ns *NetworkStatus) { ns.Verdict.At = time.Time{} }, "without a time"},
		{"no since", 2, func(ns *NetworkStatus) { ns.Verdict.Since = time.Time{} }, "without a since"},
		{"long history", 2, func(ns *NetworkStatus) {
			ns.History = slices.Repeat([]NetworkVerdict{testOKVerdict()}, MaxNetworkHistory+1)
		}, "17 history entries"},
		{"bad history entry", 2, func(ns *NetworkStatus) {
			bad := testOKVerdict()
			bad.Status = "meh"
			ns.History = []NetworkVerdict{testOKVerdict(), bad}
		}, "history[1]"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := networkFrame(t, c.v, c.edit)
			m, e := DecodePeer(c.v, data)
			if e == nil {
				t.Fatalf("accepted %s as %+v", data, m)
			}
			if e.Code != CodeBadMessage || !e.Fatal || !strings.Contains(e.Message, c.want) {
				t.Fatalf("got %s %q, want bad_message containing %q", e.Code, e.Message, c.want)
			}
			checkError(t, e)
		})
	}
	t.Run("unknown field", func(t *testing.T) {
		data := []byte(`{"v":2,"type":"network_status","network_status":{"verdict":{"status":"ok","summary":"","at":"2026-01-02T03:04:05Z","since":"2026-01-02T03:04:05Z","extra":1}}}`)
		if _, e := DecodePeer(2, data); e == nil || !strings.Contains(e.Message, `unknown field "extra"`) {
			t.Fatalf("got %v", e)
		}
	})
	t.Run("oversized frame", func(t *testing.T) {
		data := []byte(`{"v":2,"type":"network_status","network_status":{"verdict":{"status":"ok","summary":"` + strings.Repeat("a", MaxMessageSize) + `"}}}`)
		if _, e := DecodePeer(2, data); e == nil || e.Code != CodeMessageTooLarge {
			t.Fatalf("got %v", e)
		}
	})
}

// A full history of the longest verdicts still fits in one frame.
func TestNetworkStatusFitsAFrame(t *testing.T) {
	long := testVerdict()
	long.Summary = strings.Repeat("x", MaxNetworkSummary)
	long.Codes = slices.Repeat([]string{strings.Repeat("c", MaxNetworkCodeLength)}, MaxNetworkCodes)
	ns := &NetworkStatus{Verdict: long, History: slices.Repeat([]NetworkVerdict{long}, MaxNetworkHistory)}
	data, err := EncodePeer(Version, &PeerMessage{Type: TypeNetworkStatus, NetworkStatus: ns})
	if err != nil {
		t.Fatal(err)
	}
	if len(data) > MaxMessageSize {
		t.Fatalf("the largest network_status is %d bytes, over the %d-byte frame limit", len(data), MaxMessageSize)
	}
}

func TestVerdictFit(t *testing.T) {
	v := testVerdict()
	v.Summary = "line one\nline two\x07" + strings.Repeat("é", MaxNetworkSummary)
	v.Codes = append(slices.Repeat([]string{"gateway.unreachable"}, MaxNetworkCodes), "BAD CODE")
	v.Codes = append([]string{"BAD CODE"}, v.Codes...)
	f := v.Fit()
	if err := f.validate(); err != nil {
		t.Fatalf("Fit left an invalid verdict: %v", err)
	}
	if !strings.HasPrefix(f.Summary, "line one line two?") || !strings.HasSuffix(f.Summary, "...") || len(f.Summary) > MaxNetworkSummary {
		t.Fatalf("summary %q", f.Summary)
	}
	if len(f.Codes) != MaxNetworkCodes || slices.Contains(f.Codes, "BAD CODE") {
		t.Fatalf("codes %v", f.Codes)
	}
}

func TestTunnelStatusVersions(t *testing.T) {
	full := &ServerMessage{Type: TypeTunnelStatus, TunnelStatus: &TunnelStatus{
		Agent: "ws1", NodeID: 42, Addresses: []netip.Prefix{AgentAddress(42)},
		Network: new(testVerdict()), OfflineSince: time.Date(2026, 1, 2, 3, 5, 0, 0, time.UTC), OfflineReason: GoneLost,
	}}
	if _, err := EncodeServer(1, full); err == nil {
		t.Fatal("encoded version 2 fields for a version 1 connection")
	}
	old := full.ForVersion(1)
	data, err := EncodeServer(1, old)
	if err != nil {
		t.Fatalf("encoding for version 1: %v", err)
	}
	if strings.Contains(string(data), "network") || strings.Contains(string(data), "offline") {
		t.Fatalf("version 1 tunnel_status carries new fields: %s", data)
	}
	if _, e := DecodeServer(1, data); e != nil {
		t.Fatalf("version 1 decoder refuses the downgraded message: %v", e)
	}
	if full.TunnelStatus.Network == nil {
		t.Fatal("ForVersion changed the original message")
	}
	v2 := strings.Replace(string(data), `"v":1`, `"v":2`, 1)
	withNew := strings.Replace(string(data), `"online":false`, `"online":false,"offline_reason":"lost"`, 1)
	if _, e := DecodeServer(1, []byte(withNew)); e == nil || !strings.Contains(e.Message, "version 2 fields") {
		t.Fatalf("version 1 decoder accepted a version 2 field: %v", e)
	}
	if _, e := DecodeServer(1, []byte(v2)); e == nil || e.Code != CodeUnsupportedVer {
		t.Fatalf("a v2 frame on a v1 connection: %v", e)
	}

	bad := *full.TunnelStatus
	bad.Online = true
	if _, err := EncodeServer(2, &ServerMessage{Type: TypeTunnelStatus, TunnelStatus: &bad}); err == nil {
		t.Fatal("encoded an online agent with an offline reason")
	}
	bad = *full.TunnelStatus
	bad.OfflineReason = "revoked"
	if _, err := EncodeServer(2, &ServerMessage{Type: TypeTunnelStatus, TunnelStatus: &bad}); err == nil {
		t.Fatal("encoded offline_reason revoked")
	}
}

func TestSubprotocols(t *testing.T) {
	got := Subprotocols()
	want := []string{"agentd-coordinate.v3", "agentd-coordinate.v2", "agentd-coordinate.v1"}
	if !slices.Equal(got, want) || got[0] != Subprotocol {
		t.Fatalf("Subprotocols() = %v, want %v", got, want)
	}
	for s, v := range map[string]int{"agentd-coordinate.v1": 1, "agentd-coordinate.v2": 2, "agentd-coordinate.v3": 3, "agentd-coordinate.v4": 0,
		"agentd-coordinate.v0": 0, "agentd-coordinate.v02": 0, "other.v1": 0, "": 0} {
		if VersionOf(s) != v {
			t.Errorf("VersionOf(%q) = %d, want %d", s, VersionOf(s), v)
		}
	}
}

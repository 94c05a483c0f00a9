package coordinator_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

func brokenVerdict() protocol.NetworkVerdict {
	at := time.Now().UTC().Truncate(time.Second)
	return protocol.NetworkVerdict{
		Status:  protocol.NetworkBroken,
		Summary: "workspace network broken past eth0: the gateway 10.9.0.1 does not answer",
		Codes:   []string{"gateway.unreachable"},
		At:      at, Since: at,
	}
}

func okVerdict(at time.Time) protocol.NetworkVerdict {
	return protocol.NetworkVerdict{Status: protocol.NetworkOK, Summary: "workspace network ok", At: at, Since: at}
}

// tunnelStatusWhere waits for a tunnel_status satisfying ok.
func tunnelStatusWhere(t *testing.T, r *recorder, what string, ok func(protocol.TunnelStatus) bool) protocol.TunnelStatus {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		select {
		case s := <-r.tunnels:
			if ok(s) {
				return s
			}
		case <-deadline:
			t.Fatalf("timed out waiting for a tunnel_status with %s", what)
		}
	}
}

func TestNetworkVerdictReachesClients(t *testing.T) {
	f := newFixture(t, coordOpts{})
	ws1 := startClient(t, f.tc, f.ws1Token)
	recv(t, ws1.rec.hellos, "ws1 hello")
	broken := brokenVerdict()
	ws1.ReportNetwork(broken)

	alice := startClient(t, f.tc, f.aliceToken)
	recv(t, alice.rec.hellos, "alice hello")
	alice.AddTunnel("ws1")
	s := tunnelStatusWhere(t, alice.rec, "the broken verdict", func(s protocol.TunnelStatus) bool { return s.Network != nil })
	if !s.Online || s.Network.Status != protocol.NetworkBroken || s.Network.Summary != broken.Summary ||
		!s.Network.At.Equal(broken.At) || len(s.Network.Codes) != 1 || !s.OfflineSince.IsZero() {
		t.Fatalf("tunnel_status %+v (network %+v)", s, s.Network)
	}

	// The admin listing shows it too.
	info, err := f.tc.admin(t).Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	listed := false
	for _, p := range info.Peers {
		if p.Name == "ws1" && p.Network != nil && p.Network.Summary == broken.Summary {
			listed = true
		}
	}
	if !listed {
		t.Fatalf("admin info does not show ws1's verdict: %+v", info.Peers)
	}

	// A new verdict while the tunnel is open is passed on at once.
	ws1.ReportNetwork(okVerdict(broken.At.Add(time.Second)))
	tunnelStatusWhere(t, alice.rec, "the ok verdict", func(s protocol.TunnelStatus) bool {
		return s.Network != nil && s.Network.Status == protocol.NetworkOK && s.Online
	})

	// A graceful stop: offline, disconnected, the last verdict kept.
	before := time.Now()
	ws1.stop()
	s = tunnelStatusWhere(t, alice.rec, "offline", func(s protocol.TunnelStatus) bool { return !s.Online })
	if s.OfflineReason != protocol.GoneDisconnected || s.OfflineSince.Before(before.Add(-time.Second)) ||
		s.Network == nil || s.Network.Status != protocol.NetworkOK {
		t.Fatalf("after the agent stopped: %+v (network %+v)", s, s.Network)
	}
}

func TestLostAgentKeepsItsLastVerdict(t *testing.T) {
	f := newFixture(t, coordOpts{})
	bob := startClient(t, f.tc, f.bobToken)
	recv(t, bob.rec.hellos, "bob hello")
	bob.AddTunnel("ws2")
	if s := recv(t, bob.rec.tunnels, "ws2 status"); s.Online || s.Network != nil || !s.OfflineSince.IsZero() {
		t.Fatalf("never-connected agent: %+v", s)
	}

	// The agent says its network is broken, then its connection breaks
	// without a goodbye: the coordinator must call it lost and keep the
	// verdict for every client.
	agent := dialRaw(t, f.tc, f.ws2Token)
	agent.hello(t)
	broken := brokenVerdict()
	agent.send(t, &protocol.PeerMessage{Type: protocol.TypeNetworkStatus, NetworkStatus: &protocol.NetworkStatus{Verdict: broken}})
	tunnelStatusWhere(t, bob.rec, "the broken verdict", func(s protocol.TunnelStatus) bool { return s.Online && s.Network != nil })
	lostAt := time.Now()
	agent.conn.CloseNow()
	s := tunnelStatusWhere(t, bob.rec, "lost", func(s protocol.TunnelStatus) bool { return !s.Online })
	if s.OfflineReason != protocol.GoneLost || s.OfflineSince.Before(lostAt.Add(-time.Second)) || s.Network == nil || s.Network.Summary != broken.Summary {
		t.Fatalf("after the connection broke: %+v (network %+v)", s, s.Network)
	}

	// A client arriving later hears the same.
	late := startClient(t, f.tc, f.bobToken)
	recv(t, late.rec.hellos, "late hello")
	late.AddTunnel("ws2")
	s2 := recv(t, late.rec.tunnels, "ws2 status for a late client")
	if s2.Online || s2.OfflineReason != protocol.GoneLost || !s2.OfflineSince.Equal(s.OfflineSince) || s2.Network == nil || s2.Network.Status != protocol.NetworkBroken {
		t.Fatalf("late client: %+v (network %+v)", s2, s2.Network)
	}
}

// logTo returns a coordinator logger writing to a file the test reads back
// (slog's handler serialises the writes), and the reader.
func logTo(t *testing.T) (*slog.Logger, func() string) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "coordinator.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return slog.New(slog.NewTextHandler(f, nil)), func() string {
		b, _ := os.ReadFile(f.Name())
		return string(b)
	}
}

func TestUndeliveredVerdictsAreLogged(t *testing.T) {
	logger, logged := logTo(t)
	f := newFixture(t, coordOpts{tweak: func(c *coordinator.Config) { c.Logger = logger }})
	t0 := time.Now().UTC().Truncate(time.Second).Add(-time.Minute)
	broken := brokenVerdict()
	broken.At, broken.Since = t0.Add(10*time.Second), t0.Add(10*time.Second)
	broken.Summary = "workspace network broken past eth0: undelivered"
	recovered := okVerdict(t0.Add(20 * time.Second))

	// The coordinator has the agent's ok verdict from t0.
	agent := dialRaw(t, f.tc, f.ws1Token)
	agent.hello(t)
	agent.send(t, &protocol.PeerMessage{Type: protocol.TypeNetworkStatus, NetworkStatus: &protocol.NetworkStatus{Verdict: okVerdict(t0)}})
	agent.conn.CloseNow()

	// Back after an outage, the agent reports what happened meanwhile.
	again := dialRaw(t, f.tc, f.ws1Token)
	again.hello(t)
	again.send(t, &protocol.PeerMessage{Type: protocol.TypeNetworkStatus, NetworkStatus: &protocol.NetworkStatus{
		Verdict: recovered, History: []protocol.NetworkVerdict{okVerdict(t0), broken},
	}})
	deadline := time.Now().Add(waitFor)
	for !strings.Contains(logged(), "summary=\"workspace network ok\" codes=[] at="+recovered.At.Format("2006-01-02T15:04:05.000Z07:00")) {
		if time.Now().After(deadline) {
			t.Fatalf("the current verdict was not logged:\n%s", logged())
		}
		time.Sleep(20 * time.Millisecond)
	}
	var late []string
	for _, line := range strings.Split(logged(), "\n") {
		if strings.Contains(line, "not received when it happened") {
			late = append(late, line)
		}
	}
	if len(late) != 1 || !strings.Contains(late[0], "undelivered") || !strings.Contains(late[0], "status=broken") {
		t.Fatalf("want exactly the broken verdict logged as undelivered, got %q\nall logs:\n%s", late, logged())
	}
}

// coordclient sends the verdicts reported before it could connect as
// history with its first network_status.
func TestClientSendsHistoryAfterConnecting(t *testing.T) {
	logger, logged := logTo(t)
	f := newFixture(t, coordOpts{tweak: func(c *coordinator.Config) { c.Logger = logger }})
	bob := startClient(t, f.tc, f.bobToken)
	recv(t, bob.rec.hellos, "bob hello")
	bob.AddTunnel("ws2")
	recv(t, bob.rec.tunnels, "ws2 offline")

	t0 := time.Now().UTC().Truncate(time.Second).Add(-time.Minute)
	broken := brokenVerdict()
	broken.At, broken.Since = t0.Add(5*time.Second), t0.Add(5*time.Second)
	rec := newRecorder()
	ws2 := newClientWithRecorder(t, f.tc, f.ws2Token, rec)
	ws2.ReportNetwork(okVerdict(t0))
	ws2.ReportNetwork(broken)
	ws2.ReportNetwork(okVerdict(t0.Add(9 * time.Second)))
	ws2.start()

	s := tunnelStatusWhere(t, bob.rec, "the verdict", func(s protocol.TunnelStatus) bool { return s.Online && s.Network != nil })
	if s.Network.Status != protocol.NetworkOK || !s.Network.At.Equal(t0.Add(9*time.Second)) {
		t.Fatalf("current verdict %+v", s.Network)
	}
	deadline := time.Now().Add(waitFor)
	for strings.Count(logged(), "not received when it happened") < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("the two earlier verdicts were not logged as undelivered:\n%s", logged())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logged(), "status=broken summary=\"workspace network broken past eth0") {
		t.Fatalf("the broken verdict is missing from the log:\n%s", logged())
	}
}

// A client of the previous protocol version gets tunnel_status without the
// new fields, decoded by a strict version 1 decoder.
func TestVersion1ClientGetsVersion1TunnelStatus(t *testing.T) {
	f := newFixture(t, coordOpts{})
	ws1 := startClient(t, f.tc, f.ws1Token)
	recv(t, ws1.rec.hellos, "ws1 hello")
	ws1.ReportNetwork(brokenVerdict())
	// Wait until the coordinator has the verdict.
	alice := startClient(t, f.tc, f.aliceToken)
	recv(t, alice.rec.hellos, "alice hello")
	alice.AddTunnel("ws1")
	tunnelStatusWhere(t, alice.rec, "the verdict", func(s protocol.TunnelStatus) bool { return s.Network != nil })

	old := dialRawVersion(t, f.tc, f.aliceToken, 1)
	old.hello(t)
	old.send(t, &protocol.PeerMessage{Type: protocol.TypeTunnel, Tunnel: &protocol.TunnelRequest{Agent: "ws1"}})
	m, err := old.read(t)
	if err != nil {
		t.Fatal(err)
	}
	if m.Type != protocol.TypeTunnelStatus || !m.TunnelStatus.Online || m.TunnelStatus.Network != nil || m.V != 1 {
		t.Fatalf("version 1 client got %+v", m)
	}
}

// pendingClient is a coordclient not yet running.
type pendingClient struct {
	*coordclient.Client
	t *testing.T
}

func newClientWithRecorder(t *testing.T, tc *testCoordinator, token string, rec *recorder) *pendingClient {
	t.Helper()
	c := coordclient.New(coordclient.Config{
		URL: tc.URL(), Token: token, Fingerprint: tc.Fingerprint(), Logger: testLogger(t), Software: "test",
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
	}, rec)
	return &pendingClient{Client: c, t: t}
}

func (pc *pendingClient) start() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pc.Run(ctx) }()
	pc.t.Cleanup(func() {
		cancel()
		<-done
	})
}

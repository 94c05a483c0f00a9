package metrics

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape fetches the registry through its HTTP handler, as Prometheus does,
// and parses the text exposition format.
func scrape(t *testing.T, r *Registry) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: status %s", resp.Status)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("GET /metrics: content type %q, want text/plain", ct)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse exposition: %v", err)
	}
	return families
}

// value returns the value of the series of family name whose labels are
// exactly labels, failing the test when there is no such series.
func value(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	f, ok := families[name]
	if !ok {
		t.Fatalf("no metric family %s", name)
	}
	for _, m := range f.GetMetric() {
		if !labelsEqual(m.GetLabel(), labels) {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}

func hasSeries(families map[string]*dto.MetricFamily, name string, labels map[string]string) bool {
	for _, m := range families[name].GetMetric() {
		if labelsEqual(m.GetLabel(), labels) {
			return true
		}
	}
	return false
}

func labelsEqual(got []*dto.LabelPair, want map[string]string) bool {
	if len(got) != len(want) {
		return false
	}
	for _, l := range got {
		if v, ok := want[l.GetName()]; !ok || v != l.GetValue() {
			return false
		}
	}
	return true
}

func TestAgentSeriesExistBeforeFirstEvent(t *testing.T) {
	r := NewRegistry()
	NewAgent(r)
	f := scrape(t, r)
	for _, k := range []string{"ssh", "port_forward_tcp", "port_forward_udp"} {
		for _, name := range []string{"agent_connections_total", "agent_connections_active", "agent_sessions_total", "agent_sessions_active"} {
			if v := value(t, f, name, map[string]string{"kind": k}); v != 0 {
				t.Errorf("%s{kind=%q} = %v before any event, want 0", name, k, v)
			}
		}
		for _, d := range []string{"in", "out"} {
			value(t, f, "agent_bytes_total", map[string]string{"kind": k, "direction": d})
		}
	}
	if v := value(t, f, "agent_netcheck_status", map[string]string{}); v != 0 {
		t.Errorf("agent_netcheck_status = %v at start, want 0", v)
	}
	// The runtime collectors are there too.
	if _, ok := f["go_goroutines"]; !ok {
		t.Error("go_goroutines missing: the Go collector is not registered")
	}
	if _, ok := f["process_open_fds"]; !ok {
		t.Error("process_open_fds missing: the process collector is not registered")
	}
}

func TestAgentConnectionsSessionsAndBytes(t *testing.T) {
	r := NewRegistry()
	a := NewAgent(r)

	closeSSH := a.ConnectionOpened(KindSSH)
	closeTCP1 := a.ConnectionOpened(KindPortForwardTCP)
	a.ConnectionOpened(KindPortForwardTCP)
	endShell := a.SessionStarted(KindSSH)
	a.SessionStarted(KindPortForwardUDP)
	a.AddBytes(KindSSH, DirectionIn, 100)
	a.AddBytes(KindSSH, DirectionIn, 23)
	a.AddBytes(KindPortForwardTCP, DirectionOut, 4096)
	a.AddBytes(KindPortForwardTCP, DirectionOut, -1) // a failed write: ignored
	closeTCP1()
	closeTCP1() // a second close must not drive the gauge down again
	endShell()

	f := scrape(t, r)
	checks := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"agent_connections_total", map[string]string{"kind": "ssh"}, 1},
		{"agent_connections_active", map[string]string{"kind": "ssh"}, 1},
		{"agent_connections_total", map[string]string{"kind": "port_forward_tcp"}, 2},
		{"agent_connections_active", map[string]string{"kind": "port_forward_tcp"}, 1},
		{"agent_sessions_total", map[string]string{"kind": "ssh"}, 1},
		{"agent_sessions_active", map[string]string{"kind": "ssh"}, 0},
		{"agent_sessions_active", map[string]string{"kind": "port_forward_udp"}, 1},
		{"agent_bytes_total", map[string]string{"kind": "ssh", "direction": "in"}, 123},
		{"agent_bytes_total", map[string]string{"kind": "port_forward_tcp", "direction": "out"}, 4096},
		{"agent_bytes_total", map[string]string{"kind": "ssh", "direction": "out"}, 0},
	}
	for _, c := range checks {
		if got := value(t, f, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	closeSSH()
	if got := value(t, scrape(t, r), "agent_connections_active", map[string]string{"kind": "ssh"}); got != 0 {
		t.Errorf("agent_connections_active{kind=ssh} after close = %v, want 0", got)
	}
}

func TestAgentPeerPathAndNetcheck(t *testing.T) {
	r := NewRegistry()
	a := NewAgent(r)
	a.SetPeerPath("laptop-1", PathDERP)
	a.SetPeerPath("laptop-2", PathDERP)
	a.SetPeerPath("laptop-1", PathDirect) // hole punching succeeded
	a.SetNetcheckStatus(NetcheckFailing)

	f := scrape(t, r)
	for _, c := range []struct {
		peer, path string
		want       float64
	}{
		{"laptop-1", "direct", 1}, {"laptop-1", "derp", 0},
		{"laptop-2", "direct", 0}, {"laptop-2", "derp", 1},
	} {
		if got := value(t, f, "agent_peer_path", map[string]string{"peer": c.peer, "path": c.path}); got != c.want {
			t.Errorf("agent_peer_path{peer=%s,path=%s} = %v, want %v", c.peer, c.path, got, c.want)
		}
	}
	if got := value(t, f, "agent_netcheck_status", map[string]string{}); got != 2 {
		t.Errorf("agent_netcheck_status = %v, want 2", got)
	}

	a.RemovePeer("laptop-1")
	f = scrape(t, r)
	for _, path := range []string{"direct", "derp"} {
		if hasSeries(f, "agent_peer_path", map[string]string{"peer": "laptop-1", "path": path}) {
			t.Errorf("agent_peer_path{peer=laptop-1,path=%s} still exported after RemovePeer", path)
		}
	}
	if got := value(t, f, "agent_peer_path", map[string]string{"peer": "laptop-2", "path": "derp"}); got != 1 {
		t.Errorf("RemovePeer(laptop-1) touched laptop-2: derp = %v", got)
	}
}

func TestCoordinatorMetrics(t *testing.T) {
	r := NewRegistry()
	c := NewCoordinator(r)
	leaveAgent := c.PeerConnected(RoleAgent)
	c.PeerConnected(RoleAgent)
	c.PeerConnected(RoleClient)
	leaveAgent()
	leaveAgent()
	c.SetTunnels(3)
	c.ObserveFanout(200 * time.Microsecond)
	c.ObserveFanout(2 * time.Millisecond)
	c.ObserveFanout(5 * time.Second) // past the last bucket: counted in +Inf only
	c.MessageRejected(RejectUnauthorized)
	c.MessageRejected(RejectUnauthorized)
	c.MessageRejected(RejectTooLarge)

	f := scrape(t, r)
	for _, ch := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"coordinator_peers_connected", map[string]string{"role": "agent"}, 1},
		{"coordinator_peers_connected", map[string]string{"role": "client"}, 1},
		{"coordinator_tunnels", map[string]string{}, 3},
		{"coordinator_node_update_fanout_seconds", map[string]string{}, 3},
		{"coordinator_messages_rejected_total", map[string]string{"reason": "unauthorized"}, 2},
		{"coordinator_messages_rejected_total", map[string]string{"reason": "too_large"}, 1},
		{"coordinator_messages_rejected_total", map[string]string{"reason": "malformed"}, 0},
	} {
		if got := value(t, f, ch.name, ch.labels); got != ch.want {
			t.Errorf("%s%v = %v, want %v", ch.name, ch.labels, got, ch.want)
		}
	}
	h := f["coordinator_node_update_fanout_seconds"].GetMetric()[0].GetHistogram()
	if got, want := h.GetSampleSum(), 5.0022; got < want-1e-9 || got > want+1e-9 {
		t.Errorf("fan-out histogram sum = %v, want %v", got, want)
	}
	// Buckets are 50µs·4^n: 200µs falls at or under 800µs, 2ms at or under 3.2ms.
	cumulative := map[float64]uint64{}
	for _, b := range h.GetBucket() {
		cumulative[b.GetUpperBound()] = b.GetCumulativeCount()
	}
	for _, want := range []struct {
		le    float64
		count uint64
	}{{50e-6, 0}, {800e-6, 1}, {3200e-6, 2}} {
		found := false
		for le, n := range cumulative {
			if le > want.le*0.999 && le < want.le*1.001 {
				found = true
				if n != want.count {
					t.Errorf("fan-out bucket le=%g holds %d observations, want %d", le, n, want.count)
				}
			}
		}
		if !found {
			t.Errorf("fan-out histogram has no bucket le=%g", want.le)
		}
	}
}

func TestOneRegistryPerProcessHoldsBothSets(t *testing.T) {
	// `agent dev` runs an agent and a coordinator in one process.
	r := NewRegistry()
	NewAgent(r)
	NewCoordinator(r)
	f := scrape(t, r)
	for _, name := range []string{"agent_connections_total", "coordinator_peers_connected"} {
		if _, ok := f[name]; !ok {
			t.Errorf("%s missing from a registry holding both sets", name)
		}
	}
}

func TestSecondAgentSetOnOneRegistryPanics(t *testing.T) {
	r := NewRegistry()
	NewAgent(r)
	defer func() {
		if recover() == nil {
			t.Error("NewAgent twice on one registry did not panic")
		}
	}()
	NewAgent(r)
}

func TestSeparateRegistriesAreIndependent(t *testing.T) {
	r1, r2 := NewRegistry(), NewRegistry()
	a1, a2 := NewAgent(r1), NewAgent(r2)
	a1.ConnectionOpened(KindSSH)
	a2.SetNetcheckStatus(NetcheckWarning)
	if got := value(t, scrape(t, r2), "agent_connections_total", map[string]string{"kind": "ssh"}); got != 0 {
		t.Errorf("a connection on registry 1 shows on registry 2: %v", got)
	}
	if got := value(t, scrape(t, r1), "agent_netcheck_status", map[string]string{}); got != 0 {
		t.Errorf("a netcheck status on registry 2 shows on registry 1: %v", got)
	}
}

func TestNilSetsDoNothing(t *testing.T) {
	var a *Agent
	var c *Coordinator
	a.ConnectionOpened(KindSSH)()
	a.SessionStarted(KindSSH)()
	a.AddBytes(KindSSH, DirectionIn, 1)
	a.SetPeerPath("p", PathDirect)
	a.RemovePeer("p")
	a.SetNetcheckStatus(NetcheckFailing)
	c.PeerConnected(RoleAgent)()
	c.SetTunnels(1)
	c.ObserveFanout(time.Second)
	c.MessageRejected(RejectMalformed)
}

func TestAgentSSHSessionsAndCountedBytes(t *testing.T) {
	r := NewRegistry()
	a := NewAgent(r)
	endShell := a.SSHSessionStarted(SSHShell)
	a.SSHSessionStarted(SSHPortForward)
	endShell()
	endShell() // a second end must not drive the gauges down again

	server, client := net.Pipe()
	defer client.Close()
	counted := a.CountBytes(KindSSH, server)
	go func() {
		_, _ = client.Write([]byte("hello"))
		_, _ = io.ReadFull(client, make([]byte, 3))
	}()
	if _, err := io.ReadFull(counted, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	if _, err := counted.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	// Before the connection closes: bytes count as they flow.
	f := scrape(t, r)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"agent_ssh_sessions_total", map[string]string{"type": "shell"}, 1},
		{"agent_ssh_sessions_active", map[string]string{"type": "shell"}, 0},
		{"agent_ssh_sessions_active", map[string]string{"type": "port_forward"}, 1},
		{"agent_ssh_sessions_total", map[string]string{"type": "sftp"}, 0},
		{"agent_sessions_total", map[string]string{"kind": "ssh"}, 2},
		{"agent_sessions_active", map[string]string{"kind": "ssh"}, 1},
		{"agent_bytes_total", map[string]string{"kind": "ssh", "direction": "in"}, 5},
		{"agent_bytes_total", map[string]string{"kind": "ssh", "direction": "out"}, 3},
	} {
		if got := value(t, f, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	counted.Close()

	var none *Agent
	if c := none.CountBytes(KindSSH, client); c != client {
		t.Error("CountBytes on a nil Agent must return the connection itself")
	}
	none.SSHSessionStarted(SSHExec)()
}

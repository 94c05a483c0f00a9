package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Kind is the service a connection or session belongs to.
type Kind string

// The kinds the agent serves on its tailnet address.
const (
	KindSSH            Kind = "ssh"
	KindPortForwardTCP Kind = "port_forward_tcp"
	KindPortForwardUDP Kind = "port_forward_udp"
)

// Direction says which way bytes flowed, seen from the workspace.
type Direction string

const (
	// DirectionIn is traffic from the remote peer into the workspace.
	DirectionIn Direction = "in"
	// DirectionOut is traffic from the workspace to the remote peer.
	DirectionOut Direction = "out"
)

// Path is how packets to a peer currently travel.
type Path string

const (
	PathDirect Path = "direct"
	PathDERP   Path = "derp"
)

// NetcheckStatus is the overall verdict of the agent's network self-check.
// Its numeric value is the gauge's value, so alerts can say "> 0".
type NetcheckStatus int

const (
	NetcheckOK      NetcheckStatus = 0 // netcheck "ok"
	NetcheckWarning NetcheckStatus = 1 // netcheck "degraded"
	NetcheckFailing NetcheckStatus = 2 // netcheck "broken"
)

// Agent is the metric set of `agent run`.
//
// Series (all prefixed agent_):
//
//	connections_total{kind}          counter  connections accepted on the tailnet
//	connections_active{kind}         gauge    connections open now
//	sessions_total{kind}             counter  sessions started (SSH shell/exec/subsystem; one per forwarded flow)
//	sessions_active{kind}            gauge    sessions running now
//	bytes_total{kind,direction}      counter  payload bytes relayed, direction in|out
//	peer_path{peer,path}             gauge    1 for the path a peer uses now (direct|derp), 0 for the other
//	netcheck_status                  gauge    0 ok, 1 degraded, 2 broken
type Agent struct {
	connections       *prometheus.CounterVec
	connectionsActive *prometheus.GaugeVec
	sessions          *prometheus.CounterVec
	sessionsActive    *prometheus.GaugeVec
	bytes             *prometheus.CounterVec
	peerPath          *prometheus.GaugeVec
	netcheck          prometheus.Gauge
}

// NewAgent creates the agent's metric set on r. The kind and direction
// series start at zero so that dashboards show them before the first
// connection. It panics if an Agent set is already registered on r.
func NewAgent(r *Registry) *Agent {
	a := &Agent{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "agent", Name: "connections_total",
			Help: "Connections accepted on the tailnet, by service kind.",
		}, []string{"kind"}),
		connectionsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "agent", Name: "connections_active",
			Help: "Connections open now, by service kind.",
		}, []string{"kind"}),
		sessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "agent", Name: "sessions_total",
			Help: "Sessions started (SSH shell, exec or subsystem; one per forwarded flow), by service kind.",
		}, []string{"kind"}),
		sessionsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "agent", Name: "sessions_active",
			Help: "Sessions running now, by service kind.",
		}, []string{"kind"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "agent", Name: "bytes_total",
			Help: "Payload bytes relayed, by service kind and direction (in: peer to workspace, out: workspace to peer).",
		}, []string{"kind", "direction"}),
		peerPath: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "agent", Name: "peer_path",
			Help: "1 for the path packets to a peer use now (direct or derp), 0 for the other.",
		}, []string{"peer", "path"}),
		netcheck: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "agent", Name: "netcheck_status",
			Help: "Verdict of the last network self-check: 0 ok, 1 degraded, 2 broken.",
		}),
	}
	r.mustRegister("agent", a.connections, a.connectionsActive, a.sessions, a.sessionsActive, a.bytes, a.peerPath, a.netcheck)
	for _, k := range []Kind{KindSSH, KindPortForwardTCP, KindPortForwardUDP} {
		a.connections.WithLabelValues(string(k))
		a.connectionsActive.WithLabelValues(string(k))
		a.sessions.WithLabelValues(string(k))
		a.sessionsActive.WithLabelValues(string(k))
		a.bytes.WithLabelValues(string(k), string(DirectionIn))
		a.bytes.WithLabelValues(string(k), string(DirectionOut))
	}
	return a
}

// ConnectionOpened counts a new connection of the given kind and returns
// the function to call when it closes. Calling that function more than once
// has no further effect.
func (a *Agent) ConnectionOpened(kind Kind) (closed func()) {
	if a == nil {
		return func() {}
	}
	a.connections.WithLabelValues(string(kind)).Inc()
	return track(a.connectionsActive.WithLabelValues(string(kind)))
}

// SessionStarted counts a new session of the given kind and returns the
// function to call when it ends. Calling that function more than once has
// no further effect.
func (a *Agent) SessionStarted(kind Kind) (ended func()) {
	if a == nil {
		return func() {}
	}
	a.sessions.WithLabelValues(string(kind)).Inc()
	return track(a.sessionsActive.WithLabelValues(string(kind)))
}

// AddBytes counts n payload bytes relayed for a service. Negative or zero n
// is ignored, so a caller can pass the result of a short write as is.
func (a *Agent) AddBytes(kind Kind, dir Direction, n int64) {
	if a == nil || n <= 0 {
		return
	}
	a.bytes.WithLabelValues(string(kind), string(dir)).Add(float64(n))
}

// SetPeerPath records the path packets to peer use now. peer should be a
// stable, bounded identifier (the peer's node ID or name), never an address.
func (a *Agent) SetPeerPath(peer string, path Path) {
	if a == nil {
		return
	}
	for _, p := range []Path{PathDirect, PathDERP} {
		v := 0.0
		if p == path {
			v = 1
		}
		a.peerPath.WithLabelValues(peer, string(p)).Set(v)
	}
}

// RemovePeer drops a peer's path series once the agent forgets the peer, so
// the number of series follows the number of peers.
func (a *Agent) RemovePeer(peer string) {
	if a == nil {
		return
	}
	a.peerPath.DeletePartialMatch(prometheus.Labels{"peer": peer})
}

// SetNetcheckStatus records the verdict of the last network self-check.
func (a *Agent) SetNetcheckStatus(s NetcheckStatus) {
	if a == nil {
		return
	}
	a.netcheck.Set(float64(s))
}

// track raises g and returns an idempotent function that lowers it again.
func track(g prometheus.Gauge) func() {
	g.Inc()
	var once sync.Once
	return func() { once.Do(g.Dec) }
}

package metrics

import (
	"net"
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

// SSHSession is the kind of work an SSH channel does, for the ssh_sessions
// series. Every one of them is also an agent_sessions_total{kind="ssh"}.
type SSHSession string

// The SSH session types the workspace's SSH server serves.
const (
	SSHShell        SSHSession = "shell"         // interactive login shell
	SSHExec         SSHSession = "exec"          // a command (scp, rsync, git, ssh host cmd)
	SSHSFTP         SSHSession = "sftp"          // the sftp subsystem (sftp, scp in its default mode)
	SSHPortForward  SSHSession = "port_forward"  // one forwarded connection of ssh -L or -R (TCP or Unix socket)
	SSHAgentForward SSHSession = "agent_forward" // one connection to the client's ssh-agent (ssh -A)
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
//	sessions_total{kind}             counter  sessions started (ssh: every SSH session and forwarded channel; one per forwarded flow)
//	sessions_active{kind}            gauge    sessions running now
//	ssh_sessions_total{type}         counter  SSH sessions started by type: shell, exec, sftp, port_forward, agent_forward
//	ssh_sessions_active{type}        gauge    SSH sessions running now, by type
//	bytes_total{kind,direction}      counter  bytes carried, direction in|out (ssh: the SSH connection's bytes, as sent on the tailnet)
//	peer_path{peer,path}             gauge    1 for the path a peer uses now (direct|derp), 0 for the other
//	netcheck_status                  gauge    0 ok, 1 degraded, 2 broken
type Agent struct {
	connections       *prometheus.CounterVec
	connectionsActive *prometheus.GaugeVec
	sessions          *prometheus.CounterVec
	sessionsActive    *prometheus.GaugeVec
	sshSessions       *prometheus.CounterVec
	sshSessionsActive *prometheus.GaugeVec
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
			Help: "Sessions started, by service kind (ssh: every SSH session and forwarded channel, split by type in agent_ssh_sessions_total; port forwarding: one per flow).",
		}, []string{"kind"}),
		sessionsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "agent", Name: "sessions_active",
			Help: "Sessions running now, by service kind.",
		}, []string{"kind"}),
		sshSessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "agent", Name: "ssh_sessions_total",
			Help: "SSH sessions started, by type (shell, exec, sftp, port_forward, agent_forward).",
		}, []string{"type"}),
		sshSessionsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "agent", Name: "ssh_sessions_active",
			Help: "SSH sessions running now, by type.",
		}, []string{"type"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "agent", Name: "bytes_total",
			Help: "Bytes carried, by service kind and direction (in: peer to workspace, out: workspace to peer); for ssh, the SSH connection's bytes.",
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
	r.mustRegister("agent", a.connections, a.connectionsActive, a.sessions, a.sessionsActive,
		a.sshSessions, a.sshSessionsActive, a.bytes, a.peerPath, a.netcheck)
	for _, k := range []Kind{KindSSH, KindPortForwardTCP, KindPortForwardUDP} {
		a.connections.WithLabelValues(string(k))
		a.connectionsActive.WithLabelValues(string(k))
		a.sessions.WithLabelValues(string(k))
		a.sessionsActive.WithLabelValues(string(k))
		a.bytes.WithLabelValues(string(k), string(DirectionIn))
		a.bytes.WithLabelValues(string(k), string(DirectionOut))
	}
	for _, t := range []SSHSession{SSHShell, SSHExec, SSHSFTP, SSHPortForward, SSHAgentForward} {
		a.sshSessions.WithLabelValues(string(t))
		a.sshSessionsActive.WithLabelValues(string(t))
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

// SSHSessionStarted counts a new SSH session of the given type, in the
// ssh_sessions series and in sessions{kind="ssh"}, and returns the function
// to call when it ends. Calling that function more than once has no further
// effect.
func (a *Agent) SSHSessionStarted(t SSHSession) (ended func()) {
	if a == nil {
		return func() {}
	}
	a.sshSessions.WithLabelValues(string(t)).Inc()
	endType := track(a.sshSessionsActive.WithLabelValues(string(t)))
	endKind := a.SessionStarted(KindSSH)
	var once sync.Once
	return func() { once.Do(func() { endType(); endKind() }) }
}

// CountBytes wraps c so that every byte read from it counts as kind/in and
// every byte written as kind/out, as it flows: a long transfer shows up while
// it runs, not only when the connection closes. The wrapper keeps
// CloseWrite working. On a nil Agent it returns c itself.
func (a *Agent) CountBytes(kind Kind, c net.Conn) net.Conn {
	if a == nil {
		return c
	}
	return &countingConn{
		Conn: c,
		in:   a.bytes.WithLabelValues(string(kind), string(DirectionIn)),
		out:  a.bytes.WithLabelValues(string(kind), string(DirectionOut)),
	}
}

type countingConn struct {
	net.Conn
	in, out prometheus.Counter
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.in.Add(float64(n))
	}
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.out.Add(float64(n))
	}
	return n, err
}

// CloseWrite half-closes when the wrapped connection can, and closes it
// otherwise, so that the peer sees EOF either way.
func (c *countingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
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

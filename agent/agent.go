// Package agent is the workspace agent's lifecycle: it registers with the
// coordinator, brings up the userspace tailnet, mounts the agent's services
// on it (SSH on port 1, the agent API on port 2, every other port forwarded to
// the workspace's localhost), keeps the tailnet up while the coordinator is
// away, and shuts down promptly on request.
package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/agent/netcheck"
	"github.com/agentd/agent/agent/portforward"
	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/internal/tailjoin"
	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/speedtest"
	"github.com/agentd/agent/tailnet"
)

// lostPeerGrace is how long a client whose coordinator connection dropped
// ("lost", not "disconnected") stays configured. Its tunnel keeps working
// meanwhile: a laptop on a flaky network, or a coordinator restart, must not
// cut an established SSH session.
const lostPeerGrace = protocol.LostGrace

// maxIdleLostPeers caps the lost clients without a connection kept for the
// grace (tailjoin.Options.MaxIdleLost). Each installed peer holds WireGuard
// queues and two goroutines; without a cap a script that kills its clients
// (timeout -s KILL around agent ssh) at the coordinator's per-token rate
// of 50 a second would pile up 45,000 for the 15 minutes. Clients with an
// open connection are always kept.
const maxIdleLostPeers = 256

// shutdownGrace bounds how long services get to finish on shutdown, so the
// agent exits well inside a container runtime's SIGTERM grace period.
const shutdownGrace = 3 * time.Second

// Options configure an agent.
type Options struct {
	Logger *slog.Logger
	// Coordinator is where to register and how to authenticate.
	Coordinator coordclient.Config
	// DataDir keeps state across restarts (the SSH host key).
	DataDir string
	// HealthAddr, if set, serves /healthz, /readyz and /metrics on a plain
	// local listener for container probes and scrapers.
	HealthAddr string
	// ListenPort is the UDP port for WireGuard; 0 picks one.
	ListenPort uint16
	// Shell, if set, is the shell SSH sessions run instead of the
	// account's login shell from the passwd database.
	Shell string
	// Registry receives the agent's metrics; nil creates one.
	Registry *metrics.Registry
	// DisableNetcheck turns off the continuous network self-check whose
	// verdict is published on the health endpoint and the agent API.
	DisableNetcheck bool
	// SessionIdleTimeout is how long a reconnecting terminal session keeps
	// running with no client attached; zero is sshd's default.
	SessionIdleTimeout time.Duration
	// DeadPeerTimeout bounds how long a peer's forwarded and SSH
	// connections outlive the peer once it stops answering without
	// closing them (killed, or its network gone); zero is
	// DefaultDeadPeerTimeout.
	DeadPeerTimeout time.Duration
}

// DefaultDeadPeerTimeout is Options.DeadPeerTimeout's default: TCP
// keepalive after 30 s of silence, 3 probes 10 s apart.
const DefaultDeadPeerTimeout = tailnet.DefaultDeadPeerTimeout

// Agent is a running workspace agent.
type Agent struct {
	opts    Options
	log     *slog.Logger
	metrics *metrics.Agent
	reg     *metrics.Registry

	// join is the coordination connection, the tailnet node and the
	// peers introduced to it.
	join *tailjoin.Joiner

	mu        sync.Mutex
	hello     protocol.Hello
	connected bool
	lastErr   error
	network   *netcheck.Brief

	// flows are the peers' open connections, ended when access ends.
	flows *flows
	// signer is the SSH host key, the identity the coordinator pins.
	signer gossh.Signer
}

// New validates the options and prepares an agent; Run starts it.
func New(opts Options) (*Agent, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.DataDir == "" {
		return nil, errors.New("no data directory: pass --data-dir (or AGENT_DATA_DIR) so the SSH host key survives restarts")
	}
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	if opts.Registry == nil {
		opts.Registry = metrics.NewRegistry()
	}
	a := &Agent{
		opts:    opts,
		log:     opts.Logger,
		reg:     opts.Registry,
		metrics: metrics.NewAgent(opts.Registry),
		flows:   newFlows(),
	}
	cfg := opts.Coordinator
	cfg.Role = protocol.RoleAgent
	cfg.Identity = a.identity
	a.join = tailjoin.New(tailjoin.Options{
		Logger:      opts.Logger,
		Coordinator: cfg,
		Tailnet:     tailnet.Options{ListenPort: opts.ListenPort, AcceptInbound: true, DeadPeerTimeout: opts.DeadPeerTimeout},
		LostGrace:   lostPeerGrace,
		MaxIdleLost: maxIdleLostPeers,
		CloseWait:   shutdownGrace,
		Hooks: tailjoin.Hooks{
			Hello:        a.onHello,
			Peer:         a.onPeer,
			Gone:         a.onPeerGone,
			Removed:      func(p protocol.Peer) { a.metrics.RemovePeer(p.Name) },
			Busy:         func(p protocol.Peer) bool { return a.flows.holds(addrsOf(p)...) },
			Error:        a.onError,
			Disconnected: a.onDisconnected,
		},
	})
	return a, nil
}

// Run serves until ctx is done or the coordinator refuses the agent for good
// (a wrong, expired or revoked token). Shutdown takes at most a few seconds.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	if a.opts.HealthAddr != "" {
		stop, err := a.serveHealth(a.opts.HealthAddr)
		if err != nil {
			return err
		}
		defer stop()
	}
	if stop, err := a.serveStatusSocket(); err != nil {
		// Health and service go on; only the owner's detailed view is lost.
		a.log.Warn("no owner-only status socket", "err", err)
	} else {
		defer stop()
	}

	// The SSH host key is the workspace's identity: the coordinator pins it
	// at first registration, so it is loaded before connecting.
	ssh, err := sshd.New(sshd.Options{
		Logger:       a.log.With("component", "ssh"),
		HostKeyPath:  a.hostKeyPath(),
		PeerIdentity: a.peerIdentity,
		Metrics:      a.metrics,
		Shell:        a.opts.Shell,

		SessionIdleTimeout: a.opts.SessionIdleTimeout,
	})
	if err != nil {
		return fmt.Errorf("start the SSH server: %w", err)
	}
	signer, err := loadSigner(a.hostKeyPath(), ssh.HostKey())
	if err != nil {
		ssh.Close()
		return err
	}
	a.mu.Lock()
	a.signer = signer
	a.mu.Unlock()

	a.join.Start(ctx)
	a.log.Info("waiting for the coordinator to accept this agent", "url", a.opts.Coordinator.URL)
	var svc *services
	conn, hello, err := a.join.Up(ctx, func(conn *tailnet.Conn, _ protocol.Hello) error {
		var err error
		svc, err = a.startServices(ctx, conn, ssh)
		return err
	})
	if err != nil {
		ssh.Close()
		a.join.Close()
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	a.log.Info("agent is up", "name", hello.Name, "addresses", hello.Addresses)

	go a.trackPaths(ctx, conn)
	if !a.opts.DisableNetcheck {
		go a.watchNetwork(ctx, hello)
	}

	var runErr error
	select {
	case <-ctx.Done():
	case <-a.join.Ended():
		// It also ends when ctx does; only a refusal is an error.
		if ctx.Err() == nil {
			runErr = fmt.Errorf("coordinator at %s: %w", a.opts.Coordinator.URL, a.join.Err())
			cancel()
		}
	}

	a.log.Info("shutting down")
	svc.close()
	// Closes the tailnet and waits (at most shutdownGrace) for the
	// goodbye to the coordinator.
	a.join.Close()
	return runErr
}

// services are what the agent serves on the tailnet.
type services struct {
	ssh     *sshd.Server
	api     *http.Server
	forward *portforward.Forwarder
	wg      sync.WaitGroup
}

func (s *services) close() {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	s.api.Shutdown(ctx)
	s.ssh.Close()
	s.forward.Close()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

func (a *Agent) startServices(ctx context.Context, conn *tailnet.Conn, ssh *sshd.Server) (*services, error) {
	sshLn, err := conn.Listen(protocol.PortSSH)
	if err != nil {
		ssh.Close()
		return nil, fmt.Errorf("listen on tailnet port %d for SSH: %w", protocol.PortSSH, err)
	}
	apiLn, err := conn.Listen(protocol.PortAPI)
	if err != nil {
		ssh.Close()
		sshLn.Close()
		return nil, fmt.Errorf("listen on tailnet port %d for the agent API: %w", protocol.PortAPI, err)
	}
	speedLn, err := conn.Listen(protocol.PortSpeedtest)
	if err != nil {
		ssh.Close()
		sshLn.Close()
		apiLn.Close()
		return nil, fmt.Errorf("listen on tailnet port %d for the speed test: %w", protocol.PortSpeedtest, err)
	}
	fwd := portforward.New(portforward.Options{Logger: a.log.With("component", "port-forward")})
	conn.SetTCPFallback(a.flows.handler(a.counted(metrics.KindPortForwardTCP, fwd.TCP)))
	conn.SetUDPFallback(a.flows.handler(a.counted(metrics.KindPortForwardUDP, fwd.UDP)))
	sshLn = a.flows.listener(sshLn)

	s := &services{ssh: ssh, forward: fwd, api: &http.Server{
		Handler:           a.apiHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    64 << 10,
	}}
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		if err := speedtest.Serve(ctx, speedLn); err != nil && ctx.Err() == nil {
			a.log.Error("speed test server stopped", "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		if err := ssh.Serve(ctx, sshLn); err != nil && ctx.Err() == nil {
			a.log.Error("SSH server stopped", "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		if err := s.api.Serve(apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("agent API stopped", "err", err)
		}
	}()
	return s, nil
}

func (a *Agent) hostKeyPath() string { return filepath.Join(a.opts.DataDir, "ssh_host_ed25519_key") }

// loadSigner reads the SSH server's host key for signing the coordinator's
// identity challenge, checking it is the key the server serves.
func loadSigner(path string, served gossh.PublicKey) (gossh.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read the SSH host key: %w", err)
	}
	signer, err := gossh.ParsePrivateKey(data)
	if err != nil {
		return nil, fmt.Errorf("read the SSH host key %s: %w", path, err)
	}
	if !bytes.Equal(signer.PublicKey().Marshal(), served.Marshal()) {
		return nil, fmt.Errorf("the SSH host key %s changed while the agent started; start it again", path)
	}
	return signer, nil
}

// identity proves to the coordinator that this agent holds the workspace's
// SSH host key, by signing the connection's challenge.
func (a *Agent) identity(challenge string) (*protocol.AgentIdentity, error) {
	a.mu.Lock()
	signer := a.signer
	a.mu.Unlock()
	if signer == nil {
		return nil, errors.New("no SSH host key loaded")
	}
	sig, err := signer.Sign(rand.Reader, protocol.IdentityMessage(challenge))
	if err != nil {
		return nil, fmt.Errorf("signing with the SSH host key: %w", err)
	}
	return &protocol.AgentIdentity{
		HostKey:   strings.TrimSpace(string(gossh.MarshalAuthorizedKey(signer.PublicKey()))),
		Signature: base64.StdEncoding.EncodeToString(gossh.Marshal(sig)),
	}, nil
}

// peerIdentity names the coordinator user behind a tailnet address, for the
// SSH server's session logs.
func (a *Agent) peerIdentity(remote net.Addr) string {
	if p, ok := a.join.PeerByAddr(addrOf(remote)); ok {
		return p.User
	}
	return ""
}

// trackPaths keeps the per-peer path gauge current.
func (a *Agent) trackPaths(ctx context.Context, conn *tailnet.Conn) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, st := range conn.PeerStatus() {
			name := fmt.Sprint(st.ID)
			if p, ok := a.join.Peer(st.ID); ok {
				name = p.Name
			}
			switch st.Path.Kind {
			case tailnet.PathDirect:
				a.metrics.SetPeerPath(name, metrics.PathDirect)
			case tailnet.PathRelayed:
				a.metrics.SetPeerPath(name, metrics.PathDERP)
			}
		}
	}
}

// watchNetwork runs netcheck continuously: netlink events plus a quick
// active probe every second, a full report every minute. Inside a pod a
// host-side teardown leaves every local signal looking fine; only the
// probe notices.
func (a *Agent) watchNetwork(ctx context.Context, hello protocol.Hello) {
	var last netcheck.Status
	var reported *protocol.NetworkVerdict
	err := netcheck.Watch(ctx, netcheck.Options{
		Logger:         a.log.With("component", "netcheck"),
		CoordinatorURL: a.opts.Coordinator.URL,
		Fingerprint:    a.opts.Coordinator.Fingerprint,
		DERPMap:        hello.DERPMap,
	}, netcheck.WatchOptions{}, func(r *netcheck.Report) {
		b := r.Brief()
		a.mu.Lock()
		a.network = &b
		a.mu.Unlock()
		switch b.Status {
		case netcheck.StatusOK:
			a.metrics.SetNetcheckStatus(metrics.NetcheckOK)
		case netcheck.StatusDegraded:
			a.metrics.SetNetcheckStatus(metrics.NetcheckWarning)
		case netcheck.StatusBroken:
			a.metrics.SetNetcheckStatus(metrics.NetcheckFailing)
		}
		if b.Status != last {
			lvl := slog.LevelInfo
			if b.Status == netcheck.StatusBroken {
				lvl = slog.LevelError
			} else if b.Status == netcheck.StatusDegraded {
				lvl = slog.LevelWarn
			}
			a.log.Log(ctx, lvl, "workspace network", "status", b.Status, "summary", b.Summary, "codes", b.Codes)
			last = b.Status
		}
		reported = a.reportNetwork(b, reported)
	})
	if err != nil && ctx.Err() == nil {
		a.log.Warn("the network self-check stopped; run `agent netcheck` by hand", "err", err)
	}
}

// reportNetwork tells the coordinator the verdict b when it differs from
// the one reported before (prev), so that a person connecting to this
// workspace learns why it cannot be reached. The full report every minute
// repeats an unchanged verdict; that is not sent again.
func (a *Agent) reportNetwork(b netcheck.Brief, prev *protocol.NetworkVerdict) *protocol.NetworkVerdict {
	v := protocol.NetworkVerdict{Status: protocol.NetworkHealth(b.Status), Summary: b.Summary, Codes: b.Codes, At: b.At, Since: b.At}.Fit()
	if prev != nil {
		if prev.Status == v.Status {
			v.Since = prev.Since
		}
		if prev.Status == v.Status && prev.Summary == v.Summary && slices.Equal(prev.Codes, v.Codes) {
			return prev
		}
	}
	a.join.Coordinator().ReportNetwork(v)
	return &v
}

// onHello records what the coordinator assigned, for the status.
func (a *Agent) onHello(hello protocol.Hello) {
	a.mu.Lock()
	a.hello = hello
	a.connected = true
	a.lastErr = nil
	a.mu.Unlock()
}

func (a *Agent) onPeer(p protocol.Peer) {
	a.log.Info("peer introduced", "peer", p.Name, "user", p.User, "role", p.Role, "id", p.Node.ID)
}

// onPeerGone ends a peer's connections when it left the tailnet for good
// (revoked, or gone after saying goodbye); a lost peer keeps its tunnel.
func (a *Agent) onPeerGone(p protocol.Peer, g protocol.PeerGone) {
	if g.Reason == protocol.GoneLost {
		a.log.Info("peer lost its coordinator connection; keeping its tunnel for now", "peer", p.Name, "grace", lostPeerGrace)
		return
	}
	// Its node is out of the tailnet, so nothing of its connections can
	// arrive any more: they end now, not when keepalives give up (a
	// client that said goodbye may have lost its last FIN under load).
	addrs := addrsOf(p)
	go func() {
		n := a.flows.closeFrom(addrs...)
		if g.Reason == protocol.GoneRevoked {
			a.log.Info("peer's access ended; hung up its connections", "peer", p.Name, "user", p.User, "connections", n)
			return
		}
		a.log.Info("peer gone", "peer", p.Name, "reason", g.Reason, "connections_hung_up", n)
	}()
}

// addrsOf is a peer's tailnet addresses.
func addrsOf(p protocol.Peer) []netip.Addr {
	var addrs []netip.Addr
	for _, pre := range p.Node.Addresses {
		addrs = append(addrs, pre.Addr())
	}
	return addrs
}

func (a *Agent) onDisconnected(err error) {
	a.mu.Lock()
	a.connected = false
	a.lastErr = err
	a.mu.Unlock()
	// Peers stay: established tunnels do not need the coordinator.
	a.log.Warn("lost the coordinator; established tunnels keep working while it reconnects", "err", err)
}

func (a *Agent) onError(e protocol.Error) {
	a.log.Warn("the coordinator reported a problem", "code", e.Code, "message", e.Message)
}

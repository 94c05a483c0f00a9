// Package coordinator is the meeting point of the tailnet: one HTTPS server
// that authenticates agents and users by token, relays node descriptions
// between the two ends of each tunnel a user is allowed to open, embeds a
// DERP relay admitting only registered node keys and a STUN server, and
// serves an admin API on a unix socket in its data directory.
package coordinator

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// Config configures a coordinator. Zero tuning values take defaults.
type Config struct {
	// DataDir holds the store, the TLS certificate and the admin socket.
	DataDir string
	// PostgresURL, if set, keeps the store in PostgreSQL instead of a file
	// in DataDir, shared by every replica given the same URL.
	PostgresURL string
	// Listen is the HTTPS (or, with InsecureHTTP, HTTP) address.
	Listen string
	// STUNAddr is the UDP address of the STUN server; "" disables STUN.
	STUNAddr string
	// STUNAddr2 is a second STUN address (another port, or another
	// address) on this host, "" for none. With two, a network check can
	// tell whether a NAT keeps one public port for every destination.
	STUNAddr2 string
	// InsecureHTTP serves plain HTTP instead of TLS. Tests only: tokens
	// cross the network in the clear.
	InsecureHTTP bool
	// AccessURL is the URL peers use to reach the coordinator, for
	// messages to admins; peers themselves are told the host they used.
	AccessURL string
	Logger    *slog.Logger

	// PeerQueueSize bounds the messages queued for one peer (default 256).
	PeerQueueSize int
	// PingInterval is how often idle connections are checked (default 15s).
	PingInterval time.Duration
	// HelloTimeout bounds the wait for a peer's hello (default 10s).
	HelloTimeout time.Duration
	// WriteTimeout bounds writing one message to a peer (default 10s).
	WriteTimeout time.Duration
	// ReauthInterval is how often sessions are re-checked against the store
	// for expired tokens (default 30s). Admin changes re-check at once.
	ReauthInterval time.Duration
	// MaxTunnels bounds the tunnels one client session may hold (default 256).
	MaxTunnels int
	// ReplicaHeartbeat is how often a replica sharing PostgreSQL says it
	// is alive (default 1s); ReplicaDeadAfter is how long a silent one
	// keeps its peers before the others mark them lost (default 5s).
	ReplicaHeartbeat time.Duration
	ReplicaDeadAfter time.Duration
	// MeshKey, shared by every replica (64 hex digits), meshes their DERP
	// relays; MeshURL is where the other replicas reach this one's relay
	// (default: the access URL, or one built from the listener).
	MeshKey string
	MeshURL string
	// TLSCertFile and TLSKeyFile, if set, are the certificate to serve
	// instead of the self-signed one in DataDir: replicas serving the same
	// one keep one fingerprint for clients.
	TLSCertFile string
	TLSKeyFile  string
	// Limits bounds sessions per token and per address, and HTTP idle and
	// header times (see EdgeLimits for the defaults).
	Limits EdgeLimits

	// Metrics, if set, receives the coordinator's metric set; serving it
	// (on a private address) is the caller's job.
	Metrics *metrics.Registry
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.PeerQueueSize <= 0 {
		c.PeerQueueSize = 256
	}
	if c.PingInterval <= 0 {
		c.PingInterval = 15 * time.Second
	}
	if c.HelloTimeout <= 0 {
		c.HelloTimeout = 10 * time.Second
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.ReauthInterval <= 0 {
		c.ReauthInterval = 30 * time.Second
	}
	if c.MaxTunnels <= 0 {
		c.MaxTunnels = 256
	}
	if c.ReplicaHeartbeat <= 0 {
		c.ReplicaHeartbeat = time.Second
	}
	if c.ReplicaDeadAfter <= 0 {
		c.ReplicaDeadAfter = 5 * time.Second
	}
	c.Limits.setDefaults()
}

// errShutdown ends sessions when the coordinator stops.
var errShutdown = errors.New("coordinator shutting down")

// Server is a coordinator with its listeners bound.
type Server struct {
	cfg         Config
	logger      *slog.Logger
	store       store.Backend
	core        *core
	derp        *tailnet.DERPServer
	stun        *tailnet.STUNServer
	stun2       *tailnet.STUNServer
	ln          net.Listener
	adminLn     net.Listener
	httpSrv     *http.Server
	adminSrv    *http.Server
	metrics     *metrics.Coordinator
	edge        *edge
	fingerprint string
	// tlsCfg and ticketSecret rotate the session ticket keys (tlstickets.go);
	// nil with --insecure-http.
	tlsCfg       *tls.Config
	ticketSecret []byte
	firstStart   bool
	resume       resumeSigner

	baseCtx        context.Context
	cancelSessions context.CancelCauseFunc
	sessions       sync.WaitGroup
	stopping       atomic.Bool
	ready          atomic.Bool
	reauthKick     chan struct{}
	// repl carries peers between replicas sharing PostgreSQL; nil with
	// the bbolt store.
	repl *replicator
}

// New opens the store, loads or creates the certificate and binds every
// listener, so that addresses are known before Serve. It fails with
// store.ErrLocked if another coordinator uses the same data directory.
func New(cfg Config) (s *Server, err error) {
	cfg.setDefaults()
	if cfg.DataDir == "" {
		return nil, errors.New("no data directory; pass --data-dir")
	}
	if cfg.AccessURL != "" {
		u, err := url.Parse(cfg.AccessURL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return nil, fmt.Errorf("access URL %q: want https://host[:port]", cfg.AccessURL)
		}
	}
	st, err := openStore(cfg)
	if err != nil {
		return nil, err
	}
	var m *metrics.Coordinator
	if cfg.Metrics != nil {
		m = metrics.NewCoordinator(cfg.Metrics)
	}
	s = &Server{cfg: cfg, logger: cfg.Logger, store: st, core: newCore(m), metrics: m, edge: newEdge(cfg.Limits, m), reauthKick: make(chan struct{}, 1)}
	srv := s // the named result is nil by the time an error return runs this
	defer func() {
		if err != nil {
			srv.closeAll()
		}
	}()
	// No request bounds reading the store at start; a database that does
	// not answer fails the start instead of hanging it.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	snap, err := st.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the store: %w", err)
	}
	s.firstStart = len(snap.Users) == 0
	secret, err := st.Secret(ctx, "resume")
	if err != nil {
		return nil, fmt.Errorf("reading the resume secret: %w", err)
	}
	s.resume = resumeSigner{secret: secret}

	var tlsCfg *tls.Config
	if !cfg.InsecureHTTP {
		var extra []string
		if cfg.AccessURL != "" {
			u, _ := url.Parse(cfg.AccessURL)
			extra = append(extra, u.Hostname())
		}
		cert, err := loadCert(cfg, extra)
		if err != nil {
			return nil, err
		}
		s.fingerprint = tailnet.CertFingerprint(cert.Certificate[0])
		// HTTP/1.1 only: the DERP relay upgrades the connection, which
		// HTTP/2 cannot do.
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
		if s.ticketSecret, err = ticketSecret(cert); err != nil {
			return nil, err
		}
		keys, err := ticketKeys(s.ticketSecret, time.Now())
		if err != nil {
			return nil, err
		}
		tlsCfg.SetSessionTicketKeys(keys)
		s.tlsCfg = tlsCfg
	}

	s.derp, err = tailnet.NewDERPServer(cfg.Logger.With("component", "derp"))
	if err != nil {
		return nil, err
	}
	s.derp.SetAdmitFunc(s.admitKey)
	if cfg.MeshKey != "" {
		if cfg.PostgresURL == "" {
			return nil, errors.New("--mesh-key meshes the relays of replicas sharing PostgreSQL; pass --postgres-url too")
		}
		if err := s.derp.SetMeshKey(cfg.MeshKey); err != nil {
			return nil, err
		}
	}
	s.core.onRevoke = func(k string) { s.derp.ClosePeer(k) }
	if cfg.STUNAddr != "" {
		s.stun, err = tailnet.ListenSTUN(context.Background(), cfg.STUNAddr, cfg.Logger.With("component", "stun"))
		if err != nil {
			return nil, fmt.Errorf("%w (use --stun-addr to pick another UDP port)", err)
		}
	}
	if cfg.STUNAddr2 != "" {
		s.stun2, err = tailnet.ListenSTUN(context.Background(), cfg.STUNAddr2, cfg.Logger.With("component", "stun2"))
		if err != nil {
			if s.stun != nil {
				s.stun.Close()
			}
			return nil, fmt.Errorf("%w (use --stun-addr2 to pick another UDP port)", err)
		}
	}

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w (use --listen to pick another address)", cfg.Listen, err)
	}
	if tlsCfg != nil {
		// A handshake still waiting at half the header timeout (which
		// net/http also puts on the handshake) would run out of time.
		wait := min(cfg.Limits.HandshakeQueueWait, cfg.Limits.HTTPHeaderTimeout/2)
		gate := newHandshakeGate(cfg.Limits.MaxHandshakes, wait, cfg.Logger.With("component", "tls"))
		tlsCfg.GetConfigForClient = gate.enter
		ln = tls.NewListener(gate.listener(ln), tlsCfg)
	}
	s.ln = ln

	sock := admin.SocketPath(cfg.DataDir)
	// We hold the store's lock, so a socket left here is stale.
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale admin socket: %w", err)
	}
	s.adminLn, err = net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", sock, err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", sock, err)
	}

	s.baseCtx, s.cancelSessions = context.WithCancelCause(context.Background())
	errLog := slog.NewLogLogger(cfg.Logger.With("component", "http").Handler(), slog.LevelDebug)
	s.httpSrv = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: cfg.Limits.HTTPHeaderTimeout,
		// Idle keep-alive connections are closed; upgraded ones
		// (coordination, DERP) are hijacked and keep their own pings.
		IdleTimeout:    cfg.Limits.HTTPIdleTimeout,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       errLog,
		// An empty map turns HTTP/2 off (see tlsCfg).
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	s.adminSrv = &http.Server{
		Handler:           admin.NewHandler(&admin.Local{Store: st, InfoFn: s.info, Changed: s.kickReauth}),
		ReadHeaderTimeout: cfg.Limits.HTTPHeaderTimeout,
		IdleTimeout:       cfg.Limits.HTTPIdleTimeout,
		ErrorLog:          errLog,
	}
	if err := s.setupReplication(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(protocol.CoordinatePath, s.handleCoordinate)
	mux.HandleFunc(protocol.WhoAmIPath, s.handleWhoAmI)
	mux.HandleFunc(protocol.HostKeyPath, s.handleHostKey)
	mux.HandleFunc(protocol.WorkspacesPath, s.handleWorkspaces)
	mux.Handle(admin.HTTPSPrefix+"/", s.adminHTTPS())
	derp := s.derp.Handler()
	mux.Handle("/derp", derp)
	mux.Handle("/derp/", derp)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if !s.ready.Load() || s.stopping.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		if s.repl != nil && !s.repl.healthy() {
			http.Error(w, "not ready: the database does not answer", http.StatusServiceUnavailable)
			return
		}
		if s.repl != nil && s.repl.mesh != nil {
			if why := s.repl.mesh.notReady(time.Now()); why != "" {
				http.Error(w, why, http.StatusServiceUnavailable)
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}

// Serve serves until ctx ends, then shuts down: connected peers are
// disconnected without being announced as gone to each other, so tailnet
// traffic between them keeps flowing while the coordinator is away.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 2)
	go func() { errc <- s.httpSrv.Serve(s.ln) }()
	go func() { errc <- s.adminSrv.Serve(s.adminLn) }()
	replDone, err := s.startReplication()
	if err != nil {
		s.shutdown()
		return err
	}
	reauthDone := make(chan struct{})
	go func() {
		defer close(reauthDone)
		s.reauthLoop()
	}()
	if s.tlsCfg != nil {
		rotateCtx, stopRotate := context.WithCancel(ctx)
		defer stopRotate()
		go rotateTicketKeys(rotateCtx, s.tlsCfg, s.ticketSecret)
	}
	s.ready.Store(true)
	s.logger.Info("coordinator serving", "url", s.URL(), "fingerprint", s.fingerprint, "stun", s.STUNAddr(), "data_dir", s.cfg.DataDir, "store", s.StoreDescription())

	select {
	case <-ctx.Done():
	case err = <-errc:
		err = fmt.Errorf("serving: %w", err)
	}
	s.shutdown()
	<-reauthDone
	<-replDone
	return err
}

func (s *Server) shutdown() {
	s.stopping.Store(true)
	s.core.close()
	s.cancelSessions(errShutdown)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.httpSrv.Shutdown(ctx)
	s.adminSrv.Shutdown(ctx)
	done := make(chan struct{})
	go func() {
		s.sessions.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.logger.Warn("some peer connections did not close in time")
	}
	s.leaveReplication()
	s.closeAll()
	s.logger.Info("coordinator stopped")
}

// closeAll releases what New acquired.
func (s *Server) closeAll() {
	if s.ln != nil {
		s.ln.Close()
	}
	if s.adminLn != nil {
		s.adminLn.Close()
		os.Remove(admin.SocketPath(s.cfg.DataDir))
	}
	if s.derp != nil {
		s.derp.Close()
	}
	if s.stun != nil {
		s.stun.Close()
	}
	if s.stun2 != nil {
		s.stun2.Close()
	}
	if s.store != nil {
		s.store.Close()
	}
}

// URL is the coordinator's access URL, or one built from the listener.
func (s *Server) URL() string {
	if s.cfg.AccessURL != "" {
		return strings.TrimRight(s.cfg.AccessURL, "/")
	}
	scheme := "https"
	if s.cfg.InsecureHTTP {
		scheme = "http"
	}
	host, port, _ := net.SplitHostPort(s.ln.Addr().String())
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "localhost"
		if h, err := os.Hostname(); err == nil && h != "" {
			host = h
		}
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}

// Addr is the bound HTTP(S) address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// STUNAddr is the bound STUN address, or nil when STUN is off.
func (s *Server) STUNAddr() net.Addr {
	if s.stun == nil {
		return nil
	}
	return s.stun.LocalAddr()
}

// Fingerprint is the hex SHA-256 of the certificate, "" with InsecureHTTP.
func (s *Server) Fingerprint() string { return s.fingerprint }

// FirstStart reports whether the store has no users yet.
func (s *Server) FirstStart() bool { return s.firstStart }

func (s *Server) info() admin.Info {
	i := admin.Info{
		Running:     true,
		DataDir:     s.cfg.DataDir,
		Fingerprint: s.fingerprint,
		URL:         s.URL(),
		Peers:       s.core.snapshot(),
	}
	if a := s.STUNAddr(); a != nil {
		i.STUN = a.String()
	}
	return i
}

// derpMapFor builds the DERP map for a peer that reached us at host (the
// Host header), so the relay is dialled the same way as the coordinator.
func (s *Server) derpMapFor(host string) (*tailnet.DERPMap, error) {
	if _, _, err := net.SplitHostPort(host); err != nil {
		port := "443"
		if s.cfg.InsecureHTTP {
			port = "80"
		}
		host = net.JoinHostPort(strings.Trim(host, "[]"), port)
	}
	stunPort := -1
	if a, ok := s.STUNAddr().(*net.UDPAddr); ok && a != nil {
		stunPort = a.Port
	}
	m, err := tailnet.CoordinatorDERPMap(host, stunPort, s.fingerprint)
	if err != nil {
		return m, err
	}
	s.addReplicaRelays(m)
	if s.stun2 == nil || stunPort < 0 {
		return m, nil
	}
	if a, ok := s.stun2.LocalAddr().(*net.UDPAddr); ok && a != nil {
		m.Regions[0].Nodes[0].STUNPort2 = a.Port
	}
	return m, m.Validate()
}

// authenticate checks the bearer token of a request.
func (s *Server) authenticate(r *http.Request) (store.Principal, *protocol.Error) {
	h := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(h, "Bearer ")
	tok = strings.TrimSpace(tok)
	if !ok || tok == "" {
		return store.Principal{}, &protocol.Error{Code: protocol.CodeTokenMissing, Fatal: true,
			Message: "no token: send \"Authorization: Bearer <token>\" (agent login --token, or AGENT_TOKEN)"}
	}
	p, err := s.store.Authenticate(r.Context(), tok)
	if err != nil {
		return store.Principal{}, tokenError(err, p.Token)
	}
	if p.Token.Kind == store.KindAdmin {
		// An admin token administers; it never joins the tailnet.
		return store.Principal{}, &protocol.Error{Code: protocol.CodeWrongRole, Fatal: true,
			Message: "this is an admin token, for 'agent admin --url' only; peers need a user token (agent admin token create --user NAME) or an agent token"}
	}
	return p, nil
}

// tokenError words a store authentication error for the peer.
func tokenError(err error, t store.Token) *protocol.Error {
	switch {
	case errors.Is(err, store.ErrTokenExpired):
		when := ""
		if !t.Expires.IsZero() {
			when = " at " + t.Expires.Format(time.RFC3339)
		}
		return &protocol.Error{Code: protocol.CodeTokenExpired, Fatal: true,
			Message: "the token expired" + when + "; ask an admin for a new one (agent admin token create)"}
	case errors.Is(err, store.ErrTokenRevoked):
		return &protocol.Error{Code: protocol.CodeTokenRevoked, Fatal: true,
			Message: "the token was revoked (or its user or agent deleted); ask an admin for a new one"}
	case errors.Is(err, store.ErrTokenInvalid):
		return &protocol.Error{Code: protocol.CodeTokenInvalid, Fatal: true,
			Message: "this coordinator does not know the token; check it was copied whole, or ask an admin for a new one"}
	}
	if errors.Is(err, store.ErrUnavailable) {
		return unavailableError()
	}
	return &protocol.Error{Code: protocol.CodeInternal, Fatal: true, Message: "checking the token failed: " + err.Error()}
}

// authStatus is the HTTP status for a refused request.
func authStatus(e *protocol.Error) int {
	if e.Code == protocol.CodeInternal && !e.Fatal {
		return http.StatusServiceUnavailable
	}
	return http.StatusUnauthorized
}

func writeHTTPError(w http.ResponseWriter, status int, e *protocol.Error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(e)
}

func (s *Server) handleWhoAmI(w http.ResponseWriter, r *http.Request) {
	// The per-address bucket slows down guessing tokens here too.
	release, le := s.edge.byAddr.admit(addrKey(r.RemoteAddr), time.Now())
	if le != nil {
		s.edge.refuse(w, le)
		return
	}
	defer release()
	p, perr := s.authenticate(r)
	if perr != nil {
		writeHTTPError(w, authStatus(perr), perr)
		return
	}
	who := protocol.WhoAmI{Role: protocol.RoleClient, Name: p.User.Name, User: p.User.Name, TokenID: p.Token.ID, Expires: p.Token.Expires}
	if p.Agent != nil {
		who.Role, who.Name, who.NodeID = protocol.RoleAgent, p.Agent.Name, p.Agent.ID
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(who)
}

// handleHostKey tells a user who may reach an agent the SSH host key the
// coordinator vouches for: the one the agent proved at registration.
func (s *Server) handleHostKey(w http.ResponseWriter, r *http.Request) {
	p, perr := s.authenticate(r)
	if perr != nil {
		writeHTTPError(w, http.StatusUnauthorized, perr)
		return
	}
	if p.Agent != nil {
		writeHTTPError(w, http.StatusForbidden, &protocol.Error{Code: protocol.CodeWrongRole,
			Message: fmt.Sprintf("this is the agent token of workspace %s, not a user token; user commands need a user token (agent admin token create --user NAME)", p.Agent.Name)})
		return
	}
	name := r.URL.Query().Get("agent")
	if err := protocol.ValidAgentName(name); err != nil {
		writeHTTPError(w, http.StatusBadRequest, &protocol.Error{Code: protocol.CodeBadMessage, Message: "agent: " + err.Error()})
		return
	}
	a, err := s.store.MayReach(r.Context(), p.User.Name, name)
	switch {
	case errors.Is(err, store.ErrNotFound):
		writeHTTPError(w, http.StatusNotFound, &protocol.Error{Code: protocol.CodeNoSuchAgent, Agent: name, Message: "no agent has this name"})
		return
	case errors.Is(err, store.ErrForbidden):
		writeHTTPError(w, http.StatusForbidden, &protocol.Error{Code: protocol.CodeForbidden, Agent: name,
			Message: fmt.Sprintf("user %s has no grant for this agent", p.User.Name)})
		return
	case err != nil:
		writeHTTPError(w, http.StatusInternalServerError, &protocol.Error{Code: protocol.CodeInternal, Message: err.Error()})
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(protocol.HostKeyAnswer{Agent: a.Name, HostKey: a.HostKey})
}

// kickReauth asks the re-authorisation loop to run now.
func (s *Server) kickReauth() {
	select {
	case s.reauthKick <- struct{}{}:
	default:
	}
}

func (s *Server) reauthLoop() {
	t := time.NewTicker(s.cfg.ReauthInterval)
	defer t.Stop()
	for {
		select {
		case <-s.baseCtx.Done():
			return
		case <-t.C:
		case <-s.reauthKick:
		}
		s.reauthorize()
	}
}

// reauthorize drops sessions whose token is no longer valid and tunnels
// that are no longer granted.
func (s *Server) reauthorize() {
	for _, p := range s.core.peersSnapshot() {
		err := s.store.CheckToken(s.baseCtx, p.tokenID)
		if errors.Is(err, store.ErrUnavailable) {
			// The store logs the outage; sessions keep flowing meanwhile.
			return
		}
		if err != nil {
			if !errors.Is(err, store.ErrTokenExpired) && !errors.Is(err, store.ErrTokenRevoked) && !errors.Is(err, store.ErrTokenInvalid) {
				// A failing store is not an access decision.
				s.logger.Error("re-checking a peer's token failed", "name", p.name, "role", p.role, "err", err)
				continue
			}
			why := s.revokedReason(p, err)
			s.logger.Info("cutting off a peer whose access ended", "name", p.name, "role", p.role, "reason", why)
			e := tokenError(err, store.Token{})
			e.Message = why + "; ask an admin for a new token (agent admin token create)"
			s.core.revoke(p, e, why)
			continue
		}
		if p.role != protocol.RoleClient {
			continue
		}
		for id, name := range s.core.tunnelsOf(p) {
			a, err := s.store.MayReach(s.baseCtx, p.user, name)
			if (err == nil && a.ID == id) || errors.Is(err, store.ErrUnavailable) {
				continue
			}
			s.logger.Info("removing a tunnel that is no longer allowed", "user", p.user, "agent", name)
			why := fmt.Sprintf("user %s's grant for agent %s was withdrawn", p.user, name)
			if errors.Is(err, store.ErrNotFound) || (err == nil && a.ID != id) {
				why = fmt.Sprintf("agent %s was deleted", name)
			}
			s.core.revokeTunnel(p, id, why)
		}
	}
	// Clients in a blip: their agents keep the tunnel for the grace, so a
	// decision about them must reach the agents all the same.
	for p, agents := range s.core.lostClients() {
		if err := s.store.CheckToken(s.baseCtx, p.tokenID); errors.Is(err, store.ErrTokenExpired) || errors.Is(err, store.ErrTokenRevoked) || errors.Is(err, store.ErrTokenInvalid) {
			s.logger.Info("cutting off a lost client whose access ended", "name", p.name, "reason", s.revokedReason(p, err))
			s.core.revokeLost(p, 0)
			continue
		}
		for id, name := range agents {
			if a, err := s.store.MayReach(s.baseCtx, p.user, name); errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrForbidden) || (err == nil && a.ID != id) {
				s.logger.Info("removing a lost client's tunnel that is no longer allowed", "user", p.user, "agent", name)
				s.core.revokeLost(p, id)
			}
		}
	}
}

// revokedReason words, in one line, why a session's token stopped being
// valid: expired, revoked, or its user or agent deleted.
func (s *Server) revokedReason(p *peer, err error) string {
	if errors.Is(err, store.ErrTokenExpired) {
		if p.role == protocol.RoleAgent {
			return fmt.Sprintf("agent %s's token expired", p.name)
		}
		return fmt.Sprintf("user %s's token expired", p.user)
	}
	if p.role == protocol.RoleAgent {
		if _, e := s.store.AgentByID(s.baseCtx, p.id); errors.Is(e, store.ErrNotFound) {
			return fmt.Sprintf("agent %s was deleted", p.name)
		}
		return fmt.Sprintf("agent %s's token was revoked", p.name)
	}
	if snap, e := s.store.List(s.baseCtx); e == nil && !slices.ContainsFunc(snap.Users, func(u store.User) bool { return u.Name == p.user }) {
		return fmt.Sprintf("user %s was deleted", p.user)
	}
	return fmt.Sprintf("user %s's token was revoked", p.user)
}

// Package sshd is the workspace's SSH server: shells with and without a PTY,
// sftp, scp/rsync/git over exec, TCP and Unix-socket forwarding in both
// directions, and agent forwarding. It is built on gliderlabs/ssh (its
// Server, Session, channel, request and subsystem handlers), creack/pty and
// pkg/sftp.
//
// It has no password or key authentication of its own: only peers that the
// coordinator authorized can reach it over the tailnet (WireGuard rejects every
// other key), so the server accepts every client and logs which tailnet user
// each connection belongs to. Sessions run as the agent's own OS user.
package sshd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
)

// handshakeTimeout bounds how long a client may take to finish the SSH
// handshake, so one that never does cannot hold a goroutine.
const handshakeTimeout = 30 * time.Second

// Options configure a Server.
type Options struct {
	// Logger receives connection and session logs. Required.
	Logger *slog.Logger
	// HostKeyPath is where the ed25519 host key lives, created 0600 on first
	// start and reused afterwards, so clients see the same key across restarts.
	// Required: put it in the agent's data directory.
	HostKeyPath string
	// PeerIdentity names the user a connection belongs to, from its remote
	// address (the lead maps tailnet addresses to coordinator users). Nil
	// logs "unknown".
	PeerIdentity func(remote net.Addr) string
	// Shell overrides the login shell from the passwd database.
	Shell string
	// Env is extra environment (KEY=VALUE) for sessions, applied over the
	// agent's own environment. The agent's internals (AGENT_*, which carry
	// its token, TS_*, SHLVL, GOMEMLIMIT) are removed from both and never
	// reach a session.
	Env []string
	// KeepaliveInterval is how often an idle client is asked to answer;
	// after KeepaliveCountMax unanswered requests the connection is dropped.
	// Zero means 15s; negative disables keepalives.
	KeepaliveInterval time.Duration
	// KeepaliveCountMax defaults to 3.
	KeepaliveCountMax int
	// MOTDPath is shown to interactive login shells; default /etc/motd.
	// A missing file shows nothing.
	MOTDPath string
	// PasswdPath is the passwd database to read the login shell from;
	// default /etc/passwd.
	PasswdPath string
	// Metrics, if set, counts connections (kind ssh), the bytes they carry
	// and their sessions by type. Nil counts nothing.
	Metrics *metrics.Agent
	// SessionIdleTimeout is how long a reconnecting terminal session
	// (`agent ssh`) keeps running with no client attached; zero means
	// DefaultSessionIdleTimeout.
	SessionIdleTimeout time.Duration
}

// Server serves SSH connections. Create it with New.
type Server struct {
	opts    Options
	logger  *slog.Logger
	srv     *ssh.Server
	hostKey gossh.Signer
	account account
	baseEnv []string
	// sessions are the reconnecting terminals, which outlive connections.
	sessions *sessionRegistry

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	wg        sync.WaitGroup // one per connection, until all its work is done
	writeBufs bufPool        // pending writes of the connections (batchconn.go)
}

// New loads (or creates) the host key and prepares a server.
func New(opts Options) (*Server, error) {
	if opts.Logger == nil {
		return nil, errors.New("sshd: Options.Logger is required")
	}
	if opts.HostKeyPath == "" {
		return nil, errors.New("sshd: Options.HostKeyPath is required (a file in the agent's data directory)")
	}
	if opts.KeepaliveInterval == 0 {
		opts.KeepaliveInterval = 15 * time.Second
	}
	if opts.KeepaliveCountMax <= 0 {
		opts.KeepaliveCountMax = 3
	}
	if opts.MOTDPath == "" {
		opts.MOTDPath = "/etc/motd"
	}
	if opts.PasswdPath == "" {
		opts.PasswdPath = "/etc/passwd"
	}
	logger := opts.Logger.With("component", "sshd")
	signer, err := loadOrCreateHostKey(opts.HostKeyPath, logger)
	if err != nil {
		return nil, err
	}
	acct := currentAccount(opts.PasswdPath)
	if opts.Shell != "" {
		acct.Shell = opts.Shell
	}

	s := &Server{
		opts:      opts,
		logger:    logger,
		hostKey:   signer,
		account:   acct,
		baseEnv:   sessionBaseEnv(os.Environ(), opts.Env),
		sessions:  newSessionRegistry(logger, opts.SessionIdleTimeout),
		listeners: map[net.Listener]struct{}{},
		conns:     map[*serverConn]struct{}{},
	}
	s.srv = &ssh.Server{
		// Never called: session channels go to handleSession, which gives
		// each session its own handlers. Set so that Serve leaves it alone.
		Handler:                  func(ssh.Session) {},
		Version:                  "agentd",
		HostSigners:              []ssh.Signer{signer},
		ConnCallback:             s.connOpened,
		ServerConfigCallback:     s.serverConfig,
		ConnectionFailedCallback: s.handshakeFailed,
		ChannelHandlers: map[string]ssh.ChannelHandler{
			"session":                        channelHandler((*serverConn).handleSession),
			"direct-tcpip":                   channelHandler((*serverConn).handleDirectTCPIP),
			"direct-streamlocal@openssh.com": channelHandler((*serverConn).handleDirectStreamLocal),
			protocol.SessionAttachChannel:    channelHandler((*serverConn).handleSessionAttach),
			"default":                        rejectUnknownChannel,
		},
		RequestHandlers: map[string]ssh.RequestHandler{
			"tcpip-forward":                          requestHandler((*serverConn).handleTCPIPForward),
			"cancel-tcpip-forward":                   requestHandler((*serverConn).handleCancelTCPIPForward),
			"streamlocal-forward@openssh.com":        requestHandler((*serverConn).handleStreamLocalForward),
			"cancel-streamlocal-forward@openssh.com": requestHandler((*serverConn).handleCancelStreamLocalForward),
			"no-more-sessions@openssh.com":           requestHandler((*serverConn).handleNoMoreSessions),
		},
		SubsystemHandlers: map[string]ssh.SubsystemHandler{}, // per session too
	}
	return s, nil
}

// serverConfig is the x/crypto configuration of one connection; gliderlabs
// adds the host key and "none" authentication to it.
func (s *Server) serverConfig(ctx ssh.Context) *gossh.ServerConfig {
	cfg := &gossh.ServerConfig{
		// AES-GCM first: it runs on AES-NI/ARMv8 instructions and is the
		// fastest cipher here; chacha20-poly1305 stays for clients without
		// AES hardware.
		Config: gossh.Config{Ciphers: []string{
			"aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
			"chacha20-poly1305@openssh.com",
			"aes128-ctr", "aes192-ctr", "aes256-ctr",
		}},
		// The tailnet already authenticated and authorized the peer; this
		// only notes who connected.
		NoClientAuthCallback: func(cm gossh.ConnMetadata) (*gossh.Permissions, error) {
			if c := connOf(ctx); c != nil {
				c.authenticated(cm)
			}
			return nil, nil
		},
	}
	return cfg
}

func (s *Server) handshakeFailed(nc net.Conn, err error) {
	s.logger.Debug("ssh handshake failed", "remote", nc.RemoteAddr().String(), "err", err)
}

// HostKey is the server's public host key (for known_hosts entries).
func (s *Server) HostKey() gossh.PublicKey { return s.hostKey.PublicKey() }

// Serve accepts connections on ln until ctx is cancelled, Close is called or
// ln fails. It returns nil after a cancel or Close. Cancelling ctx also drops
// the connections accepted here.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("sshd: server closed")
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()

	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	err := s.srv.Serve(servedListener{Listener: ln, ctx: ctx})
	if errors.Is(err, ssh.ErrServerClosed) || ctx.Err() != nil || s.isClosed() {
		return nil
	}
	return fmt.Errorf("sshd: accept: %w", err)
}

// servedListener tags each accepted connection with the context of the
// Serve call that accepted it.
type servedListener struct {
	net.Listener
	ctx context.Context
}

type servedConn struct {
	net.Conn
	ctx context.Context
}

func (l servedListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return servedConn{Conn: nc, ctx: l.ctx}, nil
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops all listeners and drops every connection; the sessions'
// process groups (reconnecting ones too) get SIGHUP. It waits until every connection's sessions and
// forwards have ended.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	// Ours, not only gliderlabs' list: that one holds a connection only
	// once its handshake is done.
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	s.srv.Close()
	s.wg.Wait()
	s.sessions.close()
	return nil
}

func (s *Server) peerIdentity(addr net.Addr) string {
	if s.opts.PeerIdentity == nil {
		return "unknown"
	}
	if id := s.opts.PeerIdentity(addr); id != "" {
		return id
	}
	return "unknown"
}

// connOpened runs for every accepted connection before its handshake: it
// counts it, ties it to its Serve context and starts the goroutine that
// cleans up after it.
func (s *Server) connOpened(ctx ssh.Context, nc net.Conn) net.Conn {
	serveCtx := context.Background()
	if sc, ok := nc.(servedConn); ok {
		nc, serveCtx = sc.Conn, sc.ctx
	}
	peer := s.peerIdentity(nc.RemoteAddr())
	c := &serverConn{
		srv:    s,
		ctx:    ctx,
		peer:   peer,
		logger: s.logger.With("peer", peer, "remote", nc.RemoteAddr().String()),
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil // gliderlabs closes it
	}
	closed := s.opts.Metrics.ConnectionOpened(metrics.KindSSH)
	c.nc = s.opts.Metrics.CountBytes(metrics.KindSSH, nc)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	ctx.SetValue(connKey, c)

	stopServe := context.AfterFunc(serveCtx, func() { c.nc.Close() })
	handshake := time.AfterFunc(handshakeTimeout, func() {
		if c.sconn() == nil {
			c.logger.Debug("ssh handshake timed out")
			c.nc.Close()
		}
	})
	go func() {
		defer s.wg.Done()
		// gliderlabs cancels the context when the connection closes, for
		// whatever reason.
		<-ctx.Done()
		stopServe()
		handshake.Stop()
		c.finish()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		// Counted as open until its sessions and forwards are done.
		closed()
	}()
	if s.opts.KeepaliveInterval > 0 {
		go c.keepalive()
	}
	// c.nc stays the socket itself, so that closing it drops a
	// connection at once; x/crypto writes through the batching layer.
	return newBatchedConn(c.nc, &s.writeBufs)
}

// channelHandler adapts a serverConn method to gliderlabs' ChannelHandler.
func channelHandler(h func(*serverConn, *gossh.ServerConn, gossh.NewChannel)) ssh.ChannelHandler {
	return func(_ *ssh.Server, sconn *gossh.ServerConn, nch gossh.NewChannel, ctx ssh.Context) {
		c := connOf(ctx)
		if c == nil || !c.track() {
			_ = nch.Reject(gossh.ResourceShortage, "the connection is closing")
			return
		}
		defer c.wg.Done()
		h(c, sconn, nch)
	}
}

// requestHandler adapts a serverConn method to gliderlabs' RequestHandler.
func requestHandler(h func(*serverConn, *gossh.Request) (bool, []byte)) ssh.RequestHandler {
	return func(ctx ssh.Context, _ *ssh.Server, req *gossh.Request) (bool, []byte) {
		c := connOf(ctx)
		if c == nil {
			return false, nil
		}
		return h(c, req)
	}
}

func rejectUnknownChannel(_ *ssh.Server, _ *gossh.ServerConn, nch gossh.NewChannel, ctx ssh.Context) {
	if c := connOf(ctx); c != nil {
		c.logger.Debug("refused unknown channel type", "type", nch.ChannelType())
	}
	_ = nch.Reject(gossh.UnknownChannelType, "unknown channel type "+nch.ChannelType())
}

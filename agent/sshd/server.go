// Package sshd is the workspace's SSH server: shells with and without a PTY,
// sftp, scp/rsync/git over exec, TCP and Unix-socket forwarding in both
// directions, and agent forwarding.
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

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/metrics"
)

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
	// agent's own environment. The agent's own settings (AGENT_*, which carry
	// its token) are removed from both and never reach a session.
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
}

// Server serves SSH connections. Create it with New.
type Server struct {
	opts    Options
	logger  *slog.Logger
	config  *gossh.ServerConfig
	hostKey gossh.Signer
	account account
	baseEnv []string

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	wg        sync.WaitGroup
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

	env := newEnvList()
	env.AddAll(os.Environ(), secretEnv)
	env.AddAll(opts.Env, secretEnv)

	s := &Server{
		opts:      opts,
		logger:    logger,
		hostKey:   signer,
		account:   acct,
		baseEnv:   env.Environ(),
		listeners: map[net.Listener]struct{}{},
		conns:     map[*serverConn]struct{}{},
	}
	cfg := &gossh.ServerConfig{
		// The tailnet already authenticated and authorized the peer.
		NoClientAuth:  true,
		ServerVersion: "SSH-2.0-agentd",
	}
	// AES-GCM first: it runs on AES-NI/ARMv8 instructions and is the fastest
	// cipher here; chacha20-poly1305 stays for clients without AES hardware.
	cfg.Ciphers = []string{
		"aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
		"chacha20-poly1305@openssh.com",
		"aes128-ctr", "aes192-ctr", "aes256-ctr",
	}
	cfg.AddHostKey(signer)
	s.config = cfg
	return s, nil
}

// HostKey is the server's public host key (for known_hosts entries).
func (s *Server) HostKey() gossh.PublicKey { return s.hostKey.PublicKey() }

// Serve accepts connections on ln until ctx is cancelled, Close is called or
// ln fails. It returns nil after a cancel or Close.
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

	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || s.isClosed() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("sshd: accept: %w", err)
		}
		backoff = 0
		closed := s.opts.Metrics.ConnectionOpened(metrics.KindSSH)
		nc = s.opts.Metrics.CountBytes(metrics.KindSSH, nc)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			// Counted as open until its handler is done with it, sessions
			// and forwards included.
			defer closed()
			s.handleConn(ctx, nc)
		}()
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops all listeners and drops every connection; the sessions'
// process groups get SIGHUP. It waits for the connection handlers to end.
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
	for c := range s.conns {
		c.close()
	}
	s.mu.Unlock()
	s.wg.Wait()
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

func (s *Server) handleConn(ctx context.Context, nc net.Conn) {
	peer := s.peerIdentity(nc.RemoteAddr())
	logger := s.logger.With("peer", peer, "remote", nc.RemoteAddr().String())

	// A client that never finishes the handshake must not hold a goroutine.
	_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
	sconn, chans, reqs, err := gossh.NewServerConn(nc, s.config)
	if err != nil {
		nc.Close()
		logger.Debug("ssh handshake failed", "err", err)
		return
	}
	_ = nc.SetDeadline(time.Time{})

	cctx, cancel := context.WithCancel(ctx)
	c := &serverConn{
		srv:    s,
		sconn:  sconn,
		ctx:    cctx,
		cancel: cancel,
		peer:   peer,
		logger: logger.With("client", string(sconn.ClientVersion())),
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		sconn.Close()
		cancel()
		return
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	// Cancelling Serve's context drops its connections too.
	stop := context.AfterFunc(cctx, func() { sconn.Close() })
	defer stop()

	start := time.Now()
	c.logger.Info("ssh connection opened", "ssh_user", sconn.User())
	c.serve(chans, reqs)
	c.logger.Info("ssh connection closed", "duration", time.Since(start).Round(time.Millisecond).String())

	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

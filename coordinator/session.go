package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/coder/websocket"
	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// errGraceful ends a session the peer closed with a disconnect message.
var errGraceful = errors.New("peer disconnected")

// lostError ends a session whose connection broke.
type lostError struct{ err error }

func (e *lostError) Error() string { return "connection lost: " + e.err.Error() }
func (e *lostError) Unwrap() error { return e.err }

func (s *Server) handleCoordinate(w http.ResponseWriter, r *http.Request) {
	// Per-address limits first: they also slow down guessing tokens.
	releaseAddr, le := s.edge.byAddr.admit(addrKey(r.RemoteAddr), time.Now())
	if le != nil {
		s.logger.Info("refused a session over the per-address limits", "remote", r.RemoteAddr, "why", le.msg)
		s.edge.refuse(w, le)
		return
	}
	defer releaseAddr()
	principal, perr := s.authenticate(r)
	if perr != nil {
		s.metrics.MessageRejected(metrics.RejectUnauthorized)
		s.logger.Info("refused a peer", "remote", r.RemoteAddr, "code", perr.Code)
		writeHTTPError(w, authStatus(perr), perr)
		return
	}
	if perr := roleMismatch(r, principal); perr != nil {
		s.metrics.MessageRejected(metrics.RejectUnauthorized)
		s.logger.Info("refused a token used in the wrong role", "remote", r.RemoteAddr, "token_id", principal.Token.ID)
		writeHTTPError(w, http.StatusForbidden, perr)
		return
	}
	releaseToken, le := s.edge.byToken.admit(principal.Token.ID, time.Now())
	if le != nil {
		s.logger.Info("refused a session over the per-token limits", "remote", r.RemoteAddr, "user", principal.User.Name, "token", principal.Token.ID, "why", le.msg)
		s.edge.refuse(w, le)
		return
	}
	defer releaseToken()
	if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") && !offersSubprotocol(r) {
		writeHTTPError(w, http.StatusBadRequest, &protocol.Error{Code: protocol.CodeUnsupportedVer, Fatal: true,
			Message: fmt.Sprintf("offer one of the WebSocket subprotocols %s: this coordinator speaks protocol versions %d to %d; upgrade the older side",
				strings.Join(protocol.Subprotocols(), ", "), protocol.MinVersion, protocol.Version)})
		return
	}
	if s.stopping.Load() {
		// No Retry-After: behind a load balancer another replica may
		// take the peer at once, sooner than any fixed time; the peer's
		// own short backoff decides.
		writeHTTPError(w, http.StatusServiceUnavailable, &protocol.Error{Code: protocol.CodeInternal, Message: "coordinator is shutting down; retry shortly"})
		return
	}
	// A fresh challenge an agent signs with its host key in its hello.
	challenge := rand.Text()
	w.Header().Set(protocol.ChallengeHeader, challenge)
	// Newest first: the first one the peer also offers wins.
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: protocol.Subprotocols()})
	if err != nil {
		s.logger.Info("WebSocket upgrade failed", "remote", r.RemoteAddr, "err", err)
		return
	}
	s.sessions.Add(1)
	defer s.sessions.Done()
	conn.SetReadLimit(protocol.MaxMessageSize)
	version := protocol.VersionOf(strings.ToLower(conn.Subprotocol()))
	sess := &session{srv: s, conn: conn, principal: principal, host: r.Host, remote: r.RemoteAddr, version: version, challenge: challenge}
	sess.run()
}

// roleMismatch refuses a token of the other kind than the role the peer
// asks for (protocol.RoleHeader), before it can affect anyone.
func roleMismatch(r *http.Request, p store.Principal) *protocol.Error {
	want := protocol.Role(r.Header.Get(protocol.RoleHeader))
	switch {
	case want == "":
		return nil
	case want != protocol.RoleAgent && want != protocol.RoleClient:
		return &protocol.Error{Code: protocol.CodeBadMessage, Fatal: true,
			Message: fmt.Sprintf("header %s: %q is not a role; use %q or %q", protocol.RoleHeader, want, protocol.RoleAgent, protocol.RoleClient)}
	case want == protocol.RoleClient && p.Agent != nil:
		return &protocol.Error{Code: protocol.CodeWrongRole, Fatal: true,
			Message: fmt.Sprintf("this is the agent token of workspace %s, not a user token; user commands need a user token (agent admin token create --user NAME)", p.Agent.Name)}
	case want == protocol.RoleAgent && p.Agent == nil:
		return &protocol.Error{Code: protocol.CodeWrongRole, Fatal: true,
			Message: fmt.Sprintf("this is a user token of %s, not an agent token; agent run needs its workspace's agent token (agent admin agent create, or agent admin token create --agent NAME)", p.User.Name)}
	}
	return nil
}

// offersSubprotocol reports whether the request offers a version we speak.
func offersSubprotocol(r *http.Request) bool {
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(h, ",") {
			if protocol.VersionOf(strings.ToLower(strings.TrimSpace(p))) != 0 {
				return true
			}
		}
	}
	return false
}

// session is one peer's WebSocket connection.
type session struct {
	srv       *Server
	conn      *websocket.Conn
	principal store.Principal
	host      string
	remote    string
	// version is the protocol version agreed in the WebSocket handshake.
	version int
	// challenge is what an agent signs to prove its identity.
	challenge string
	logger    *slog.Logger

	ctx    context.Context
	cancel context.CancelCauseFunc
	p      *peer
}

type readResult struct {
	typ  websocket.MessageType
	data []byte
	err  error
}

func (ss *session) run() {
	s := ss.srv
	ss.ctx, ss.cancel = context.WithCancelCause(s.baseCtx)
	defer ss.cancel(nil)
	role, name := protocol.RoleClient, ss.principal.User.Name
	if ss.principal.Agent != nil {
		role, name = protocol.RoleAgent, ss.principal.Agent.Name
	}
	ss.logger = s.logger.With("role", role, "name", name, "remote", ss.remote, "protocol", ss.version)
	ss.p = &peer{
		version: ss.version,
		role:    role,
		name:    name,
		user:    ss.principal.User.Name,
		tokenID: ss.principal.Token.ID,
		since:   time.Now(),
		remote:  ss.remote,
		out:     make(chan *protocol.ServerMessage, s.cfg.PeerQueueSize),
		kill:    func(e *protocol.Error) { ss.cancel(e) },
	}

	// The reader runs on its own: coder/websocket closes the connection
	// when a Read's context ends, and we want to send a last error first.
	in := make(chan readResult)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			typ, data, err := ss.conn.Read(context.Background())
			select {
			case in <- readResult{typ, data, err}:
			case <-ss.ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		ss.writeLoop()
	}()

	registered := ss.handshake(in)
	if registered {
		role := metrics.RoleClient
		if ss.p.role == protocol.RoleAgent {
			role = metrics.RoleAgent
		}
		defer s.metrics.PeerConnected(role)()
		ss.logger.Info("peer connected", "node_id", ss.p.id)
		// Expiry is enforced on open sessions too, at the moment it
		// happens, not at the next periodic re-check.
		if exp := ss.principal.Token.Expires; !exp.IsZero() {
			t := time.AfterFunc(time.Until(exp), s.kickReauth)
			defer func() {
				// A lost client's agents keep its tunnel for the grace:
				// its expiry within that time must still be noticed.
				if !errors.Is(context.Cause(ss.ctx), errGraceful) && time.Until(exp) < protocol.LostGrace {
					return
				}
				t.Stop()
			}()
		}
		go ss.pingLoop()
		ss.readLoop(in)
	}
	cause := context.Cause(ss.ctx)
	if ss.ctx.Err() == nil {
		cause = &lostError{errors.New("session ended")}
	}
	reason := protocol.GoneLost
	var pe *protocol.Error
	switch {
	case errors.Is(cause, errGraceful):
		reason = protocol.GoneDisconnected
	case errors.As(cause, &pe) && (pe.Code == protocol.CodeTokenRevoked || pe.Code == protocol.CodeTokenExpired):
		// Cut off by an access decision (core.revoke already told its
		// peers).
		reason = protocol.GoneRevoked
	}
	if registered {
		s.core.unregister(ss.p, reason)
		ss.logger.Info("peer left", "node_id", ss.p.id, "reason", reason, "cause", cause)
	}
	ss.cancel(cause)
	<-writerDone
	<-readerDone
}

// handshake waits for the peer's hello, assigns its identity, queues our
// hello and registers the peer.
func (ss *session) handshake(in <-chan readResult) bool {
	s := ss.srv
	timer := time.NewTimer(s.cfg.HelloTimeout)
	defer timer.Stop()
	var hello *protocol.PeerHello
	select {
	case <-ss.ctx.Done():
		return false
	case <-timer.C:
		ss.fail(&protocol.Error{Code: protocol.CodeUnexpectedMessage, Fatal: true,
			Message: fmt.Sprintf("no hello within %s; a peer must send hello first", s.cfg.HelloTimeout)})
		return false
	case rr := <-in:
		m, ok := ss.decode(rr)
		if !ok {
			return false
		}
		if m.Type != protocol.TypeHello {
			ss.fail(&protocol.Error{Code: protocol.CodeUnexpectedMessage, Fatal: true,
				Message: fmt.Sprintf("got %q before hello; a peer must send hello first", m.Type)})
			return false
		}
		hello = m.Hello
	}

	p := ss.p
	if p.role == protocol.RoleAgent {
		// Checked before the agent is registered: a refused impostor
		// never disturbs the connected agent.
		if e := ss.checkIdentity(hello.Identity); e != nil {
			ss.fail(e)
			return false
		}
		p.id = ss.principal.Agent.ID
		p.addrs = []netip.Prefix{protocol.AgentAddress(p.id)}
	} else {
		id, err := ss.clientID(hello.ResumeToken)
		if err != nil {
			ss.fail(&protocol.Error{Code: protocol.CodeInternal, Fatal: true, Message: err.Error()})
			return false
		}
		p.id = id
		p.addrs = []netip.Prefix{protocol.ClientAddress(id)}
	}
	dm, err := s.derpMapFor(ss.host)
	if err != nil {
		ss.fail(&protocol.Error{Code: protocol.CodeBadMessage, Fatal: true,
			Message: "cannot build a DERP map for the host you used (" + err.Error() + "); connect with a host:port URL"})
		return false
	}
	h := &protocol.Hello{
		Role: p.role, NodeID: p.id, Addresses: p.addrs,
		Name: p.name, User: p.user, DERPMap: dm,
	}
	if p.role == protocol.RoleClient {
		h.ResumeToken = s.resume.issue(p.id, p.user, time.Now())
	}
	ss.logger = ss.logger.With("node_id", p.id)
	if hello.Software != "" {
		ss.logger = ss.logger.With("software", hello.Software)
	}
	// Hello goes first: it is queued before the peer becomes visible to the
	// core, which may queue peer updates right away.
	p.out <- &protocol.ServerMessage{Type: protocol.TypeHello, Hello: h}
	if !s.core.register(p) {
		ss.cancel(errShutdown)
		return false
	}
	return true
}

// checkIdentity verifies an agent's proof of holding its SSH host key and
// pins the key for the agent's token at its first use. A different key, or
// no proof once a key is pinned, is refused with one line saying what an
// admin can do.
func (ss *session) checkIdentity(id *protocol.AgentIdentity) *protocol.Error {
	a, tok := ss.principal.Agent, ss.principal.Token
	reset := fmt.Sprintf("if this workspace's data directory was lost or the workspace rebuilt, an admin runs: agent admin agent reset-identity %s (or creates a new agent token)", a.Name)
	if id == nil {
		if tok.HostKey == "" {
			ss.logger.Warn("agent did not prove an identity (older release); its host key is not pinned")
			return nil
		}
		ss.logger.Warn("refused an agent connection without proof of the pinned identity")
		return &protocol.Error{Code: protocol.CodeIdentityMismatch, Fatal: true,
			Message: fmt.Sprintf("agent %s's SSH host key is pinned and this connection did not prove it (an older agent release, or not the workspace's agent); upgrade the agent; %s", a.Name, reset)}
	}
	pub, _, _, _, err := gossh.ParseAuthorizedKey([]byte(id.HostKey))
	if err != nil {
		return &protocol.Error{Code: protocol.CodeBadMessage, Fatal: true, Message: "identity host_key is not an SSH public key in authorized_keys format: " + err.Error()}
	}
	raw, err := base64.StdEncoding.DecodeString(id.Signature)
	var sig gossh.Signature
	if err == nil {
		err = gossh.Unmarshal(raw, &sig)
	}
	if err == nil {
		err = pub.Verify(protocol.IdentityMessage(ss.challenge), &sig)
	}
	if err != nil {
		ss.logger.Warn("refused an agent whose identity proof does not verify", "host_key", gossh.FingerprintSHA256(pub), "err", err)
		return &protocol.Error{Code: protocol.CodeIdentityMismatch, Fatal: true,
			Message: fmt.Sprintf("the signature over this connection's challenge does not verify with host key %s; the agent must sign with the key it presents", gossh.FingerprintSHA256(pub))}
	}
	key := strings.TrimSpace(string(gossh.MarshalAuthorizedKey(pub)))
	pinned, err := ss.srv.store.PinHostKey(ss.ctx, tok.ID, key)
	switch {
	case errors.Is(err, store.ErrIdentityMismatch):
		want := pinned
		if pk, _, _, _, perr := gossh.ParseAuthorizedKey([]byte(pinned)); perr == nil {
			want = gossh.FingerprintSHA256(pk)
		}
		ss.logger.Warn("refused an agent presenting another host key than the pinned one", "host_key", gossh.FingerprintSHA256(pub), "pinned", want)
		return &protocol.Error{Code: protocol.CodeIdentityMismatch, Fatal: true,
			Message: fmt.Sprintf("agent %s presented SSH host key %s, but its token is pinned to %s since its first registration; %s; otherwise this is not the workspace's agent",
				a.Name, gossh.FingerprintSHA256(pub), want, reset)}
	case err != nil:
		return &protocol.Error{Code: protocol.CodeInternal, Fatal: true, Message: "pinning the agent's identity failed: " + err.Error()}
	}
	if tok.HostKey == "" {
		ss.logger.Info("pinned the agent's SSH host key at its first registration", "host_key", gossh.FingerprintSHA256(pub))
	}
	return nil
}

// clientID picks a client session's node ID: the one a valid resume token
// names if no one else holds it, or a fresh random one.
func (ss *session) clientID(resumeToken string) (tailnet.NodeID, error) {
	s := ss.srv
	if resumeToken != "" {
		id, err := s.resume.check(resumeToken, ss.p.user, time.Now())
		switch {
		case err != nil:
			ss.logger.Info("ignoring resume token", "err", err)
		case s.store.IsAgentID(ss.ctx, id):
			ss.logger.Info("ignoring resume token naming an agent's id")
		default:
			if holder := s.core.inUse(id); holder == nil || (holder.role == protocol.RoleClient && holder.user == ss.p.user) {
				return id, nil
			}
		}
	}
	for range 16 {
		id, err := store.RandomNodeID()
		if err != nil {
			return 0, err
		}
		if s.core.inUse(id) == nil && !s.store.IsAgentID(ss.ctx, id) {
			return id, nil
		}
	}
	return 0, errors.New("could not pick a free node id")
}

func (ss *session) readLoop(in <-chan readResult) {
	for {
		var rr readResult
		select {
		case <-ss.ctx.Done():
			return
		case rr = <-in:
		}
		m, ok := ss.decode(rr)
		if !ok {
			return
		}
		if !ss.handle(m) {
			return
		}
	}
}

// decode turns a frame into a message, ending the session on a read error
// or a bad message.
func (ss *session) decode(rr readResult) (*protocol.PeerMessage, bool) {
	if rr.err != nil {
		if websocket.CloseStatus(rr.err) == websocket.StatusMessageTooBig {
			ss.srv.metrics.MessageRejected(metrics.RejectTooLarge)
			ss.logger.Info("peer sent a message over the size limit", "limit", protocol.MaxMessageSize)
		}
		ss.cancel(&lostError{rr.err})
		return nil, false
	}
	if rr.typ != websocket.MessageText {
		ss.fail(&protocol.Error{Code: protocol.CodeBadMessage, Fatal: true, Message: "binary frame; send JSON text frames"})
		return nil, false
	}
	m, e := protocol.DecodePeer(ss.version, rr.data)
	if e != nil {
		ss.fail(e)
		return nil, false
	}
	return m, true
}

// handle acts on one message; false ends the session.
func (ss *session) handle(m *protocol.PeerMessage) bool {
	s, p := ss.srv, ss.p
	switch m.Type {
	case protocol.TypeHello:
		ss.fail(&protocol.Error{Code: protocol.CodeUnexpectedMessage, Fatal: true, Message: "hello sent twice; send it once, first"})
		return false
	case protocol.TypeNode:
		n := &m.Node.Node
		if n.ID != p.id {
			ss.fail(&protocol.Error{Code: protocol.CodeNodeRejected, Fatal: true,
				Message: fmt.Sprintf("node id %d is not the id %d this connection was given in hello", n.ID, p.id)})
			return false
		}
		for _, a := range n.Addresses {
			if !slices.Contains(p.addrs, a) {
				ss.fail(&protocol.Error{Code: protocol.CodeNodeRejected, Fatal: true,
					Message: fmt.Sprintf("address %v was not assigned in hello (use %v)", a, p.addrs)})
				return false
			}
		}
		if e := s.core.setNode(p, n); e != nil {
			ss.fail(e)
			return false
		}
	case protocol.TypeTunnel, protocol.TypeUntunnel:
		if p.role != protocol.RoleClient {
			ss.fail(&protocol.Error{Code: protocol.CodeUnexpectedMessage, Fatal: true,
				Message: "agents cannot open or close tunnels; clients (user tokens) open tunnels to agents"})
			return false
		}
		if m.Type == protocol.TypeUntunnel {
			s.core.removeTunnel(p, m.Untunnel.Agent)
			return true
		}
		ss.tunnel(m.Tunnel.Agent)
	case protocol.TypeDisconnect:
		ss.cancel(errGraceful)
		return false
	case protocol.TypeNetworkStatus:
		if p.role != protocol.RoleAgent {
			ss.fail(&protocol.Error{Code: protocol.CodeUnexpectedMessage, Fatal: true,
				Message: "only agents report a network status; clients (user tokens) do not"})
			return false
		}
		ss.networkStatus(m.NetworkStatus)
	}
	return true
}

// networkStatus records the agent's verdict, tells the clients tunneled to
// it, and logs the earlier verdicts the coordinator had not received (the
// agent could not deliver them while its network was down).
func (ss *session) networkStatus(ns *protocol.NetworkStatus) {
	v := ns.Verdict
	late := ss.srv.core.setNetwork(ss.p, ns)
	for _, h := range late {
		ss.logger.Info("earlier agent network verdict, not received when it happened",
			"status", h.Status, "summary", h.Summary, "codes", h.Codes, "at", h.At, "since", h.Since)
	}
	lvl := slog.LevelInfo
	if v.Status == protocol.NetworkBroken {
		lvl = slog.LevelWarn
	}
	ss.logger.Log(ss.ctx, lvl, "agent network verdict", "status", v.Status, "summary", v.Summary, "codes", v.Codes, "at", v.At, "since", v.Since)
}

func (ss *session) tunnel(agentName string) {
	s, p := ss.srv, ss.p
	a, err := s.store.MayReach(ss.ctx, p.user, agentName)
	var refuse *protocol.Error
	switch {
	case errors.Is(err, store.ErrNotFound):
		refuse = &protocol.Error{Code: protocol.CodeNoSuchAgent, Agent: agentName,
			Message: "no agent has this name; check the spelling (an admin can list agents with: agent admin list)"}
	case errors.Is(err, store.ErrForbidden):
		refuse = &protocol.Error{Code: protocol.CodeForbidden, Agent: agentName,
			Message: fmt.Sprintf("user %s has no grant for this agent; ask an admin to run: agent admin grant %s %s", p.user, p.user, agentName)}
	case err != nil:
		refuse = &protocol.Error{Code: protocol.CodeInternal, Agent: agentName, Message: "checking the grant failed: " + err.Error()}
	case len(s.core.tunnelsOf(p)) >= s.cfg.MaxTunnels:
		refuse = &protocol.Error{Code: protocol.CodeLimitExceeded, Agent: agentName,
			Message: fmt.Sprintf("this connection already has %d tunnels, the limit; remove some first", s.cfg.MaxTunnels)}
	}
	if refuse != nil {
		if refuse.Code == protocol.CodeNoSuchAgent {
			s.metrics.MessageRejected(metrics.RejectUnknownPeer)
		} else {
			s.metrics.MessageRejected(metrics.RejectForbidden)
		}
		ss.logger.Info("refused a tunnel", "agent", agentName, "code", refuse.Code)
		s.core.send(p, &protocol.ServerMessage{Type: protocol.TypeError, Error: refuse})
		return
	}
	s.repl.prepareTunnel(a.ID)
	s.core.addTunnel(p, a.ID, a.Name)
}

// fail ends the session with a fatal error the peer is told about.
func (ss *session) fail(e *protocol.Error) {
	switch e.Code {
	case protocol.CodeInternal:
	case protocol.CodeMessageTooLarge:
		ss.srv.metrics.MessageRejected(metrics.RejectTooLarge)
	default:
		ss.srv.metrics.MessageRejected(metrics.RejectMalformed)
	}
	ss.logger.Info("closing a peer's connection", "code", e.Code, "error", e.Message)
	ss.cancel(e)
}

func (ss *session) pingLoop() {
	interval := ss.srv.cfg.PingInterval
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ss.ctx.Done():
			return
		case <-t.C:
		}
		// Not derived from ss.ctx: ending a Ping's context closes the
		// connection, before the writer could send the reason.
		ctx, cancel := context.WithTimeout(context.Background(), interval)
		err := ss.conn.Ping(ctx)
		cancel()
		if err != nil && ss.ctx.Err() == nil {
			ss.cancel(&lostError{fmt.Errorf("no answer to a ping within %s: %w", interval, err)})
			return
		}
	}
}

// writeLoop drains the peer's queue onto the connection and, when the
// session ends, says why and closes the connection.
func (ss *session) writeLoop() {
	for {
		select {
		case m := <-ss.p.out:
			if err := ss.write(m, ss.srv.cfg.WriteTimeout); err != nil {
				ss.cancel(&protocol.Error{Code: protocol.CodeSlowConsumer, Fatal: true,
					Message: "writing to this connection failed or timed out: " + err.Error()})
			}
		case <-ss.ctx.Done():
			ss.closeConn(context.Cause(ss.ctx))
			return
		}
	}
}

func (ss *session) write(m *protocol.ServerMessage, timeout time.Duration) error {
	data, err := protocol.EncodeServer(ss.version, m.ForVersion(ss.version))
	if err != nil {
		ss.logger.Error("not sending an invalid message", "err", err)
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return ss.conn.Write(ctx, websocket.MessageText, data)
}

func (ss *session) closeConn(cause error) {
	var pe *protocol.Error
	switch {
	case errors.As(cause, &pe):
		// Best effort: a slow consumer may not take even this.
		ss.write(&protocol.ServerMessage{Type: protocol.TypeError, Error: pe}, time.Second)
		ss.conn.Close(websocket.StatusPolicyViolation, closeReason(string(pe.Code)))
	case errors.Is(cause, errShutdown):
		ss.conn.Close(websocket.StatusGoingAway, "coordinator shutting down")
	case errors.Is(cause, errGraceful):
		ss.conn.Close(websocket.StatusNormalClosure, "goodbye")
	default:
		ss.conn.CloseNow()
	}
}

// closeReason bounds a WebSocket close reason (at most 123 bytes).
func closeReason(s string) string {
	if len(s) > 120 {
		return s[:120]
	}
	return s
}

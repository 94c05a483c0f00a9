// Package coordclient is the peer side of the coordination protocol, used by
// the workspace agent and by the laptop client alike: it keeps one
// WebSocket to the coordinator, reconnecting with backoff and jitter,
// republishes the latest node and re-opens tunnels after every reconnect,
// and hands what the coordinator says to a Handler.
package coordclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// Config says where the coordinator is and how to authenticate.
type Config struct {
	// URL is the coordinator's base URL, e.g. https://coord.example:8443.
	URL string
	// Token is an agent token (agt_...) or a user token (usr_...); the
	// coordinator derives the role from it.
	Token string
	// Role, when set, is the role this program means to take: the
	// coordinator refuses a token of the other kind for good
	// (protocol.CodeWrongRole) instead of letting it act as one.
	Role protocol.Role
	// Identity, for agents, signs the coordinator's challenge with the
	// agent's SSH host key (protocol version 3). Nil proves nothing: a
	// coordinator that pinned the agent's key then refuses it.
	Identity func(challenge string) (*protocol.AgentIdentity, error)
	// Fingerprint pins the coordinator's certificate (hex SHA-256 of its
	// DER encoding). Empty: verify with the system roots.
	Fingerprint string
	// InsecureHTTP allows an http:// URL, sending the token in cleartext.
	// Without it such a URL is refused before anything is sent.
	InsecureHTTP bool
	Logger       *slog.Logger
	// Software names this program in the coordinator's logs.
	Software string

	// MinBackoff and MaxBackoff bound the wait between reconnects
	// (defaults DefaultMinBackoff and DefaultMaxBackoff); each wait is drawn
	// at random from the upper half of the current step, so peers restarted
	// together spread out.
	MinBackoff, MaxBackoff time.Duration
	// PingInterval is how often the connection is checked (default 15s).
	PingInterval time.Duration
	// OnRetry, when set, is told why each connection attempt (or
	// connection) ended and how long Run waits before the next one, so
	// that a command can say what it is waiting for instead of logging.
	OnRetry func(err error, wait time.Duration)
}

// Handler receives what the coordinator says, in order, on one goroutine.
// Methods must return promptly: the connection is not read meanwhile.
type Handler interface {
	// Hello starts every connection: the node ID and addresses to use.
	Hello(protocol.Hello)
	// PeerUpdate is a peer's current node (new or changed).
	PeerUpdate(protocol.Peer)
	// PeerGone: a peer left (see protocol.GoneReason for what to do).
	PeerGone(protocol.PeerGone)
	// TunnelStatus answers a granted AddTunnel.
	TunnelStatus(protocol.TunnelStatus)
	// Error reports an error the coordinator sent: a refused tunnel
	// (e.Agent set, not fatal) or the reason a connection is being closed.
	Error(protocol.Error)
	// Disconnected says a connection that had said hello ended; the
	// client reconnects unless the error is permanent.
	Disconnected(err error)
}

// HandlerFuncs implements Handler with optional functions.
type HandlerFuncs struct {
	OnHello        func(protocol.Hello)
	OnPeerUpdate   func(protocol.Peer)
	OnPeerGone     func(protocol.PeerGone)
	OnTunnelStatus func(protocol.TunnelStatus)
	OnError        func(protocol.Error)
	OnDisconnected func(error)
}

func (f HandlerFuncs) Hello(h protocol.Hello) {
	if f.OnHello != nil {
		f.OnHello(h)
	}
}

func (f HandlerFuncs) PeerUpdate(p protocol.Peer) {
	if f.OnPeerUpdate != nil {
		f.OnPeerUpdate(p)
	}
}

func (f HandlerFuncs) PeerGone(g protocol.PeerGone) {
	if f.OnPeerGone != nil {
		f.OnPeerGone(g)
	}
}

func (f HandlerFuncs) TunnelStatus(t protocol.TunnelStatus) {
	if f.OnTunnelStatus != nil {
		f.OnTunnelStatus(t)
	}
}

func (f HandlerFuncs) Error(e protocol.Error) {
	if f.OnError != nil {
		f.OnError(e)
	}
}

func (f HandlerFuncs) Disconnected(err error) {
	if f.OnDisconnected != nil {
		f.OnDisconnected(err)
	}
}

// PermanentError is returned by Run when retrying cannot help: the token is
// missing, unknown, expired or revoked, or the versions do not match.
type PermanentError struct {
	Err *protocol.Error
}

func (e *PermanentError) Error() string {
	return "the coordinator refused this client: " + e.Err.Message + " (" + string(e.Err.Code) + ")"
}

func (e *PermanentError) Unwrap() error { return e.Err }

// Client is a coordination connection that keeps itself up.
type Client struct {
	cfg    Config
	h      Handler
	logger *slog.Logger

	mu          sync.Mutex
	node        *tailnet.Node
	nodeVersion uint64
	// tunnels are the wanted tunnels; each AddTunnel bumps the number, so a
	// repeated request is sent again.
	tunnels   map[string]uint64
	tunnelGen uint64
	// sentTunnels are the requests sent on the current connection.
	sentTunnels map[string]uint64
	resumeToken string
	kick        chan struct{}

	// network is the agent's latest network verdict and networkVersion
	// counts ReportNetwork calls; networkHistory holds the verdicts before
	// it, oldest first, bounded by protocol.MaxNetworkHistory.
	network        *protocol.NetworkVerdict
	networkVersion uint64
	networkHistory []protocol.NetworkVerdict
}

// Reconnect backoff defaults. The cap is low because the wait after the
// coordinator's return is at most one step: a peer must be back within 2 s
// of it, however long the outage was. A failed attempt against a
// coordinator that is down costs it nothing, and the jitter still spreads
// N peers' returns evenly over the last step (DefaultMaxBackoff/2 to
// DefaultMaxBackoff) instead of letting them arrive at once.
const (
	DefaultMinBackoff = 250 * time.Millisecond
	DefaultMaxBackoff = 1200 * time.Millisecond
)

// New returns a client; Run connects it.
func New(cfg Config, h Handler) *Client {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = cfg.MinBackoff
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = 15 * time.Second
	}
	if h == nil {
		h = HandlerFuncs{}
	}
	return &Client{cfg: cfg, h: h, logger: cfg.Logger.With("component", "coordclient"), kick: make(chan struct{}, 1), tunnels: map[string]uint64{}}
}

// UpdateNode publishes n (a copy is kept). Its ID and addresses must be
// those of the latest Hello; a node that does not match is held back until
// it does. The latest node is sent again after every reconnect.
func (c *Client) UpdateNode(n *tailnet.Node) {
	c.mu.Lock()
	c.node = n.Clone()
	c.nodeVersion++
	c.mu.Unlock()
	c.wake()
}

// ReportNetwork publishes the agent's network verdict (agents only; sent
// only to coordinators speaking protocol version 2); an invalid one is
// logged and dropped. Call it when the
// verdict changes; the latest one is sent again after every reconnect,
// together with the earlier ones kept here, so that a verdict reached while
// the coordinator was unreachable still gets there.
func (c *Client) ReportNetwork(v protocol.NetworkVerdict) {
	v = v.Fit()
	if err := v.Validate(); err != nil {
		// Sending it would cost the connection; the verdict is lost, not
		// the session.
		c.logger.Warn("not reporting an invalid network verdict", "err", err)
		return
	}
	c.mu.Lock()
	if c.network != nil {
		c.networkHistory = append(c.networkHistory, *c.network)
		if n := len(c.networkHistory) - protocol.MaxNetworkHistory; n > 0 {
			c.networkHistory = slices.Delete(c.networkHistory, 0, n)
		}
	}
	c.network = &v
	c.networkVersion++
	c.mu.Unlock()
	c.wake()
}

// AddTunnel asks for a tunnel to the named agent (clients only). It is
// re-requested after every reconnect until RemoveTunnel, or until the
// coordinator refuses it (Handler.Error with the agent's name); calling it
// again asks again.
func (c *Client) AddTunnel(agent string) {
	c.mu.Lock()
	c.tunnelGen++
	c.tunnels[agent] = c.tunnelGen
	c.mu.Unlock()
	c.wake()
}

// RemoveTunnel withdraws a tunnel.
func (c *Client) RemoveTunnel(agent string) {
	c.mu.Lock()
	delete(c.tunnels, agent)
	c.mu.Unlock()
	c.wake()
}

// refused forgets a tunnel the coordinator refused, unless it was asked for
// again after the refused request was sent.
func (c *Client) refused(agent string) {
	c.mu.Lock()
	if g, ok := c.tunnels[agent]; ok && g <= c.sentTunnels[agent] {
		delete(c.tunnels, agent)
	}
	c.mu.Unlock()
}

func (c *Client) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Run connects and keeps reconnecting until ctx ends (then it says goodbye,
// so peers learn this peer left on purpose, and returns ctx's error) or the
// coordinator refuses the credentials for good (*PermanentError).
func (c *Client) Run(ctx context.Context) error {
	wsURL, err := coordinateURL(c.cfg.URL, c.cfg.Fingerprint, c.cfg.InsecureHTTP)
	if err != nil {
		return err
	}
	if c.cfg.Token == "" {
		return &PermanentError{Err: &protocol.Error{Code: protocol.CodeTokenMissing,
			Message: "no token; run agent login, or set AGENT_TOKEN"}}
	}
	httpClient, err := HTTPClient(c.cfg.Fingerprint)
	if err != nil {
		return err
	}
	httpClient.Timeout = 0 // the WebSocket outlives any request timeout

	backoff := c.cfg.MinBackoff
	for {
		started := time.Now()
		helloed, err := c.session(ctx, wsURL, httpClient)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var perm *PermanentError
		if errors.As(err, &perm) {
			c.logger.Error("coordinator refused this client; not retrying", "err", err)
			return err
		}
		if helloed {
			c.h.Disconnected(err)
			if time.Since(started) > c.cfg.MaxBackoff {
				backoff = c.cfg.MinBackoff
			}
		}
		wait := jittered(backoff)
		var later *retryLaterError
		if errors.As(err, &later) && wait < later.after {
			// The coordinator said when: come back then, spread a little.
			wait = later.after + rand.N(later.after/4+1)
		}
		c.logger.Warn("waiting to reconnect to the coordinator", "url", c.cfg.URL, "in", wait.Round(time.Millisecond), "err", err)
		if c.cfg.OnRetry != nil {
			c.cfg.OnRetry(err, wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(backoff*2, c.cfg.MaxBackoff)
	}
}

// jittered draws a wait from the upper half of step.
func jittered(step time.Duration) time.Duration {
	return step/2 + rand.N(step/2+1)
}

func coordinateURL(base, fingerprint string, insecureHTTP bool) (string, error) {
	u, err := ParseURL(base, fingerprint, insecureHTTP)
	if err != nil {
		return "", err
	}
	u.Path = strings.TrimRight(u.Path, "/") + protocol.CoordinatePath
	u.RawQuery, u.Fragment = "", ""
	return u.String(), nil
}

// session runs one connection. helloed reports whether the coordinator
// said hello (the connection was really up).
func (c *Client) session(ctx context.Context, wsURL string, hc *http.Client) (helloed bool, err error) {
	dialCtx, cancelDial := context.WithTimeout(ctx, 30*time.Second)
	header := http.Header{"Authorization": {"Bearer " + c.cfg.Token}}
	if c.cfg.Role != "" {
		header.Set(protocol.RoleHeader, string(c.cfg.Role))
	}
	conn, resp, err := websocket.Dial(dialCtx, wsURL, &websocket.DialOptions{
		HTTPClient:   hc,
		HTTPHeader:   header,
		Subprotocols: protocol.Subprotocols(),
	})
	cancelDial()
	if err != nil {
		return false, dialError(err, resp)
	}
	defer conn.CloseNow()
	version := protocol.VersionOf(strings.ToLower(conn.Subprotocol()))
	if version == 0 {
		conn.Close(websocket.StatusProtocolError, "no subprotocol")
		return false, &PermanentError{Err: &protocol.Error{Code: protocol.CodeUnsupportedVer,
			Message: fmt.Sprintf("the coordinator accepted none of the protocols %s; upgrade it", strings.Join(protocol.Subprotocols(), ", "))}}
	}
	conn.SetReadLimit(protocol.MaxMessageSize)

	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	c.mu.Lock()
	resume := c.resumeToken
	c.mu.Unlock()
	ph := &protocol.PeerHello{Software: c.cfg.Software, ResumeToken: resume}
	if challenge := resp.Header.Get(protocol.ChallengeHeader); c.cfg.Identity != nil && version >= 3 && challenge != "" {
		id, err := c.cfg.Identity(challenge)
		if err != nil {
			conn.Close(websocket.StatusInternalError, "identity")
			return false, fmt.Errorf("proving this agent's identity: %w", err)
		}
		ph.Identity = id
	}
	if err := c.write(conn, version, &protocol.PeerMessage{Type: protocol.TypeHello, Hello: ph}); err != nil {
		return false, fmt.Errorf("sending hello: %w", err)
	}

	// Our reader: the first message must be hello.
	helloCtx, cancelHello := context.WithTimeout(sctx, 30*time.Second)
	m, err := c.read(helloCtx, conn, version) // a timeout here may close the connection: fine, it failed
	cancelHello()
	if err != nil {
		return false, c.sessionEnd(ctx, err)
	}
	if m.Type == protocol.TypeError {
		return false, c.gotError(m.Error)
	}
	if m.Type != protocol.TypeHello {
		conn.Close(websocket.StatusProtocolError, "expected hello")
		return false, fmt.Errorf("coordinator sent %q before hello; is it a coordinator of this protocol version?", m.Type)
	}
	hello := *m.Hello
	c.mu.Lock()
	if hello.ResumeToken != "" {
		c.resumeToken = hello.ResumeToken
	}
	c.mu.Unlock()
	c.logger.Info("connected to the coordinator", "url", c.cfg.URL, "protocol", version, "role", hello.Role, "name", hello.Name, "node_id", hello.NodeID, "addresses", hello.Addresses)
	c.h.Hello(hello)

	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		if err := c.writeLoop(sctx, conn, version, hello); err != nil {
			cancel(err)
		}
	}()
	go func() {
		defer wg.Done()
		c.pingLoop(sctx, conn, cancel)
	}()
	// Reads are ended by closing the connection, never by a context:
	// coder/websocket closes the connection when a Read's context ends,
	// which would leave no chance to say goodbye.
	go func() {
		defer wg.Done()
		<-sctx.Done()
		if ctx.Err() != nil {
			// Leaving on purpose: say goodbye so peers forget us at once.
			c.write(conn, version, &protocol.PeerMessage{Type: protocol.TypeDisconnect, Disconnect: &protocol.Disconnect{}})
			conn.Close(websocket.StatusNormalClosure, "goodbye")
			return
		}
		conn.CloseNow()
	}()
	err = c.readLoop(conn, version)
	cancel(err)
	wg.Wait()
	if cause := context.Cause(sctx); cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause
	}
	return true, c.sessionEnd(ctx, err)
}

// sessionEnd words the error a connection ended with.
func (c *Client) sessionEnd(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	switch websocket.CloseStatus(err) {
	case websocket.StatusGoingAway:
		return errors.New("the coordinator is shutting down")
	case websocket.StatusMessageTooBig:
		return fmt.Errorf("the coordinator closed the connection: message over %d bytes", protocol.MaxMessageSize)
	}
	return err
}

// gotError handles an error message; fatal ones become the session's end.
func (c *Client) gotError(e *protocol.Error) error {
	c.h.Error(*e)
	if e.Code.Permanent() {
		return &PermanentError{Err: e}
	}
	if e.Fatal {
		return fmt.Errorf("the coordinator closed the connection: %w", e)
	}
	return nil
}

func (c *Client) readLoop(conn *websocket.Conn, version int) error {
	for {
		m, err := c.read(context.Background(), conn, version)
		if err != nil {
			return err
		}
		switch m.Type {
		case protocol.TypeHello:
			conn.Close(websocket.StatusProtocolError, "hello twice")
			return errors.New("the coordinator sent hello twice")
		case protocol.TypePeer:
			c.h.PeerUpdate(*m.Peer)
		case protocol.TypePeerGone:
			c.h.PeerGone(*m.PeerGone)
		case protocol.TypeTunnelStatus:
			c.h.TunnelStatus(*m.TunnelStatus)
		case protocol.TypeError:
			if m.Error.Agent != "" && !m.Error.Fatal {
				c.logger.Warn("the coordinator refused a tunnel", "agent", m.Error.Agent, "code", m.Error.Code, "reason", m.Error.Message)
				c.refused(m.Error.Agent)
			}
			if err := c.gotError(m.Error); err != nil {
				return err
			}
		}
	}
}

func (c *Client) read(ctx context.Context, conn *websocket.Conn, version int) (*protocol.ServerMessage, error) {
	typ, data, err := conn.Read(ctx)
	if err != nil {
		return nil, err
	}
	if typ != websocket.MessageText {
		conn.Close(websocket.StatusUnsupportedData, "binary frame")
		return nil, errors.New("the coordinator sent a binary frame")
	}
	m, e := protocol.DecodeServer(version, data)
	if e != nil {
		conn.Close(websocket.StatusPolicyViolation, string(e.Code))
		return nil, fmt.Errorf("bad message from the coordinator: %w", e)
	}
	return m, nil
}

// write sends one message. Its timeout does not follow any session
// context, for the same reason reads don't (see session).
func (c *Client) write(conn *websocket.Conn, version int, m *protocol.PeerMessage) error {
	data, err := protocol.EncodePeer(version, m)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return conn.Write(wctx, websocket.MessageText, data)
}

// writeLoop sends the latest node, the wanted tunnels and the network
// verdict, now and whenever they change.
func (c *Client) writeLoop(ctx context.Context, conn *websocket.Conn, version int, hello protocol.Hello) error {
	var sentVersion, sentNetwork uint64
	historySent := false
	sentTunnels := map[string]uint64{}
	c.mu.Lock()
	c.sentTunnels = sentTunnels
	c.mu.Unlock()
	warnedMismatch := uint64(0)
	for {
		c.mu.Lock()
		node, nodeVersion := c.node.Clone(), c.nodeVersion
		wanted := maps.Clone(c.tunnels)
		var ns *protocol.NetworkStatus
		networkVersion := c.networkVersion
		if c.network != nil && networkVersion != sentNetwork && version >= 2 {
			ns = &protocol.NetworkStatus{Verdict: *c.network}
			if !historySent {
				ns.History = slices.Clone(c.networkHistory)
			}
		}
		c.mu.Unlock()

		if node != nil && nodeVersion != sentVersion {
			if err := nodeMatches(node, hello); err != nil {
				if warnedMismatch != nodeVersion {
					c.logger.Debug("holding back a node that does not match the assigned identity", "err", err)
					warnedMismatch = nodeVersion
				}
			} else {
				if err := c.write(conn, version, &protocol.PeerMessage{Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *node}}); err != nil {
					return fmt.Errorf("sending node: %w", err)
				}
				sentVersion = nodeVersion
			}
		}
		if ns != nil {
			if err := c.write(conn, version, &protocol.PeerMessage{Type: protocol.TypeNetworkStatus, NetworkStatus: ns}); err != nil {
				return fmt.Errorf("sending network status: %w", err)
			}
			sentNetwork, historySent = networkVersion, true
		}
		for _, a := range slices.Sorted(maps.Keys(wanted)) {
			if sentTunnels[a] == wanted[a] {
				continue
			}
			// Recorded before sending, so a refusal cannot overtake it.
			c.mu.Lock()
			sentTunnels[a] = wanted[a]
			c.mu.Unlock()
			if err := c.write(conn, version, &protocol.PeerMessage{Type: protocol.TypeTunnel, Tunnel: &protocol.TunnelRequest{Agent: a}}); err != nil {
				return fmt.Errorf("requesting tunnel to %s: %w", a, err)
			}
		}
		for a := range sentTunnels {
			if _, ok := wanted[a]; ok {
				continue
			}
			c.mu.Lock()
			delete(sentTunnels, a)
			c.mu.Unlock()
			if err := c.write(conn, version, &protocol.PeerMessage{Type: protocol.TypeUntunnel, Untunnel: &protocol.TunnelRequest{Agent: a}}); err != nil {
				return fmt.Errorf("removing tunnel to %s: %w", a, err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.kick:
		}
	}
}

func nodeMatches(n *tailnet.Node, h protocol.Hello) error {
	if n.ID != h.NodeID {
		return fmt.Errorf("node id %d, assigned %d", n.ID, h.NodeID)
	}
	for _, a := range n.Addresses {
		if !slices.Contains(h.Addresses, a) {
			return fmt.Errorf("address %v not assigned", a)
		}
	}
	return n.Validate()
}

func (c *Client) pingLoop(ctx context.Context, conn *websocket.Conn, cancel context.CancelCauseFunc) {
	t := time.NewTicker(c.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, done := context.WithTimeout(context.Background(), c.cfg.PingInterval)
		err := conn.Ping(pctx)
		done()
		if err != nil && ctx.Err() == nil {
			cancel(fmt.Errorf("the coordinator did not answer a ping within %s: %w", c.cfg.PingInterval, err))
			return
		}
	}
}

// retryLaterError is a refusal that says when to try again (HTTP 429 or
// 503 with Retry-After): the coordinator's per-token or per-address
// limits, or its shutdown.
type retryLaterError struct {
	err   error
	after time.Duration
}

func (e *retryLaterError) Error() string { return e.err.Error() }
func (e *retryLaterError) Unwrap() error { return e.err }

// dialError words a failed dial; a refusal of the token is permanent.
func dialError(err error, resp *http.Response) error {
	err = dialErrorText(err, resp)
	if resp == nil {
		return err
	}
	secs, perr := strconv.Atoi(resp.Header.Get("Retry-After"))
	switch {
	case resp.StatusCode == http.StatusTooManyRequests:
		if perr != nil || secs < 1 {
			secs = 1
		}
	case resp.StatusCode == http.StatusServiceUnavailable && perr == nil:
		// A coordinator shutting down (or starting) says when to come
		// back; a 503 without Retry-After (a proxy's) takes the backoff.
		secs = max(secs, 1)
	default:
		return err
	}
	return &retryLaterError{err: err, after: time.Duration(min(secs, 300)) * time.Second}
}

func dialErrorText(err error, resp *http.Response) error {
	var mm *MismatchError
	if errors.As(err, &mm) {
		return &PermanentError{Err: &protocol.Error{Code: CodeCertificateMismatch, Message: mm.Error()}}
	}
	if resp == nil {
		return fmt.Errorf("dialing the coordinator: %w", err)
	}
	var e protocol.Error
	if resp.Body != nil {
		body, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(body, &e) == nil && e.Code != "" {
			if e.Code.Permanent() {
				return &PermanentError{Err: &e}
			}
			return fmt.Errorf("the coordinator answered %s: %w", resp.Status, &e)
		}
	}
	return fmt.Errorf("the coordinator answered %s instead of a WebSocket upgrade (wrong URL, or a proxy in the way?): %w", resp.Status, err)
}

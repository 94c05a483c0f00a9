// Package client is the laptop side of the tailnet: it asks the coordinator
// for a tunnel to one workspace, brings up a userspace tailnet node that
// accepts no inbound flows, and dials the workspace's ports over it.
package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/internal/tailjoin"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// Config says how to reach the coordinator.
type Config struct {
	Coordinator coordclient.Config
	Logger      *slog.Logger
	// BlockDirect relays everything through DERP (process-wide; see
	// tailnet.Options.BlockDirect).
	BlockDirect bool
	// UnhealthyWait is how long Connect and the dials keep waiting for a
	// workspace that the coordinator reports offline, or whose agent
	// reports its network broken, before failing with that reason
	// (default 30 s; negative: until the context ends).
	UnhealthyWait time.Duration
	// Notify receives what a person should read, one plain sentence per
	// call, each state said once ("warning: workspace ... reports its
	// network degraded ..."). Nil: the sentences go to Logger as warnings.
	Notify func(string)
	// AnnounceRetries makes Notify say once when the coordinator cannot be
	// reached (and why) and once when it is reached again, for commands
	// that keep running (port-forward). One-shot commands leave it off
	// and report the last cause in their error instead.
	AnnounceRetries bool
}

const defaultUnhealthyWait = 30 * time.Second

// Workspace is an open tunnel to one workspace's agent.
type Workspace struct {
	name string
	log  *slog.Logger
	// join is the coordination connection and the tailnet node, with
	// the workspace's agent as its one peer.
	join *tailjoin.Joiner
	conn *tailnet.Conn // set once, when Connect has the node up

	// ended is closed when access to the workspace ended for good (see
	// Done); endErr says why.
	ended  chan struct{}
	endErr error
	// closing counts connections whose FIN is on its way (see
	// finishingConn); Close waits for them before the tailnet goes.
	closing sync.WaitGroup

	mu sync.Mutex
	// agent is the workspace's agent as last introduced (the joiner
	// installs it in the tailnet).
	agent     *protocol.Peer
	agentCh   chan struct{} // closed when the agent's node first arrives
	refused   error
	refusedCh chan struct{}
	// reachedAt is when WireGuard to the agent last proved itself; dials
	// within reachableFor of it skip the probe.
	reachedAt time.Time
	// status is what the coordinator last said about the agent, nil
	// before its first tunnel_status; changed is closed and replaced
	// whenever it changes.
	status  *protocol.TunnelStatus
	changed chan struct{}
	// warned is the state last warned about, so each is said once.
	warned        string
	unhealthyWait time.Duration

	coordURL        string
	notify          func(string)
	announceRetries bool
	// lastCoordErr is why the last attempt to reach the coordinator
	// failed (nil once it answered); coordDown is set while an announced
	// outage lasts.
	lastCoordErr error
	coordDown    bool
	helloed      bool
}

// reachableFor is how long a successful reachability probe is trusted. A
// forwarded port opens many connections; probing before each would add a
// round trip to every one.
const reachableFor = 10 * time.Second

// Connect asks the coordinator for a tunnel to the named workspace and waits
// until the workspace's node is known. It fails at once when the coordinator
// refuses (bad token, no such workspace, no grant). While the workspace is
// offline it says so in the log (with since when, and the agent's last
// network verdict) and keeps waiting, for Config.UnhealthyWait or until ctx
// is done, then fails with that reason. A workspace whose agent reports its
// network degraded or broken gets one warning in the log.
func Connect(ctx context.Context, cfg Config, workspace string) (*Workspace, error) {
	if err := protocol.ValidAgentName(workspace); err != nil {
		return nil, fmt.Errorf("workspace name %q: %w", workspace, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &Workspace{
		name:          workspace,
		log:           log,
		ended:         make(chan struct{}),
		agentCh:       make(chan struct{}),
		refusedCh:     make(chan struct{}),
		changed:       make(chan struct{}),
		unhealthyWait: cfg.UnhealthyWait,

		coordURL:        cfg.Coordinator.URL,
		notify:          cfg.Notify,
		announceRetries: cfg.AnnounceRetries,
	}
	if w.notify == nil {
		w.notify = func(msg string) { log.Warn(msg) }
	}
	if w.unhealthyWait == 0 {
		w.unhealthyWait = defaultUnhealthyWait
	}
	cc := cfg.Coordinator
	cc.Role = protocol.RoleClient
	cc.OnRetry = w.coordinatorRetry
	w.join = tailjoin.New(tailjoin.Options{
		Logger:      log,
		Coordinator: cc,
		Tailnet:     tailnet.Options{BlockDirect: cfg.BlockDirect},
		Hooks: tailjoin.Hooks{
			Hello: w.onHello,
			Want: func(p protocol.Peer) bool {
				return p.Role == protocol.RoleAgent && p.Name == w.name
			},
			Peer:         w.onAgent,
			Gone:         w.onAgentGone,
			TunnelStatus: w.onTunnelStatus,
			Error:        w.onError,
			Disconnected: func(err error) {
				w.log.Info("lost the coordinator; the tunnel stays up while it reconnects", "err", err)
			},
		},
	})
	// The coordination outlives Connect's ctx: it lasts until Close.
	w.join.Start(context.Background())

	fail := func(err error) (*Workspace, error) {
		w.Close()
		return nil, err
	}

	conn, _, err := w.join.Up(ctx, nil)
	if err != nil {
		if ctx.Err() != nil {
			return fail(w.coordinatorWaitError(ctx))
		}
		return fail(err)
	}
	w.conn = conn
	w.join.Coordinator().AddTunnel(workspace)

	waitCtx, stopWaiting := context.WithCancel(ctx)
	defer stopWaiting()
	gaveUp := make(chan string, 1)
	go w.giveUpWhenUnhealthy(waitCtx, func(problem string) { gaveUp <- problem })

	select {
	case <-ctx.Done():
		if problem := w.problem(); problem != "" {
			return fail(fmt.Errorf("workspace %q did not come online: %s: %w", workspace, problem, context.Cause(ctx)))
		}
		return fail(fmt.Errorf("waiting for workspace %q to come online: %w", workspace, context.Cause(ctx)))
	case problem := <-gaveUp:
		return fail(fmt.Errorf("workspace %q did not come online (waited %s): %s", workspace, w.unhealthyWait, problem))
	case <-w.refusedCh:
		return fail(w.refused)
	case <-w.join.Ended():
		return fail(fmt.Errorf("coordinator at %s: %w", cc.URL, w.join.Err()))
	case <-w.agentCh:
	}
	go w.watchCoordinator()
	return w, nil
}

// watchCoordinator ends access when the coordinator refuses this client
// for good (its token revoked or expired, its user deleted). Any other
// failure is a blip: the tunnel stays while the client reconnects.
func (w *Workspace) watchCoordinator() {
	<-w.join.Ended()
	var perm *coordclient.PermanentError
	if err := w.join.Err(); errors.As(err, &perm) {
		w.end(perm.Err.Message)
	}
}

// end records that access to the workspace ended, for the reason given
// (one line from the coordinator), and removes the workspace's node.
func (w *Workspace) end(why string) {
	w.mu.Lock()
	if w.endErr != nil {
		w.mu.Unlock()
		return
	}
	w.endErr = &AccessEndedError{Workspace: w.name, Reason: why}
	agent := w.agent
	w.mu.Unlock()
	if agent != nil {
		w.join.Remove(agent.Node.ID)
	}
	w.log.Debug("access to the workspace ended", "workspace", w.name, "reason", why)
	close(w.ended)
}

// AccessEndedError says that an access decision (a revoked or expired
// token, a withdrawn grant, a deleted user or workspace) ended the tunnel.
type AccessEndedError struct {
	Workspace string
	// Reason is the coordinator's one line: what happened, what to do.
	Reason string
}

func (e *AccessEndedError) Error() string {
	return fmt.Sprintf("access to workspace %q ended: %s", e.Workspace, e.Reason)
}

// Done is closed when access to the workspace ends for good: an access
// decision, not a network blip (a lost coordinator keeps the tunnel). Err
// then says why.
func (w *Workspace) Done() <-chan struct{} { return w.ended }

// Err is an *AccessEndedError once Done is closed, nil before.
func (w *Workspace) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.endErr
}

// Name is the workspace's name.
func (w *Workspace) Name() string { return w.name }

// Addr is the workspace agent's tailnet address.
func (w *Workspace) Addr() netip.Addr {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.agent == nil || len(w.agent.Node.Addresses) == 0 {
		return netip.Addr{}
	}
	return w.agent.Node.Addresses[0].Addr()
}

// Tailnet gives access to the underlying tailnet connection (status, ping).
func (w *Workspace) Tailnet() *tailnet.Conn { return w.conn }

// AwaitReachable waits until WireGuard to the workspace is up end to end.
// When the coordinator reports the workspace offline or its network broken,
// it gives up after Config.UnhealthyWait and the error says why.
func (w *Workspace) AwaitReachable(ctx context.Context) error {
	w.mu.Lock()
	recent := time.Since(w.reachedAt) < reachableFor
	w.mu.Unlock()
	if recent {
		return nil
	}
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	var gaveUp error
	go w.giveUpWhenUnhealthy(actx, func(problem string) {
		w.mu.Lock()
		gaveUp = fmt.Errorf("workspace %q is not reachable over the tailnet (waited %s): %s", w.name, w.unhealthyWait, problem)
		w.mu.Unlock()
		cancel()
	})
	if err := w.conn.AwaitReachable(actx, w.Addr()); err != nil {
		w.mu.Lock()
		defer w.mu.Unlock()
		if gaveUp != nil {
			return gaveUp
		}
		if ctx.Err() != nil {
			// The tailnet's error only says "deadline exceeded"; the
			// cause says whose deadline.
			err = context.Cause(ctx)
		}
		if problem := w.problemLocked(); problem != "" {
			return fmt.Errorf("waiting for workspace %q to answer over the tailnet: %s: %w", w.name, problem, err)
		}
		return fmt.Errorf("waiting for workspace %q to answer over the tailnet: %w", w.name, err)
	}
	w.mu.Lock()
	w.reachedAt = time.Now()
	w.mu.Unlock()
	return nil
}

// DialTCP connects to a TCP port of the workspace (its agent's own services
// on ports 1-9, its localhost on every other port).
func (w *Workspace) DialTCP(ctx context.Context, port uint16) (net.Conn, error) {
	if err := w.AwaitReachable(ctx); err != nil {
		return nil, err
	}
	c, err := w.conn.DialContextTCP(ctx, netip.AddrPortFrom(w.Addr(), port))
	if err != nil {
		if isRefused(err) {
			return nil, fmt.Errorf("nothing listens on port %d in workspace %q: %w", port, w.name, err)
		}
		return nil, fmt.Errorf("connect to port %d of workspace %q: %w", port, w.name, err)
	}
	return &finishingConn{Conn: c, w: w}, nil
}

// closeGrace bounds how long a closed connection waits for the workspace
// to answer its FIN, and so how long Close can be delayed by it.
const closeGrace = time.Second

// finishingConn ends a tailnet TCP connection so that the workspace learns
// of it: Close sends a FIN and, in the background, reads until the workspace
// closes its side too (at most closeGrace), and only then releases the
// connection. A client that exits right after closing used to tear the
// tailnet down before the FIN left, and the agent kept the session until
// keepalives gave up on it.
type finishingConn struct {
	net.Conn
	w    *Workspace
	once sync.Once
}

// CloseWrite half-closes the connection (sends a FIN).
func (c *finishingConn) CloseWrite() error {
	return c.Conn.(interface{ CloseWrite() error }).CloseWrite()
}

func (c *finishingConn) Close() error {
	c.once.Do(func() {
		cw, ok := c.Conn.(interface{ CloseWrite() error })
		if !ok || cw.CloseWrite() != nil {
			c.Conn.Close()
			return
		}
		c.w.closing.Add(1)
		go func() {
			defer c.w.closing.Done()
			defer c.Conn.Close()
			c.Conn.SetReadDeadline(time.Now().Add(closeGrace))
			buf := make([]byte, 4096)
			for {
				if _, err := c.Conn.Read(buf); err != nil {
					return
				}
			}
		}()
	})
	return nil
}

// DialUDP opens a UDP flow to a port of the workspace's localhost.
func (w *Workspace) DialUDP(ctx context.Context, port uint16) (net.Conn, error) {
	if err := w.AwaitReachable(ctx); err != nil {
		return nil, err
	}
	c, err := w.conn.DialContextUDP(ctx, netip.AddrPortFrom(w.Addr(), port))
	if err != nil {
		return nil, fmt.Errorf("open UDP to port %d of workspace %q: %w", port, w.name, err)
	}
	return c, nil
}

// Ping sends one disco ping to the workspace and reports the path it took.
func (w *Workspace) Ping(ctx context.Context) (tailnet.PingResult, error) {
	res, err := w.conn.Ping(ctx, w.Addr())
	if err != nil {
		if problem := w.problem(); problem != "" {
			return res, fmt.Errorf("%s: %w", problem, err)
		}
	}
	return res, err
}

// WhyNotDirect explains from both sides' measurements why the path to the
// workspace is relayed, and what to change (one finding per line).
func (w *Workspace) WhyNotDirect(ctx context.Context) []string {
	return w.conn.WhyNotDirect(ctx, w.Addr(), w.name)
}

// Network is the agent's latest network verdict as the coordinator passed
// it on (nil when it has none, or speaks protocol version 1).
func (w *Workspace) Network() *protocol.NetworkVerdict {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.status == nil || w.status.Network == nil {
		return nil
	}
	v := *w.status.Network
	return &v
}

// HTTPClient reaches the agent API on tailnet port 2 as http://agent/.
func (w *Workspace) HTTPClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return w.DialTCP(ctx, protocol.PortAPI)
			},
			MaxIdleConns:    2,
			IdleConnTimeout: 30 * time.Second,
		},
		Timeout: 30 * time.Second,
	}
}

// Close tears down the tunnel.
func (w *Workspace) Close() error {
	// Let closed connections' FINs reach the workspace first.
	w.closing.Wait()
	// Says goodbye to the coordinator and closes the tailnet.
	w.join.Close()
	return nil
}

func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || strings.Contains(err.Error(), "connection refused") || strings.Contains(err.Error(), "connection was refused")
}

// onHello says once that the coordinator answers again after an
// announced outage.
func (w *Workspace) onHello(protocol.Hello) {
	w.mu.Lock()
	recovered := w.coordDown
	w.coordDown, w.lastCoordErr, w.helloed = false, nil, true
	w.mu.Unlock()
	if recovered {
		w.notify(fmt.Sprintf("reached the coordinator at %s", w.coordURL))
	}
}

// onAgent hears the workspace agent's node, already in the tailnet (or
// to be installed with it).
func (w *Workspace) onAgent(p protocol.Peer) {
	w.mu.Lock()
	first := w.agent == nil
	w.agent = &p
	w.reachedAt = time.Time{}
	w.mu.Unlock()
	if first {
		close(w.agentCh)
	}
	// The coordinator relays an agent's node only while it is connected;
	// a version 1 coordinator sends no tunnel_status to say so.
	w.setStatus(func(cur *protocol.TunnelStatus) *protocol.TunnelStatus {
		if cur == nil || cur.Online {
			return nil
		}
		next := *cur
		next.Online, next.OfflineSince, next.OfflineReason = true, time.Time{}, ""
		return &next
	})
}

// onAgentGone hears that the workspace's agent left; unless it was only
// lost, the joiner has removed it from the tailnet.
func (w *Workspace) onAgentGone(_ protocol.Peer, g protocol.PeerGone) {
	w.mu.Lock()
	agent := w.agent
	w.mu.Unlock()
	if agent == nil || agent.Node.ID != g.NodeID {
		return
	}
	if g.Reason == protocol.GoneLost || g.Reason == protocol.GoneDisconnected {
		// Version 2 coordinators follow with a tunnel_status saying the
		// same; version 1 ones do not.
		w.setStatus(func(cur *protocol.TunnelStatus) *protocol.TunnelStatus {
			if cur == nil || !cur.Online {
				return nil
			}
			next := *cur
			next.Online, next.OfflineSince, next.OfflineReason = false, time.Now(), g.Reason
			return &next
		})
	}
	if g.Reason == protocol.GoneLost {
		// The data plane does not need the coordinator: keep the tunnel.
		w.log.Info("the workspace lost its coordinator connection; the tunnel stays up", "workspace", w.name)
		return
	}
	w.log.Info("the workspace left the tailnet", "workspace", w.name, "reason", g.Reason)
	w.notify(fmt.Sprintf("workspace %q left the tailnet (%s)", w.name, g.Reason))
}

func (w *Workspace) onTunnelStatus(s protocol.TunnelStatus) {
	if s.Agent != w.name {
		return
	}
	w.setStatus(func(*protocol.TunnelStatus) *protocol.TunnelStatus { return &s })
}

// setStatus replaces the agent's status with what update returns (given
// the current one, possibly nil), wakes whoever waits on it, and warns
// once about each new unhealthy state.
func (w *Workspace) setStatus(update func(*protocol.TunnelStatus) *protocol.TunnelStatus) {
	w.mu.Lock()
	next := update(w.status)
	if next == nil {
		w.mu.Unlock()
		return
	}
	w.status = next
	close(w.changed)
	w.changed = make(chan struct{})
	warning, key := w.warningLocked()
	say := warning != "" && key != w.warned
	w.warned = key
	w.mu.Unlock()
	if say {
		w.notify("warning: " + warning)
	}
}

func (w *Workspace) onError(e protocol.Error) {
	if e.Agent != "" && e.Agent != w.name {
		return
	}
	switch e.Code {
	case protocol.CodeForbidden, protocol.CodeNoSuchAgent:
		w.mu.Lock()
		if w.refused == nil {
			w.refused = fmt.Errorf("workspace %q: %s", w.name, e.Message)
			close(w.refusedCh)
		}
		connected := w.agent != nil
		w.mu.Unlock()
		// After the tunnel was up, a refusal is the coordinator taking
		// access away (grant withdrawn, workspace deleted).
		if connected {
			w.end(e.Message)
		}
	}
}

// coordinatorRetry hears why an attempt to reach the coordinator failed.
// It keeps the cause for the error a one-shot command ends with, and with
// AnnounceRetries says once that the coordinator is out of reach.
func (w *Workspace) coordinatorRetry(err error, _ time.Duration) {
	w.mu.Lock()
	w.lastCoordErr = err
	say := w.announceRetries && !w.coordDown
	if say {
		w.coordDown = true
	}
	established := w.helloed
	w.mu.Unlock()
	if !say {
		return
	}
	if established {
		w.notify(fmt.Sprintf("lost the coordinator at %s (%s); open connections keep working, retrying until it answers", w.coordURL, shortCause(err)))
		return
	}
	w.notify(fmt.Sprintf("cannot reach the coordinator at %s (%s); retrying until it answers", w.coordURL, shortCause(err)))
}

// coordinatorWaitError says that ctx ended while waiting for the
// coordinator's hello, with the last cause.
func (w *Workspace) coordinatorWaitError(ctx context.Context) error {
	w.mu.Lock()
	last := w.lastCoordErr
	w.mu.Unlock()
	cause := "no answer yet"
	if last != nil {
		cause = "last error: " + shortCause(last)
	}
	return fmt.Errorf("waiting for the coordinator at %s: %w; %s", w.coordURL, context.Cause(ctx), cause)
}

// shortCause words a failed dial by its network error alone ("dial tcp
// 192.0.2.1:443: connect: connection refused") when there is one: the
// layers around it (WebSocket, HTTP) repeat the URL and add nothing.
func shortCause(err error) string {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Error()
	}
	return err.Error()
}

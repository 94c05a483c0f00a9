// Package tailjoin joins this process to the tailnet through the
// coordinator: the start-up that the workspace agent and the laptop client
// share. It keeps the coordination connection up, waits for the
// coordinator's hello (our node ID, addresses and DERP map), brings up the
// tailnet node, publishes our node whenever it changes, and keeps the peers
// the coordinator introduces installed in it. What differs between the two
// sides (which peers belong, what is served on the node, what an access
// decision ends) comes in through Hooks.
//
// Peers are kept as desired state, one way for both sides: the coordinator
// may introduce a peer before the node exists (or while it is being built);
// when the node comes up it gets the peers as they are then, not a replay of
// what happened meanwhile, so a peer introduced and removed before is never
// installed.
package tailjoin

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// Options configure a Joiner.
type Options struct {
	Logger *slog.Logger
	// Coordinator says where to register and as whom (Role; an agent's
	// Identity; a client's OnRetry). Its Logger defaults to Logger.
	Coordinator coordclient.Config
	// Tailnet holds the node's own settings (ListenPort, AcceptInbound,
	// BlockDirect); NodeID, Addresses and DERPMap come from the hello.
	Tailnet tailnet.Options
	// LostGrace is how long a peer whose coordinator connection broke
	// ("lost", not "disconnected") stays installed: its tunnel works
	// without the coordinator. 0 keeps it until the coordinator says more.
	LostGrace time.Duration
	// MaxIdleLost caps the lost peers kept for their grace that have no
	// connection open on this node (Hooks.Busy); past it the one lost
	// longest ago is removed at once. A peer holds WireGuard state and
	// goroutines while installed, and clients killed in a loop would
	// otherwise pile up for the whole grace. Busy peers are always kept:
	// their sessions are what the grace is for. 0: no cap.
	MaxIdleLost int
	// CloseWait bounds how long Close waits for the goodbye to the
	// coordinator (default 2 s).
	CloseWait time.Duration
	Hooks     Hooks
}

// Hooks are where a role adds its own behaviour. Each is optional and is
// called without the Joiner's lock held, so it may call the Joiner.
type Hooks struct {
	// Hello hears every hello, the first and those after reconnects,
	// before the Joiner acts on it.
	Hello func(protocol.Hello)
	// Want says whether a peer the coordinator introduces belongs on this
	// node (nil: every one). A client wants only its workspace's agent.
	Want func(protocol.Peer) bool
	// Peer hears a wanted peer's node once it is installed (or, before
	// the node is up, recorded to be installed with it).
	Peer func(protocol.Peer)
	// Gone hears that the coordinator says a known peer left, with its
	// last node. A lost peer stays installed for LostGrace; for any other
	// reason it was removed already (and Removed heard it).
	Gone func(protocol.Peer, protocol.PeerGone)
	// Removed hears that a peer left the node: gone, its lost grace over
	// (or cut short by MaxIdleLost), or Remove.
	Removed func(protocol.Peer)
	// Busy says whether a peer has connections open on this node (nil:
	// none ever has); MaxIdleLost spares busy peers.
	Busy func(protocol.Peer) bool
	// TunnelStatus, Error and Disconnected pass on the coordination
	// client's messages (see coordclient.Handler).
	TunnelStatus func(protocol.TunnelStatus)
	Error        func(protocol.Error)
	Disconnected func(error)
}

// Joiner is one tailnet node joined through the coordinator.
type Joiner struct {
	opts  Options
	log   *slog.Logger
	coord *coordclient.Client

	helloCh chan protocol.Hello // the newest hello not yet acted on
	ended   chan struct{}       // closed when the coordination client stopped

	mu      sync.Mutex
	started bool
	closed  bool
	cancel  context.CancelFunc
	runCtx  context.Context
	err     error // why the coordination client stopped
	conn    *tailnet.Conn
	peers   map[tailnet.NodeID]*peer
	byAddr  map[netip.Addr]*peer
}

type peer struct {
	p         protocol.Peer
	lostTimer *time.Timer // set while the peer is lost and kept
	lostAt    time.Time
}

// New prepares a Joiner; Start connects it.
func New(opts Options) *Joiner {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.CloseWait <= 0 {
		opts.CloseWait = 2 * time.Second
	}
	j := &Joiner{
		opts:    opts,
		log:     opts.Logger,
		helloCh: make(chan protocol.Hello, 1),
		ended:   make(chan struct{}),
		peers:   make(map[tailnet.NodeID]*peer),
		byAddr:  make(map[netip.Addr]*peer),
	}
	cc := opts.Coordinator
	if cc.Logger == nil {
		cc.Logger = opts.Logger.With("component", "coordination")
	}
	j.coord = coordclient.New(cc, handler{j})
	return j
}

// Coordinator is the coordination client, for what only one role sends
// (a client's tunnel requests, an agent's network verdict).
func (j *Joiner) Coordinator() *coordclient.Client { return j.coord }

// Start runs the coordination connection in the background until ctx ends,
// Close is called, or the coordinator refuses us for good (see Ended).
func (j *Joiner) Start(ctx context.Context) {
	j.mu.Lock()
	if j.started {
		j.mu.Unlock()
		return
	}
	j.started = true
	ctx, j.cancel = context.WithCancel(ctx)
	j.runCtx = ctx
	j.mu.Unlock()
	go func() {
		err := j.coord.Run(ctx)
		j.mu.Lock()
		j.err = err
		j.mu.Unlock()
		close(j.ended)
	}()
}

// Up waits for the coordinator's first hello and brings up the tailnet node
// it describes: it publishes our node (now and on every change), runs mount
// (if not nil), installs the peers known so far, and follows later hellos (a
// new DERP map). mount is where a side puts what it serves on the node: it
// runs before any peer is installed, so that a peer's first packet finds it;
// its error stops Up. When ctx ends first Up returns ctx's cause; when the
// coordination stops first, why (a *coordclient.PermanentError inside).
func (j *Joiner) Up(ctx context.Context, mount func(*tailnet.Conn, protocol.Hello) error) (*tailnet.Conn, protocol.Hello, error) {
	j.mu.Lock()
	runCtx := j.runCtx
	j.mu.Unlock()
	if runCtx == nil {
		return nil, protocol.Hello{}, errors.New("tailjoin: Up before Start")
	}
	var hello protocol.Hello
	select {
	case <-ctx.Done():
		return nil, hello, context.Cause(ctx)
	case <-j.ended:
		return nil, hello, fmt.Errorf("coordinator at %s: %w", j.opts.Coordinator.URL, j.Err())
	case hello = <-j.helloCh:
	}

	topts := j.opts.Tailnet
	topts.NodeID, topts.Addresses, topts.DERPMap = hello.NodeID, hello.Addresses, hello.DERPMap
	if topts.Logger == nil {
		topts.Logger = j.log.With("component", "tailnet")
	}
	conn, err := tailnet.NewConn(topts)
	if err != nil {
		return nil, hello, fmt.Errorf("start the tailnet: %w", err)
	}
	conn.SetNodeCallback(j.coord.UpdateNode)
	j.coord.UpdateNode(conn.Node())
	if mount != nil {
		if err := mount(conn, hello); err != nil {
			conn.Close()
			return nil, hello, err
		}
	}

	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		conn.Close()
		return nil, hello, errors.New("tailjoin: closed while coming up")
	}
	j.conn = conn
	// Sorted, so that a log of refusals reads the same on every run.
	for _, pi := range slices.SortedFunc(maps.Values(j.peers), func(a, b *peer) int { return cmp.Compare(a.p.Node.ID, b.p.Node.ID) }) {
		j.installLocked(pi.p)
	}
	j.mu.Unlock()
	go j.followHellos(runCtx, conn)
	return conn, hello, nil
}

// Conn is the tailnet node once Up has installed the peers, nil before
// and after Close.
func (j *Joiner) Conn() *tailnet.Conn {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.conn
}

// Ended is closed when the coordination connection stopped for good: its
// context ended, Close, or a permanent refusal (Err says which).
func (j *Joiner) Ended() <-chan struct{} { return j.ended }

// Err is why the coordination connection stopped, nil while it runs.
func (j *Joiner) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

// Peer is the installed (or to be installed) peer with node ID id.
func (j *Joiner) Peer(id tailnet.NodeID) (protocol.Peer, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if pi, ok := j.peers[id]; ok {
		return pi.p, true
	}
	return protocol.Peer{}, false
}

// PeerByAddr is the peer holding tailnet address addr.
func (j *Joiner) PeerByAddr(addr netip.Addr) (protocol.Peer, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if pi, ok := j.byAddr[addr]; ok {
		return pi.p, true
	}
	return protocol.Peer{}, false
}

// Remove takes the peer with node ID id off the node until the coordinator
// introduces it again.
func (j *Joiner) Remove(id tailnet.NodeID) {
	j.mu.Lock()
	p, ok := j.removeLocked(id)
	j.mu.Unlock()
	if ok && j.opts.Hooks.Removed != nil {
		j.opts.Hooks.Removed(p)
	}
}

// Close stops the coordination connection (saying goodbye), closes the
// tailnet node, and waits at most CloseWait for the goodbye.
func (j *Joiner) Close() {
	j.mu.Lock()
	j.closed = true
	conn := j.conn
	j.conn = nil
	for _, pi := range j.peers {
		if pi.lostTimer != nil {
			pi.lostTimer.Stop()
		}
	}
	started, cancel := j.started, j.cancel
	j.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if conn != nil {
		conn.Close()
	}
	if started {
		select {
		case <-j.ended:
		case <-time.After(j.opts.CloseWait):
		}
	}
}

// followHellos applies what a coordinator says on later connections: the
// DERP map may have changed; our identity must not have.
func (j *Joiner) followHellos(ctx context.Context, conn *tailnet.Conn) {
	for {
		select {
		case <-ctx.Done():
			return
		case h := <-j.helloCh:
			if h.NodeID != conn.Node().ID {
				j.log.Error("the coordinator now gives this node a different node ID; keeping the old one until restart",
					"old", conn.Node().ID, "new", h.NodeID)
			}
			if h.DERPMap != nil {
				conn.SetDERPMap(h.DERPMap)
			}
			j.coord.UpdateNode(conn.Node())
		}
	}
}

// upsert records p as wanted and installs it if the node is up.
func (j *Joiner) upsert(p protocol.Peer) {
	p.Node = *p.Node.Clone()
	j.mu.Lock()
	pi, ok := j.peers[p.Node.ID]
	if ok {
		if pi.lostTimer != nil {
			pi.lostTimer.Stop()
			pi.lostTimer = nil
		}
		for _, pre := range pi.p.Node.Addresses {
			delete(j.byAddr, pre.Addr())
		}
	} else {
		pi = &peer{}
		j.peers[p.Node.ID] = pi
	}
	pi.p = p
	for _, pre := range p.Node.Addresses {
		j.byAddr[pre.Addr()] = pi
	}
	if j.conn != nil {
		j.installLocked(p)
	}
	j.mu.Unlock()
}

// installLocked puts p's node into the tailnet. The engine is told under
// the lock, so that installs and removals reach it in the order they were
// decided.
func (j *Joiner) installLocked(p protocol.Peer) {
	if err := j.conn.UpsertPeer(p.Node.Clone()); err != nil {
		j.log.Warn("peer refused by the tailnet", "peer", p.Name, "user", p.User, "err", err)
	}
}

func (j *Joiner) removeLocked(id tailnet.NodeID) (protocol.Peer, bool) {
	pi, ok := j.peers[id]
	if !ok {
		return protocol.Peer{}, false
	}
	if pi.lostTimer != nil {
		pi.lostTimer.Stop()
	}
	delete(j.peers, id)
	for _, pre := range pi.p.Node.Addresses {
		if j.byAddr[pre.Addr()] == pi {
			delete(j.byAddr, pre.Addr())
		}
	}
	if j.conn != nil {
		j.conn.RemovePeer(id)
	}
	return pi.p, true
}

// gone applies the coordinator's word that a peer left.
func (j *Joiner) gone(g protocol.PeerGone) {
	j.mu.Lock()
	pi, ok := j.peers[g.NodeID]
	if !ok {
		j.mu.Unlock()
		return
	}
	p := pi.p
	if g.Reason == protocol.GoneLost {
		// Traffic does not need the coordinator, and the peer will most
		// likely be back: keep the tunnel for a while.
		var evicted []protocol.Peer
		if j.opts.LostGrace > 0 && pi.lostTimer == nil {
			pi.lostAt = time.Now()
			pi.lostTimer = time.AfterFunc(j.opts.LostGrace, func() { j.lostGraceOver(g.NodeID, pi) })
			evicted = j.evictIdleLostLocked()
		}
		j.mu.Unlock()
		for _, e := range evicted {
			j.log.Info("removed a lost peer before its grace: too many lost peers without a connection", "peer", e.Name, "user", e.User, "max", j.opts.MaxIdleLost)
			if j.opts.Hooks.Removed != nil {
				j.opts.Hooks.Removed(e)
			}
		}
	} else {
		j.removeLocked(g.NodeID)
		j.mu.Unlock()
		if j.opts.Hooks.Removed != nil {
			j.opts.Hooks.Removed(p)
		}
	}
	if j.opts.Hooks.Gone != nil {
		j.opts.Hooks.Gone(p, g)
	}
}

// evictIdleLostLocked removes the longest-lost idle peers beyond
// MaxIdleLost and returns them. j.mu must be held; Busy is called under
// it, so it must not call the Joiner.
func (j *Joiner) evictIdleLostLocked() []protocol.Peer {
	if j.opts.MaxIdleLost <= 0 {
		return nil
	}
	var idle []*peer
	for _, pi := range j.peers {
		if pi.lostTimer != nil && (j.opts.Hooks.Busy == nil || !j.opts.Hooks.Busy(pi.p)) {
			idle = append(idle, pi)
		}
	}
	if len(idle) <= j.opts.MaxIdleLost {
		return nil
	}
	slices.SortFunc(idle, func(a, b *peer) int { return a.lostAt.Compare(b.lostAt) })
	var out []protocol.Peer
	for _, pi := range idle[:len(idle)-j.opts.MaxIdleLost] {
		if p, ok := j.removeLocked(pi.p.Node.ID); ok {
			out = append(out, p)
		}
	}
	return out
}

// lostGraceOver removes a lost peer that did not come back, unless it was
// introduced again meanwhile (a new record).
func (j *Joiner) lostGraceOver(id tailnet.NodeID, pi *peer) {
	j.mu.Lock()
	if cur, ok := j.peers[id]; !ok || cur != pi || j.closed {
		j.mu.Unlock()
		return
	}
	p, _ := j.removeLocked(id)
	j.mu.Unlock()
	if j.opts.Hooks.Removed != nil {
		j.opts.Hooks.Removed(p)
	}
}

// handler receives the coordination client's messages.
type handler struct{ j *Joiner }

func (h handler) Hello(hello protocol.Hello) {
	if f := h.j.opts.Hooks.Hello; f != nil {
		f(hello)
	}
	// Keep only the newest hello waiting.
	select {
	case <-h.j.helloCh:
	default:
	}
	h.j.helloCh <- hello
}

func (h handler) PeerUpdate(p protocol.Peer) {
	hooks := h.j.opts.Hooks
	if hooks.Want != nil && !hooks.Want(p) {
		return
	}
	h.j.upsert(p)
	if hooks.Peer != nil {
		hooks.Peer(p)
	}
}

func (h handler) PeerGone(g protocol.PeerGone) { h.j.gone(g) }

func (h handler) TunnelStatus(s protocol.TunnelStatus) {
	if f := h.j.opts.Hooks.TunnelStatus; f != nil {
		f(s)
	}
}

func (h handler) Error(e protocol.Error) {
	if f := h.j.opts.Hooks.Error; f != nil {
		f(e)
	}
}

func (h handler) Disconnected(err error) {
	if f := h.j.opts.Hooks.Disconnected; f != nil {
		f(err)
	}
}

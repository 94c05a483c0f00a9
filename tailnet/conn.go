package tailnet

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go4.org/netipx"
	"tailscale.com/envknob"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/net/dns"
	"tailscale.com/net/netmon"
	"tailscale.com/net/netns"
	"tailscale.com/net/tsdial"
	"tailscale.com/tailcfg"
	"tailscale.com/tsd"
	"tailscale.com/types/ipproto"
	"tailscale.com/types/key"
	"tailscale.com/types/netmap"
	"tailscale.com/types/nettype"
	"tailscale.com/types/views"
	"tailscale.com/wgengine"
	"tailscale.com/wgengine/filter"
	"tailscale.com/wgengine/magicsock"
	"tailscale.com/wgengine/netstack"
	"tailscale.com/wgengine/router"
	"tailscale.com/wgengine/wgcfg"
)

// Options configure a Conn.
type Options struct {
	// Logger receives our logs; Tailscale's own chatter goes to it at
	// debug level. Nil discards.
	Logger *slog.Logger
	// NodeID is our node's ID, assigned by the coordinator. Not zero.
	NodeID NodeID
	// Addresses are our tailnet addresses as single-host prefixes (the
	// coordinator assigns them, e.g. IPv6 ULA /128s).
	Addresses []netip.Prefix
	// DERPMap lists the relays. Required: without a home relay, peers cannot
	// find us.
	DERPMap *DERPMap
	// ListenPort is the UDP port for WireGuard and disco; 0 picks one.
	ListenPort uint16
	// AcceptInbound lets peers open new TCP/UDP flows to us (an agent).
	// When false (a client), only replies to flows we opened get in, and
	// peers punch the direct path first: see holdPeerEndpoints.
	AcceptInbound bool
	// BlockDirect makes all traffic go through DERP. Tailscale only offers
	// this as a process-wide switch (TS_DEBUG_ALWAYS_USE_DERP), so once one
	// Conn in a process sets it, every Conn created afterwards in the
	// process relays too; it is never switched off again. It also raises
	// the tailnet MTU of those Conns to derpOnlyMTU (TS_DEBUG_MTU, unless
	// the environment sets it), which makes relayed transfers several
	// times faster.
	BlockDirect bool
	// PrivateKey ("privkey:<hex>") keeps a node key across restarts; empty
	// means a fresh key.
	PrivateKey string
}

// derpOnlyMTU is the tailnet MTU when no direct UDP path can exist. It is
// a jumbo frame rather than DERP's 64 KiB limit, to bound what the relay
// queues per client (512 packets).
const derpOnlyMTU = 9000

// PingResult is the outcome of a disco ping.
type PingResult struct {
	Latency time.Duration
	// Endpoint is the peer's UDP address when the pong came directly.
	Endpoint netip.AddrPort
	// DERPRegionID and DERPRegionCode name the relay when it did not.
	DERPRegionID   int
	DERPRegionCode string
}

// Direct reports whether the pong came over a direct UDP path.
func (r PingResult) Direct() bool { return r.Endpoint.IsValid() }

// PeerStatus describes one peer as the engine sees it.
type PeerStatus struct {
	ID        NodeID
	Key       string
	Addresses []netip.Prefix
	// Path is "direct <ip:port>", "derp <region code>" or "" if unknown.
	Path          string
	RxBytes       int64
	TxBytes       int64
	LastHandshake time.Time
	Active        bool
}

// FlowHandlerFunc decides what to do with an inbound flow that no listener
// took: return a handler to take it, or ok=false to refuse it.
type FlowHandlerFunc func(src, dst netip.AddrPort) (handler func(net.Conn), ok bool)

type peer struct {
	node  *Node
	tsn   *tailcfg.Node
	key   key.NodePublic
	disco key.DiscoPublic
	// holdUntil, while set, is when the peer's endpoints are given to
	// magicsock at the latest; until then it knows only the peer's relay
	// (see holdPeerEndpoints).
	holdUntil time.Time
}

// holdPeerEndpoints is how long a client keeps a new (or restarted) peer's
// direct endpoints from magicsock unless a direct path forms first.
//
// Magicsock pings every endpoint it knows the moment the first packet goes
// out. A client's pings then reach the agent's NAT before the agent's own
// packets do; a router that accepts unsolicited UDP (a Kubernetes node
// masquerading its pods, INPUT policy accept) confirms a conntrack entry
// for that tuple, masquerade gives the agent's flow to the client another
// public port, and the client's router drops it: no direct path, ever, as
// every later ping keeps the bad entry alive. Without the endpoints the
// agent pings first, when it answers our first packet, and calls us through
// the relay (disco CallMeMaybe) with its endpoints; our pings then arrive as
// replies to the agent's flow on its router, and on a home router that
// drops unsolicited UDP nothing changes. After the hold the endpoints are
// given anyway, so a peer that never calls still gets today's attempt.
const holdPeerEndpoints = 5 * time.Second

// punchLead is how long an agent's first pings to a new client's endpoints
// lead its call-me-maybe to that client.
const punchLead = 30 * time.Millisecond

// Conn is a node on the tailnet: a userspace WireGuard engine with magicsock
// (disco, DERP, NAT traversal) and a gVisor TCP/IP stack. It needs no TUN
// device and no privileges.
type Conn struct {
	logger *slog.Logger
	opts   Options
	priv   key.NodePrivate
	self   *tailcfg.Node

	sys    *tsd.System
	netMon *netmon.Monitor
	dialer *tsdial.Dialer
	eng    wgengine.Engine
	mc     *magicsock.Conn
	ns     *netstack.Impl

	// configMu serialises changes that reach into the engine (peers,
	// filter, DERP map). It is never held while the engine calls back into
	// us; those callbacks take only mu.
	configMu sync.Mutex
	filt     *filter.Filter

	mu          sync.RWMutex
	peers       map[NodeID]*peer
	byKey       map[key.NodePublic]*peer
	byIP        map[netip.Addr]*peer
	derpMap     *DERPMap
	endpoints   []netip.AddrPort
	homeDERP    int
	homeDERPAt  time.Time
	asOf        time.Time
	nodeCB      func(*Node)
	nodeCBGen   int
	tcpFallback FlowHandlerFunc
	udpFallback FlowHandlerFunc
	closed      bool

	nodeNotify chan struct{}
	holdNotify chan struct{}
	closeCh    chan struct{}
	closeOnce  sync.Once
}

// blockDirectOnce guards Tailscale's process-wide knobs behind BlockDirect.
// They are package state of Tailscale's, read without a lock by every
// running Conn, so they may be written only once, before the first Conn
// that needs them, and never concurrently with another NewConn.
var blockDirectOnce sync.Once

func blockDirectForProcess() {
	if envknob.String("TS_DEBUG_ALWAYS_USE_DERP") != "true" {
		envknob.Setenv("TS_DEBUG_ALWAYS_USE_DERP", "true")
	}
	// With no UDP path, packets only travel inside DERP's TCP stream, so
	// the 1280-byte MTU kept for unknown UDP paths buys nothing, and DERP's
	// cost is per packet. Peers still limit what they receive through
	// TCP's MSS.
	if _, ok := envknob.LookupInt("TS_DEBUG_MTU"); !ok {
		envknob.Setenv("TS_DEBUG_MTU", strconv.Itoa(derpOnlyMTU))
	}
}

// NewConn starts a node. It turns off Tailscale's socket marking
// (netns.SetEnabled(false)) for the whole process: we install no routes, so
// there is no routing loop to prevent, and inside containers without
// CAP_NET_ADMIN the marking fails.
func NewConn(opts Options) (*Conn, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if opts.NodeID == 0 {
		return nil, errors.New("tailnet: node id is zero; the coordinator must assign one")
	}
	if len(opts.Addresses) == 0 {
		return nil, errors.New("tailnet: no tailnet address given; the coordinator must assign one")
	}
	for _, p := range opts.Addresses {
		if !p.IsValid() || !p.IsSingleIP() {
			return nil, fmt.Errorf("tailnet: address %v is not a single-host prefix (use /32 or /128)", p)
		}
	}
	if err := opts.DERPMap.Validate(); err != nil {
		return nil, fmt.Errorf("tailnet: %w", err)
	}
	priv := key.NewNode()
	if opts.PrivateKey != "" {
		if err := priv.UnmarshalText([]byte(opts.PrivateKey)); err != nil {
			return nil, fmt.Errorf("tailnet: private key: want \"privkey:<64 hex digits>\": %w", err)
		}
	}

	netns.SetEnabled(false)
	if opts.BlockDirect {
		blockDirectOnce.Do(blockDirectForProcess)
	}

	c := &Conn{
		logger:     logger,
		opts:       opts,
		priv:       priv,
		peers:      map[NodeID]*peer{},
		byKey:      map[key.NodePublic]*peer{},
		byIP:       map[netip.Addr]*peer{},
		derpMap:    opts.DERPMap.Clone(),
		nodeNotify: make(chan struct{}, 1),
		holdNotify: make(chan struct{}, 1),
		closeCh:    make(chan struct{}),
	}
	if err := c.start(); err != nil {
		c.closeEngine()
		return nil, err
	}
	go c.nodeLoop()
	go c.holdLoop()
	go c.pathLoop()
	return c, nil
}

func (c *Conn) logf(format string, args ...any) {
	c.logger.Debug(strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "tailscale")
}

func (c *Conn) start() error {
	logf := c.logf
	c.sys = tsd.NewSystem()
	bus := c.sys.Bus.Get()
	netMon, err := netmon.New(bus, logf)
	if err != nil {
		return fmt.Errorf("tailnet: network monitor: %w", err)
	}
	c.netMon = netMon
	c.dialer = &tsdial.Dialer{Logf: logf}
	c.dialer.SetBus(bus)

	eng, err := wgengine.NewUserspaceEngine(logf, wgengine.Config{
		EventBus:      bus,
		NetMon:        netMon,
		Dialer:        c.dialer,
		SetSubsystem:  c.sys.Set,
		ControlKnobs:  c.sys.ControlKnobs(),
		HealthTracker: c.sys.HealthTracker.Get(),
		Metrics:       c.sys.UserMetricsRegistry(),
		ListenPort:    c.opts.ListenPort,
	})
	if err != nil {
		return fmt.Errorf("tailnet: start WireGuard engine: %w", err)
	}
	c.eng = eng
	c.sys.Set(eng)
	c.mc = c.sys.MagicSock.Get()
	if !netMon.InterfaceState().AnyInterfaceUp() {
		// Only loopback (a laptop offline running agent dev): the engine
		// would pause magicsock as if offline, yet a coordinator and DERP
		// relay on this machine are reachable. Changes of the links later
		// set it as usual.
		c.mc.SetNetworkUp(true)
	}
	if envknob.Bool("TS_DEBUG_ALWAYS_USE_DERP") {
		// Set by BlockDirect, here or in an earlier Conn of the process.
		// Without UDP, the network check would wait 3 s for STUN answers
		// before measuring the relays over HTTPS, and the node has no home
		// relay (so no peer can reach it) until then. Measure over HTTPS
		// only, at once.
		c.mc.SetOnlyTCP443(true)
	}

	ns, err := netstack.Create(logf, c.sys.Tun.Get(), eng, c.mc, c.dialer, c.sys.DNSManager.Get(), c.sys.ProxyMapper())
	if err != nil {
		return fmt.Errorf("tailnet: start netstack: %w", err)
	}
	c.ns = ns
	ns.ProcessLocalIPs = true
	installGROOneFlow(c.sys.Tun.Get())
	// Every flow not taken by a listener is decided here, and always
	// intercepted: netstack's default would forward it to the host.
	ns.GetTCPHandlerForFlow = c.tcpFlow
	ns.GetUDPHandlerForFlow = c.udpFlow
	c.sys.Tun.Get().Start()
	c.sys.Set(ns)
	if err := ns.Start(nil); err != nil {
		return fmt.Errorf("tailnet: start netstack: %w", err)
	}

	c.self = &tailcfg.Node{
		ID:         tailcfg.NodeID(c.opts.NodeID),
		StableID:   tailcfg.StableNodeID(fmt.Sprint(c.opts.NodeID)),
		Key:        c.priv.Public(),
		DiscoKey:   c.mc.DiscoPublicKey(),
		Addresses:  slices.Clone(c.opts.Addresses),
		AllowedIPs: slices.Clone(c.opts.Addresses),
		Cap:        tailcfg.CurrentCapabilityVersion,
		Hostinfo:   (&tailcfg.Hostinfo{}).View(),
	}
	c.mc.SetNetInfoCallback(c.onNetInfo)
	eng.SetStatusCallback(c.onStatus)
	eng.SetPeerByIPPacketFunc(c.peerKeyForIP)
	eng.SetPeerConfigFunc(c.peerAllowedIPs)
	eng.SetPeerForIPFunc(c.peerForIP)

	eng.SetSelfNode(c.self.View())
	c.configMu.Lock()
	c.updateFilterLocked()
	c.configMu.Unlock()
	c.mc.SetDERPMap(c.derpMap.toTailcfg())
	if err := eng.Reconfig(
		&wgcfg.Config{PrivateKey: c.priv, Addresses: slices.Clone(c.opts.Addresses)},
		&router.Config{LocalAddrs: slices.Clone(c.opts.Addresses)},
		&dns.Config{},
	); err != nil {
		return fmt.Errorf("tailnet: configure WireGuard: %w", err)
	}
	c.mc.SetNetworkMap(c.self.View(), nil)
	c.homeOnlyRegion() // after Reconfig: the relay connection authenticates with our node key
	ns.UpdateNetstackIPs(&netmap.NetworkMap{SelfNode: c.self.View(), NodeKey: c.priv.Public()})
	return nil
}

// Node returns a copy of our current node description.
func (c *Conn) Node() *Node {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.nodeLocked()
}

func (c *Conn) nodeLocked() *Node {
	return &Node{
		ID:        c.opts.NodeID,
		Key:       c.priv.Public().String(),
		DiscoKey:  c.self.DiscoKey.String(),
		Addresses: slices.Clone(c.opts.Addresses),
		Endpoints: slices.Clone(c.endpoints),
		HomeDERP:  c.homeDERP,
		AsOf:      c.asOf,
	}
}

// PrivateKey returns our node key ("privkey:<hex>"), so a caller can keep
// it and pass it back in Options.PrivateKey after a restart.
func (c *Conn) PrivateKey() string {
	b, _ := c.priv.MarshalText()
	return string(b)
}

// Addresses returns our tailnet addresses.
func (c *Conn) Addresses() []netip.Prefix { return slices.Clone(c.opts.Addresses) }

// SetNodeCallback sets the function told about our node whenever its
// endpoints or home DERP change. It is first called once the home DERP is
// known (a node without one cannot be reached) and its relay has admitted
// us (or 2 s have passed), never while a lock is held,
// and never concurrently with itself. It may call Close; after Close it is
// not called again.
func (c *Conn) SetNodeCallback(fn func(*Node)) {
	c.mu.Lock()
	c.nodeCB = fn
	c.nodeCBGen++
	c.mu.Unlock()
	c.notifyNode()
}

func (c *Conn) notifyNode() {
	select {
	case c.nodeNotify <- struct{}{}:
	default:
	}
}

// nodeLoop delivers node changes to the callback from a single goroutine.
func (c *Conn) nodeLoop() {
	var last *Node
	lastGen := -1
	for {
		select {
		case <-c.closeCh:
			return
		case <-c.nodeNotify:
		}
		c.mu.RLock()
		cb, gen, closed := c.nodeCB, c.nodeCBGen, c.closed
		n := c.nodeLocked()
		homeAge := time.Since(c.homeDERPAt)
		c.mu.RUnlock()
		if closed {
			return
		}
		if cb == nil || n.HomeDERP == 0 {
			continue
		}
		// Hold the first report until the relay has admitted us (or a
		// while has passed): a peer's first handshake sent through DERP
		// before then is dropped, and WireGuard would retry it only after
		// 5 s.
		if last == nil && !c.derpConnected(n.HomeDERP) && homeAge < homeDERPGrace {
			time.AfterFunc(20*time.Millisecond, c.notifyNode)
			continue
		}
		// A new callback gets the current node even if it did not change.
		if last != nil && lastGen == gen && n.HomeDERP == last.HomeDERP && slices.Equal(n.Endpoints, last.Endpoints) {
			continue
		}
		cb(n)
		last, lastGen = n, gen
	}
}

// homeDERPGrace bounds how long the first node report waits for the home
// relay connection; after it the node is reported anyway (direct paths may
// still work).
const homeDERPGrace = 2 * time.Second

// derpConnected reports whether a frame has arrived from the region's
// relay, which happens only once it has admitted us.
func (c *Conn) derpConnected(region int) bool {
	return !c.sys.HealthTracker.Get().GetDERPRegionReceivedTime(region).IsZero()
}

func (c *Conn) onNetInfo(ni *tailcfg.NetInfo) {
	if ni == nil || ni.PreferredDERP == 0 {
		return
	}
	c.mu.Lock()
	if c.derpMap.regionCode(ni.PreferredDERP) == "" {
		// A network check that started before SetDERPMap can report a
		// region the map no longer has; magicsock keeps it until its next
		// periodic check. Measure again now instead of publishing it.
		closed := c.closed
		c.mu.Unlock()
		if !closed {
			go c.mc.ReSTUN("home-derp-not-in-map")
		}
		return
	}
	changed := c.homeDERP != ni.PreferredDERP
	if changed {
		c.homeDERP = ni.PreferredDERP
		c.homeDERPAt = time.Now()
		c.asOf = c.homeDERPAt
	}
	c.mu.Unlock()
	if changed {
		c.logger.Info("home DERP region", "region", ni.PreferredDERP)
		c.notifyNode()
	}
}

func (c *Conn) onStatus(st *wgengine.Status, err error) {
	if err != nil || st == nil {
		return
	}
	eps := make([]netip.AddrPort, 0, len(st.LocalAddrs))
	for _, ep := range st.LocalAddrs {
		if ep.Addr.IsValid() && !slices.Contains(eps, ep.Addr) {
			eps = append(eps, ep.Addr)
		}
	}
	slices.SortFunc(eps, func(a, b netip.AddrPort) int { return a.Compare(b) })
	if len(eps) > MaxNodeEndpoints {
		eps = eps[:MaxNodeEndpoints]
	}
	c.mu.Lock()
	changed := !slices.Equal(eps, c.endpoints)
	if changed {
		c.endpoints = eps
		c.asOf = time.Now()
	}
	c.mu.Unlock()
	if changed {
		c.notifyNode()
	}
}

// Engine callbacks: all backed by our peer table, under mu only.

func (c *Conn) peerKeyForIP(ip netip.Addr) (key.NodePublic, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if p, ok := c.byIP[ip]; ok {
		return p.key, true
	}
	return key.NodePublic{}, false
}

func (c *Conn) peerAllowedIPs(k key.NodePublic) ([]netip.Prefix, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if p, ok := c.byKey[k]; ok {
		return slices.Clone(p.node.Addresses), true
	}
	return nil, false
}

func (c *Conn) peerForIP(ip netip.Addr) (wgengine.PeerForIP, bool) {
	for _, a := range c.opts.Addresses {
		if a.Addr() == ip {
			return wgengine.PeerForIP{Node: c.self.View(), IsSelf: true, Route: a}, true
		}
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if p, ok := c.byIP[ip]; ok {
		return wgengine.PeerForIP{Node: p.tsn.View(), Route: netip.PrefixFrom(ip, ip.BitLen())}, true
	}
	return wgengine.PeerForIP{}, false
}

func (c *Conn) isPeerIP(ip netip.Addr) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	_, ok := c.byIP[ip]
	return ok
}

// UpsertPeer adds a peer or updates what we know about it. A peer whose
// disco key changed has restarted; its WireGuard session is reset so the
// next packet starts a fresh handshake.
func (c *Conn) UpsertPeer(n *Node) error {
	if n == nil {
		return errors.New("tailnet: peer node is nil")
	}
	if err := n.Validate(); err != nil {
		return fmt.Errorf("tailnet: peer %d: %w", n.ID, err)
	}
	if n.ID == c.opts.NodeID {
		return fmt.Errorf("tailnet: peer %d has our own node id", n.ID)
	}
	n = n.Clone()
	var nk key.NodePublic
	var dk key.DiscoPublic
	_ = nk.UnmarshalText([]byte(n.Key)) // checked by Validate
	_ = dk.UnmarshalText([]byte(n.DiscoKey))
	if nk == c.priv.Public() {
		return fmt.Errorf("tailnet: peer %d has our own node key", n.ID)
	}

	c.configMu.Lock()
	defer c.configMu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return net.ErrClosed
	}
	for _, a := range n.Addresses {
		for _, own := range c.opts.Addresses {
			if own.Addr() == a.Addr() {
				c.mu.Unlock()
				return fmt.Errorf("tailnet: peer %d claims our own address %v", n.ID, a.Addr())
			}
		}
		if other, ok := c.byIP[a.Addr()]; ok && other.node.ID != n.ID {
			c.mu.Unlock()
			return fmt.Errorf("tailnet: peer %d claims address %v, which belongs to peer %d", n.ID, a.Addr(), other.node.ID)
		}
	}
	// A key that moves to another node ID would be ignored by magicsock; the
	// old holder of the key is dropped first.
	var staleIDs []NodeID
	var staleKeys []key.NodePublic
	if other, ok := c.byKey[nk]; ok && other.node.ID != n.ID {
		staleIDs = append(staleIDs, other.node.ID)
		c.removeLocked(other)
	}
	old := c.peers[n.ID]
	resetSession := false
	filterChanged := old == nil || len(staleIDs) > 0 || !slices.Equal(old.node.Addresses, n.Addresses)
	if old != nil {
		if old.key != nk {
			staleIDs = append(staleIDs, old.node.ID)
			staleKeys = append(staleKeys, old.key)
		} else if old.disco != dk {
			// magicsock keeps the old path on a disco key change and
			// trusts it for seconds; a restarted peer is not there any
			// more, so its endpoint is rebuilt from scratch.
			resetSession = true
			staleIDs = append(staleIDs, old.node.ID)
		}
		c.removeLocked(old)
	}
	tsn := &tailcfg.Node{
		ID:         tailcfg.NodeID(n.ID),
		StableID:   tailcfg.StableNodeID(fmt.Sprint(n.ID)),
		Name:       fmt.Sprintf("node-%d", n.ID),
		Key:        nk,
		DiscoKey:   dk,
		Addresses:  slices.Clone(n.Addresses),
		AllowedIPs: slices.Clone(n.Addresses),
		Endpoints:  slices.Clone(n.Endpoints),
		HomeDERP:   n.HomeDERP,
		Cap:        tailcfg.CurrentCapabilityVersion,
		Hostinfo:   (&tailcfg.Hostinfo{}).View(),
	}
	p := &peer{node: n, tsn: tsn, key: nk, disco: dk}
	if !c.opts.AcceptInbound {
		switch {
		case old == nil || old.disco != dk:
			p.holdUntil = time.Now().Add(holdPeerEndpoints)
		default:
			p.holdUntil = old.holdUntil
		}
	}
	toMagicsock := c.magicsockViewLocked(p)
	c.peers[n.ID] = p
	c.byKey[nk] = p
	for _, a := range n.Addresses {
		c.byIP[a.Addr()] = p
	}
	c.mu.Unlock()

	for _, id := range staleIDs {
		c.mc.RemovePeer(tailcfg.NodeID(id))
	}
	for _, k := range staleKeys {
		c.eng.SyncDevicePeer(k)
	}
	c.mc.UpsertPeer(toMagicsock)
	if c.opts.AcceptInbound && len(n.Endpoints) > 0 && (old == nil || old.disco != dk || !slices.Equal(old.node.Endpoints, n.Endpoints)) {
		// Punch first (see holdPeerEndpoints). A disco ping now pings the
		// peer's endpoints at once, before anything makes magicsock call
		// the peer: its answer to the call must find our conntrack entry
		// already there. Then, once our relay has admitted us (before that
		// the call is lost, and magicsock repeats it only 5 s later), a
		// packet through WireGuard makes magicsock ping again and call the
		// peer with our endpoints, even when the peer itself sends only
		// disco pings. TSMP is answered by the peer's WireGuard layer.
		ip := n.Addresses[0].Addr()
		c.eng.Ping(ip, tailcfg.PingDisco, 0, func(*ipnstate.PingResult) {})
		go func() {
			if c.awaitHomeDERP(context.Background()) != nil {
				return
			}
			select {
			case <-time.After(punchLead):
			case <-c.closeCh:
				return
			}
			c.eng.Ping(ip, tailcfg.PingTSMP, 0, func(*ipnstate.PingResult) {})
		}()
	}
	if !p.holdUntil.IsZero() {
		select {
		case c.holdNotify <- struct{}{}:
		default:
		}
	}
	if resetSession {
		c.logger.Info("peer restarted (new disco key); resetting WireGuard session", "peer", n.ID)
		c.eng.ResetDevicePeer(nk)
	}
	c.eng.SyncDevicePeer(nk)
	if filterChanged {
		c.updateFilterLocked()
	}
	return nil
}

// magicsockViewLocked is the peer's node as magicsock may see it: without
// endpoints while they are held. c.mu must be held.
func (c *Conn) magicsockViewLocked(p *peer) tailcfg.NodeView {
	if p.holdUntil.IsZero() {
		return p.tsn.View()
	}
	held := *p.tsn
	held.Endpoints = nil
	return held.View()
}

// holdLoop gives held peers' endpoints to magicsock once their path is
// direct (the peer punched first) or their hold has run out.
func (c *Conn) holdLoop() {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-c.closeCh:
			return
		case <-c.holdNotify:
		}
		for c.releaseHeld() {
			select {
			case <-c.closeCh:
				return
			case <-tick.C:
			}
		}
	}
}

// releaseHeld releases the held peers that are due and reports whether
// any are still held.
func (c *Conn) releaseHeld() (stillHeld bool) {
	type heldPeer struct {
		p     *peer
		until time.Time
	}
	c.mu.RLock()
	var held []heldPeer
	for _, p := range c.peers {
		if !p.holdUntil.IsZero() {
			held = append(held, heldPeer{p, p.holdUntil})
		}
	}
	c.mu.RUnlock()
	if len(held) == 0 {
		return false
	}
	sb := &ipnstate.StatusBuilder{WantPeers: true}
	c.eng.UpdateStatus(sb)
	st := sb.Status()
	now := time.Now()
	for _, h := range held {
		p := h.p
		direct := false
		if ps, ok := st.Peer[p.key]; ok && ps != nil {
			direct = ps.CurAddr != ""
		}
		if !direct && now.Before(h.until) {
			stillHeld = true
			continue
		}
		c.configMu.Lock()
		c.mu.Lock()
		cur, ok := c.peers[p.node.ID]
		release := ok && cur == p && !c.closed
		if release {
			p.holdUntil = time.Time{}
		}
		c.mu.Unlock()
		if release {
			c.mc.UpsertPeer(p.tsn.View())
			c.logger.Debug("peer endpoints given to magicsock", "peer", p.node.ID, "direct_already", direct)
		}
		c.configMu.Unlock()
	}
	return stillHeld
}

// removeLocked drops p from the tables. c.mu must be held for writing.
func (c *Conn) removeLocked(p *peer) {
	delete(c.peers, p.node.ID)
	if c.byKey[p.key] == p {
		delete(c.byKey, p.key)
	}
	for _, a := range p.node.Addresses {
		if c.byIP[a.Addr()] == p {
			delete(c.byIP, a.Addr())
		}
	}
}

// RemovePeer forgets a peer: its WireGuard session ends and its addresses
// no longer pass the packet filter.
func (c *Conn) RemovePeer(id NodeID) {
	c.configMu.Lock()
	defer c.configMu.Unlock()
	c.mu.Lock()
	p, ok := c.peers[id]
	if ok {
		c.removeLocked(p)
	}
	closed := c.closed
	c.mu.Unlock()
	if !ok || closed {
		return
	}
	c.mc.RemovePeer(tailcfg.NodeID(id))
	c.eng.SyncDevicePeer(p.key)
	c.updateFilterLocked()
}

// updateFilterLocked installs a packet filter built from the peer table.
// Only our own addresses are local; with AcceptInbound, any known peer may
// open flows to them. configMu must be held.
func (c *Conn) updateFilterLocked() {
	var local netipx.IPSetBuilder
	for _, a := range c.opts.Addresses {
		local.AddPrefix(a)
	}
	localSet, _ := local.IPSet()
	var matches []filter.Match
	if c.opts.AcceptInbound {
		c.mu.RLock()
		var srcs []netip.Prefix
		for _, p := range c.peers {
			srcs = append(srcs, p.node.Addresses...)
		}
		c.mu.RUnlock()
		if len(srcs) > 0 {
			var dsts []filter.NetPortRange
			for _, a := range c.opts.Addresses {
				dsts = append(dsts, filter.NetPortRange{Net: a, Ports: filter.PortRange{First: 0, Last: 65535}})
			}
			matches = append(matches, filter.Match{
				IPProto: views.SliceOf([]ipproto.Proto{ipproto.TCP, ipproto.UDP, ipproto.ICMPv4, ipproto.ICMPv6}),
				Srcs:    srcs,
				Dsts:    dsts,
			})
		}
	}
	// Sharing state keeps the UDP flows we opened alive across updates.
	f := filter.New(matches, nil, localSet, nil, c.filt, c.logf)
	c.filt = f
	c.eng.SetFilter(f)
}

// homeOnlyRegion makes a map's only region our home at once. Magicsock
// would pick it too, but only after its network check, which waits 3 s for
// STUN answers when UDP is blocked before it measures the relays over
// HTTPS; until then nobody can reach us. (Without a control server,
// magicsock never moves an established home anyway.)
func (c *Conn) homeOnlyRegion() {
	c.mu.Lock()
	if len(c.derpMap.Regions) != 1 || c.closed {
		c.mu.Unlock()
		return
	}
	id := c.derpMap.Regions[0].ID
	changed := c.homeDERP != id
	c.mu.Unlock()
	if c.mc.ForceSetNearestDERP(id) != id {
		return
	}
	if changed {
		c.onNetInfo(&tailcfg.NetInfo{PreferredDERP: id})
	}
}

// SetDERPMap replaces the relay map.
func (c *Conn) SetDERPMap(m *DERPMap) {
	if err := m.Validate(); err != nil {
		c.logger.Warn("ignoring invalid DERP map", "err", err)
		return
	}
	c.configMu.Lock()
	defer c.configMu.Unlock()
	c.mu.Lock()
	c.derpMap = m.Clone()
	closed := c.closed
	homeGone := m.regionCode(c.homeDERP) == ""
	c.mu.Unlock()
	if closed {
		return
	}
	c.mc.SetDERPMap(m.toTailcfg())
	if homeGone {
		c.homeOnlyRegion()
		go c.recheckHome()
	}
}

// recheckHome re-measures while our home region is missing from the DERP
// map: a network check racing SetDERPMap can leave magicsock on the old
// region until its next periodic check, tens of seconds later.
func (c *Conn) recheckHome() {
	for _, wait := range []time.Duration{time.Second, 3 * time.Second, 10 * time.Second} {
		select {
		case <-time.After(wait):
		case <-c.closeCh:
			return
		}
		c.mu.RLock()
		ok := c.derpMap.regionCode(c.homeDERP) != ""
		c.mu.RUnlock()
		if ok {
			return
		}
		c.mc.ReSTUN("home-derp-not-in-map")
	}
}

// SetTCPFallback sets the decision for inbound TCP to ports nobody Listens
// on. Without one, or when it returns ok=false, the connection is reset.
func (c *Conn) SetTCPFallback(fn func(src, dst netip.AddrPort) (handler func(net.Conn), ok bool)) {
	c.mu.Lock()
	c.tcpFallback = fn
	c.mu.Unlock()
}

// SetUDPFallback sets the decision for inbound UDP flows. The handler gets
// a net.Conn connected to the sender. Without one, the flow is dropped.
func (c *Conn) SetUDPFallback(fn func(src, dst netip.AddrPort) (handler func(net.Conn), ok bool)) {
	c.mu.Lock()
	c.udpFallback = fn
	c.mu.Unlock()
}

func (c *Conn) tcpFlow(src, dst netip.AddrPort) (func(net.Conn), bool) {
	c.mu.RLock()
	fb := c.tcpFallback
	c.mu.RUnlock()
	if fb == nil {
		return nil, true
	}
	h, ok := fb(src, dst)
	if !ok || h == nil {
		return nil, true
	}
	return h, true
}

func (c *Conn) udpFlow(src, dst netip.AddrPort) (func(nettype.ConnPacketConn), bool) {
	c.mu.RLock()
	fb := c.udpFallback
	c.mu.RUnlock()
	if fb == nil {
		return nil, true
	}
	h, ok := fb(src, dst)
	if !ok || h == nil {
		return nil, true
	}
	return func(pc nettype.ConnPacketConn) { h(pc) }, true
}

// Listen accepts TCP connections to port on each of our tailnet addresses.
func (c *Conn) Listen(port uint16) (net.Listener, error) {
	if port == 0 {
		return nil, errors.New("tailnet: listen on port 0: choose a port")
	}
	if c.isClosed() {
		return nil, net.ErrClosed
	}
	var lns []net.Listener
	for _, a := range c.opts.Addresses {
		network := "tcp6"
		if a.Addr().Is4() {
			network = "tcp4"
		}
		ln, err := c.ns.ListenTCP(network, netip.AddrPortFrom(a.Addr(), port).String())
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("tailnet: listen on %v port %d: %w", a.Addr(), port, err)
		}
		lns = append(lns, ln)
	}
	return newMultiListener(lns, netip.AddrPortFrom(c.opts.Addresses[0].Addr(), port)), nil
}

func (c *Conn) isClosed() bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.closed
}

func (c *Conn) checkDst(dst netip.AddrPort) error {
	if c.isClosed() {
		return net.ErrClosed
	}
	if !dst.IsValid() {
		return fmt.Errorf("tailnet: %v is not a valid address and port", dst)
	}
	if !c.isPeerIP(dst.Addr()) {
		return fmt.Errorf("tailnet: no peer has address %v (has the coordinator told us about it?)", dst.Addr())
	}
	return nil
}

// DialContextTCP opens a TCP connection to a peer. The connection
// supports CloseWrite.
func (c *Conn) DialContextTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if err := c.checkDst(dst); err != nil {
		return nil, err
	}
	conn, err := c.ns.DialContextTCP(ctx, dst)
	if err != nil {
		return nil, fmt.Errorf("tailnet: dial tcp %v: %w", dst, err)
	}
	return conn, nil
}

// DialContextUDP opens a UDP flow to a peer.
func (c *Conn) DialContextUDP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if err := c.checkDst(dst); err != nil {
		return nil, err
	}
	conn, err := c.ns.DialContextUDP(ctx, dst)
	if err != nil {
		return nil, fmt.Errorf("tailnet: dial udp %v: %w", dst, err)
	}
	return conn, nil
}

// AwaitReachable returns once a TSMP ping to ip (answered by the peer's
// WireGuard and netstack) comes back. Call it before the first dial to a
// new or restarted peer. Pings go out on a short, growing interval, several
// in flight; and since WireGuard itself retries a lost handshake only after
// 5 s (a first handshake is easily lost while the peer's relay connection
// is still being set up), a peer without a live session by the next retry
// point (0.5 s, then 1, 2, 4 s later) is reset so the next ping starts a
// fresh handshake.
func (c *Conn) AwaitReachable(ctx context.Context, ip netip.Addr) error {
	c.mu.RLock()
	p, ok := c.byIP[ip]
	c.mu.RUnlock()
	if !ok {
		return fmt.Errorf("tailnet: no peer has address %v", ip)
	}
	pong := make(chan struct{}, 1)
	start := time.Now()
	delay := 50 * time.Millisecond
	resetAfter := 500 * time.Millisecond
	nextReset := start.Add(resetAfter)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("tailnet: %v not reachable: %w", ip, ctx.Err())
		case <-c.closeCh:
			return net.ErrClosed
		case <-pong:
			return nil
		case <-t.C:
		}
		if now := time.Now(); now.After(nextReset) {
			// A session younger than WireGuard's reject-after time is
			// alive and its pong merely slow: leave it alone.
			if hs := c.lastHandshake(p.key); hs.IsZero() || now.Sub(hs) > 3*time.Minute {
				c.logger.Debug("no WireGuard handshake yet; restarting it", "peer", p.node.ID, "waited", now.Sub(start).Round(time.Millisecond))
				c.eng.ResetDevicePeer(p.key)
			}
			resetAfter = min(resetAfter*2, 4*time.Second)
			nextReset = now.Add(resetAfter)
		}
		c.eng.Ping(ip, tailcfg.PingTSMP, 0, func(r *ipnstate.PingResult) {
			if r.Err == "" {
				select {
				case pong <- struct{}{}:
				default:
				}
			}
		})
		t.Reset(delay)
		delay = min(delay*3/2, time.Second)
	}
}

// lastHandshake is the time of the last completed WireGuard handshake with
// the peer, zero if none.
func (c *Conn) lastHandshake(k key.NodePublic) time.Time {
	sb := &ipnstate.StatusBuilder{WantPeers: true}
	c.eng.UpdateStatus(sb)
	if ps, ok := sb.Status().Peer[k]; ok && ps != nil {
		return ps.LastHandshake
	}
	return time.Time{}
}

// Ping sends a disco ping and reports the path the pong took.
func (c *Conn) Ping(ctx context.Context, ip netip.Addr) (PingResult, error) {
	if !c.isPeerIP(ip) {
		return PingResult{}, fmt.Errorf("tailnet: no peer has address %v", ip)
	}
	// A ping sent before our relay connection is up is lost, and its
	// caller would wait its whole timeout for nothing.
	if err := c.awaitHomeDERP(ctx); err != nil {
		return PingResult{}, fmt.Errorf("tailnet: ping %v: %w", ip, err)
	}
	// A ping or pong can be lost (a relay connection of the peer's just
	// being set up); rather than wait out the caller's whole timeout, ping
	// again every pingRetry and take the first answer.
	res := make(chan *ipnstate.PingResult, 1)
	send := func() {
		c.eng.Ping(ip, tailcfg.PingDisco, 0, func(r *ipnstate.PingResult) {
			select {
			case res <- r:
			default:
			}
		})
	}
	send()
	retry := time.NewTicker(pingRetry)
	defer retry.Stop()
	var r *ipnstate.PingResult
	for r == nil {
		select {
		case <-ctx.Done():
			return PingResult{}, fmt.Errorf("tailnet: ping %v: %w", ip, ctx.Err())
		case <-c.closeCh:
			return PingResult{}, net.ErrClosed
		case <-retry.C:
			send()
		case r = <-res:
		}
	}
	if r.Err != "" {
		return PingResult{}, fmt.Errorf("tailnet: ping %v: %s", ip, r.Err)
	}
	out := PingResult{
		Latency:        time.Duration(r.LatencySeconds * float64(time.Second)),
		DERPRegionID:   r.DERPRegionID,
		DERPRegionCode: r.DERPRegionCode,
	}
	if r.Endpoint != "" {
		ap, err := netip.ParseAddrPort(r.Endpoint)
		if err != nil {
			return PingResult{}, fmt.Errorf("tailnet: ping %v: engine reported endpoint %q: %w", ip, r.Endpoint, err)
		}
		out.Endpoint = ap
	}
	return out, nil
}

// pingRetry is how long Ping waits for a pong before pinging again.
const pingRetry = time.Second

// awaitHomeDERP returns once the home relay has admitted us, or after
// homeDERPGrace (direct paths may work without it).
func (c *Conn) awaitHomeDERP(ctx context.Context) error {
	deadline := time.Now().Add(homeDERPGrace)
	for {
		c.mu.RLock()
		home := c.homeDERP
		c.mu.RUnlock()
		if (home != 0 && c.derpConnected(home)) || time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the home relay: %w", ctx.Err())
		case <-c.closeCh:
			return net.ErrClosed
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// PeerStatus reports every peer's path and counters.
func (c *Conn) PeerStatus() []PeerStatus {
	sb := &ipnstate.StatusBuilder{WantPeers: true}
	c.eng.UpdateStatus(sb)
	st := sb.Status()
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]PeerStatus, 0, len(c.peers))
	for _, p := range c.peers {
		ps := PeerStatus{ID: p.node.ID, Key: p.node.Key, Addresses: slices.Clone(p.node.Addresses)}
		if s, ok := st.Peer[p.key]; ok && s != nil {
			switch {
			case s.CurAddr != "":
				ps.Path = "direct " + s.CurAddr
			case s.Relay != "":
				ps.Path = "derp " + s.Relay
			}
			ps.RxBytes, ps.TxBytes = s.RxBytes, s.TxBytes
			ps.LastHandshake = s.LastHandshake
			ps.Active = s.Active
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(a, b PeerStatus) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Close stops the engine. Open connections and listeners fail afterwards.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.configMu.Lock()
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		c.configMu.Unlock()
		// nodeLoop is not waited for: a callback may itself call Close.
		close(c.closeCh)
		c.closeEngine()
	})
	return nil
}

func (c *Conn) closeEngine() {
	if c.ns != nil {
		closeNetstack(c.ns)
	}
	if c.eng != nil {
		c.eng.Close()
		<-c.eng.Done()
	}
	if c.netMon != nil {
		c.netMon.Close()
	}
	if c.dialer != nil {
		c.dialer.Close()
	}
	if c.sys != nil {
		c.sys.Bus.Get().Close()
	}
}

// Engine setup: a Conn assembles Tailscale's userspace WireGuard engine,
// magicsock and gVisor netstack without a control server, and tears them
// down. The other files of Conn hold what the engine is then told and asked:
// peers.go (the peer table and packet filter), nodeloop.go (our own node and
// home relay), reach.go (pings and reachability) and flows.go (TCP and UDP
// in and out).

package tailnet

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/net/dns"
	"tailscale.com/net/netmon"
	"tailscale.com/net/netns"
	"tailscale.com/net/tsdial"
	"tailscale.com/tailcfg"
	"tailscale.com/tsd"
	"tailscale.com/types/key"
	"tailscale.com/types/netmap"
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
	// DeadPeerTimeout bounds how long an inbound TCP connection (Listen,
	// SetTCPFallback) stays open after its peer stopped answering without
	// closing it, e.g. a client killed with SIGKILL. Zero means
	// DefaultDeadPeerTimeout; negative leaves netstack's two hours.
	DeadPeerTimeout time.Duration
}

// derpOnlyMTU is the tailnet MTU when no direct UDP path can exist. It is
// a jumbo frame rather than DERP's 64 KiB limit, to bound what the relay
// queues per client (512 packets).
const derpOnlyMTU = 9000

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
	// timeWait lets new SYNs take over port pairs in TIME-WAIT.
	timeWait *timeWaitRecycler
	// outPacer bounds the packets WireGuard queues for sending.
	outPacer *outboundPacer

	// configMu serialises changes that reach into the engine (peers,
	// filter, DERP map). It is never held while the engine calls back into
	// us; those callbacks take only mu.
	configMu sync.Mutex
	filt     *filter.Filter
	// relayMap is the map magicsock holds: derpMap, except for regions
	// kept as they were (see keepWorkingRegions).
	relayMap *DERPMap

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
	if c.outPacer = installOutboundPacer(c.sys.Tun.Get(), c.mc); c.outPacer == nil {
		c.logger.Warn("tailnet: cannot read magicsock's send counters; WireGuard's outbound queue is unbounded and a fast sender may take much memory")
	}
	if c.timeWait = installTimeWaitRecycler(c.sys.Tun.Get(), ns); c.timeWait == nil {
		c.logger.Warn("tailnet: cannot reach netstack's TCP stack; a new connection that reuses a port pair in TIME-WAIT will stall")
	}
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
	c.relayMap = c.derpMap.Clone()
	c.mc.SetDERPMap(c.relayMap.toTailcfg())
	c.configMu.Unlock()
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

// PrivateKey returns our node key ("privkey:<hex>"), so a caller can keep
// it and pass it back in Options.PrivateKey after a restart.
func (c *Conn) PrivateKey() string {
	b, _ := c.priv.MarshalText()
	return string(b)
}

// Addresses returns our tailnet addresses.
func (c *Conn) Addresses() []netip.Prefix { return slices.Clone(c.opts.Addresses) }

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
		c.lingerOutbound()
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

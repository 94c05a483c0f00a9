package forwardclient

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/agentd/agent/internal/relay"
)

// Dialer reaches ports in one workspace. The tailnet client implements it;
// tests use anything that connects on loopback.
type Dialer interface {
	DialTCP(ctx context.Context, port uint16) (net.Conn, error)
	// DialUDP returns a connection that carries one datagram per Read and
	// Write to and from the workspace port.
	DialUDP(ctx context.Context, port uint16) (net.Conn, error)
}

// Options configures a Forwarder.
type Options struct {
	Dialer Dialer
	Logger *slog.Logger
	// Bind lists the local addresses for mappings that do not name their
	// own. Empty means 127.0.0.1, and ::1 as well when this machine has IPv6
	// loopback and the port is free there.
	Bind []netip.Addr
	// DialTimeout bounds reaching the workspace port for one connection.
	// Default 15 s.
	DialTimeout time.Duration
	// UDPIdleTimeout ends a UDP flow after this long without a datagram.
	// Default 60 s.
	UDPIdleTimeout time.Duration
	// BufferSize is the copy buffer per direction of a TCP connection.
	BufferSize int
	// Notify receives one-line messages meant for the person at the
	// terminal, such as "nothing listens on port 3000 in the workspace".
	Notify func(msg string)
}

// Active is a mapping with the local addresses it listens on.
type Active struct {
	Mapping Mapping
	Addrs   []netip.AddrPort
}

func (a Active) String() string {
	addrs := make([]string, len(a.Addrs))
	for i, ap := range a.Addrs {
		addrs[i] = ap.String()
	}
	return fmt.Sprintf("%s %s -> workspace port %d", a.Mapping.Network, strings.Join(addrs, ", "), a.Mapping.Remote)
}

// Forwarder owns the local listeners of a set of mappings.
type Forwarder struct {
	opts Options
	log  *slog.Logger
	pool *relay.BufferPool

	active []Active
	tcp    []tcpListener
	udp    []*udpListener

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	closed   bool
	serving  bool
	tcpCount int
}

type tcpListener struct {
	m  Mapping
	ln net.Listener
}

// Listen opens the local listeners for every mapping. Either all open or
// none stays open; the error names the local port that failed and what to
// do about it.
func Listen(opts Options, mappings []Mapping) (*Forwarder, error) {
	if opts.Dialer == nil {
		return nil, errors.New("forwardclient: Options.Dialer is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 15 * time.Second
	}
	if opts.UDPIdleTimeout <= 0 {
		opts.UDPIdleTimeout = 60 * time.Second
	}
	if opts.Notify == nil {
		opts.Notify = func(string) {}
	}
	if err := checkDuplicates(mappings); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &Forwarder{
		opts:   opts,
		log:    opts.Logger,
		pool:   relay.NewBufferPool(opts.BufferSize),
		ctx:    ctx,
		cancel: cancel,
		conns:  make(map[net.Conn]struct{}),
	}
	for _, m := range mappings {
		if err := f.open(m); err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

func checkDuplicates(mappings []Mapping) error {
	type key struct {
		network string
		bind    netip.Addr
		port    uint16
	}
	seen := make(map[key]bool)
	for _, m := range mappings {
		if m.Local == 0 {
			continue
		}
		k := key{m.Network, m.Bind, m.Local}
		if seen[k] {
			return fmt.Errorf("local %s port %d is given twice; each local port can forward to one workspace port", m.Network, m.Local)
		}
		seen[k] = true
	}
	return nil
}

// open binds one mapping on each of its addresses. The first address must
// bind; the implicit IPv6 loopback is best effort.
func (f *Forwarder) open(m Mapping) error {
	explicit := true
	var addrs []netip.Addr
	switch {
	case m.Bind.IsValid():
		addrs = []netip.Addr{m.Bind}
	case len(f.opts.Bind) > 0:
		addrs = f.opts.Bind
	default:
		addrs = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
		explicit = false
	}
	act := Active{Mapping: m}
	port := m.Local
	for i, a := range addrs {
		bound, err := f.bind(m, a, port)
		if err != nil {
			if i > 0 && !explicit {
				if errors.Is(err, syscall.EADDRINUSE) {
					f.opts.Notify(fmt.Sprintf("note: %s is in use by another program; forwarding on %s only",
						hostPort(a, port), act.Addrs[0]))
				} else {
					f.log.Debug("no IPv6 loopback listener", "port", port, "err", err)
				}
				continue
			}
			return bindError(m, a, port, err)
		}
		// With local port 0 every address gets the port the first one got.
		port = bound.Port()
		act.Addrs = append(act.Addrs, bound)
	}
	f.active = append(f.active, act)
	return nil
}

func (f *Forwarder) bind(m Mapping, a netip.Addr, port uint16) (netip.AddrPort, error) {
	network := m.Network + "4"
	if a.Is6() {
		network = m.Network + "6"
	}
	addr := hostPort(a, port)
	var lc net.ListenConfig
	if m.Network == "tcp" {
		ln, err := lc.Listen(f.ctx, network, addr)
		if err != nil {
			return netip.AddrPort{}, err
		}
		f.tcp = append(f.tcp, tcpListener{m: m, ln: ln})
		return ln.Addr().(*net.TCPAddr).AddrPort(), nil
	}
	pc, err := lc.ListenPacket(f.ctx, network, addr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	f.udp = append(f.udp, &udpListener{f: f, m: m, pc: pc.(*net.UDPConn), flows: make(map[netip.AddrPort]*udpFlow)})
	return pc.LocalAddr().(*net.UDPAddr).AddrPort(), nil
}

// bindError words a failed bind for the person who asked for it.
func bindError(m Mapping, a netip.Addr, port uint16, err error) error {
	where := hostPort(a, port)
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("local %s port %d on %s is already in use: choose another local port (for example %d:%d) or stop the program using it",
			m.Network, port, a, suggestPort(port), m.Remote)
	case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
		return fmt.Errorf("binding local %s port %d needs privileges (ports below 1024): choose a higher local port, for example %d:%d",
			m.Network, port, suggestPort(port), m.Remote)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("cannot listen on %s: %s is not an address of this machine; use --bind with a local address", where, a)
	default:
		return fmt.Errorf("cannot listen on %s (%s): %w", where, m.Network, err)
	}
}

func suggestPort(p uint16) uint16 {
	if p < 1024 {
		return 8000 + p
	}
	if p < 55536 {
		return p + 10000
	}
	return p - 10000
}

// Active lists the mappings and the addresses they listen on, in the order
// they were given.
func (f *Forwarder) Active() []Active { return f.active }

// Serve forwards connections and datagrams until ctx ends or Close is
// called, then closes everything and returns nil. It returns an error only
// if a listener fails for a reason other than being closed.
func (f *Forwarder) Serve(ctx context.Context) error {
	f.mu.Lock()
	if f.closed || f.serving {
		f.mu.Unlock()
		return errors.New("forwardclient: Serve called on a closed or already serving forwarder")
	}
	f.serving = true
	f.mu.Unlock()

	errc := make(chan error, len(f.tcp)+len(f.udp))
	for _, l := range f.tcp {
		go func() { errc <- f.acceptLoop(l) }()
	}
	for _, l := range f.udp {
		go func() { errc <- l.serve() }()
	}
	var first error
	pending := len(f.tcp) + len(f.udp)
	select {
	case <-ctx.Done():
	case <-f.ctx.Done():
	case err := <-errc:
		pending--
		first = err
	}
	f.Close()
	for ; pending > 0; pending-- {
		if err := <-errc; first == nil {
			first = err
		}
	}
	return first
}

func (f *Forwarder) acceptLoop(l tcpListener) error {
	backoff := 5 * time.Millisecond
	for {
		c, err := l.ln.Accept()
		if err != nil {
			if f.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors, for example: wait and keep serving
			// the connections that are already open.
			f.log.Warn("accept failed; retrying", "listener", l.ln.Addr(), "err", err, "in", backoff)
			select {
			case <-time.After(backoff):
			case <-f.ctx.Done():
				return nil
			}
			backoff = min(backoff*2, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		if !f.addConn(c) {
			c.Close()
			return nil
		}
		go f.forwardTCP(l.m, c)
	}
}

func (f *Forwarder) forwardTCP(m Mapping, local net.Conn) {
	defer f.doneConn(local)
	ctx, cancel := context.WithTimeout(f.ctx, f.opts.DialTimeout)
	remote, err := f.opts.Dialer.DialTCP(ctx, m.Remote)
	cancel()
	if err != nil {
		// Refuse the local client the way the workspace refused us, so it
		// fails at once instead of seeing a connection that says nothing.
		if tc, ok := local.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		local.Close()
		switch {
		case f.ctx.Err() != nil:
		case relay.IsRefused(err):
			f.opts.Notify(fmt.Sprintf("nothing listens on port %d in the workspace; refused the connection on %s", m.Remote, local.LocalAddr()))
		case relay.IsReset(err):
			// Not a closed port: something cut the connection while it was
			// being set up.
			f.opts.Notify(fmt.Sprintf("the connection to workspace port %d was reset while it was being set up; reset the connection on %s (if this repeats, check the path with agent ping)", m.Remote, local.LocalAddr()))
		case errors.Is(err, context.DeadlineExceeded):
			f.opts.Notify(fmt.Sprintf("workspace port %d did not answer within %s; is the workspace reachable? (try agent ping)", m.Remote, f.opts.DialTimeout))
		default:
			f.opts.Notify(fmt.Sprintf("cannot reach port %d in the workspace: %v", m.Remote, err))
		}
		return
	}
	if !f.addConn(remote) {
		remote.Close()
		local.Close()
		return
	}
	defer f.doneConn(remote)
	res := relay.Relay(local, remote, f.pool)
	f.log.Debug("connection ended", "mapping", m.String(), "out", res.AToB, "in", res.BToA, "err", res.Err)
}

func (f *Forwarder) addConn(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	f.tcpCount++
	f.wg.Add(1)
	return true
}

func (f *Forwarder) doneConn(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.tcpCount--
	f.mu.Unlock()
	f.wg.Done()
}

// Stats says how many TCP connections (both halves counted) and UDP flows
// are open now.
func (f *Forwarder) Stats() (tcpConns, udpFlows int) {
	f.mu.Lock()
	tcpConns = f.tcpCount
	f.mu.Unlock()
	for _, l := range f.udp {
		udpFlows += l.count()
	}
	return tcpConns, udpFlows
}

// Close stops listening, ends every forwarded connection and flow, and
// waits for them to finish.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		f.wg.Wait()
		return nil
	}
	f.closed = true
	f.cancel()
	conns := make([]net.Conn, 0, len(f.conns))
	for c := range f.conns {
		conns = append(conns, c)
	}
	f.mu.Unlock()
	for _, l := range f.tcp {
		l.ln.Close()
	}
	for _, l := range f.udp {
		l.close()
	}
	for _, c := range conns {
		c.Close()
	}
	f.wg.Wait()
	return nil
}

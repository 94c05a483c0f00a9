// Package portforward carries tailnet connections to ports the agent does not
// serve itself to the same port on the workspace's loopback interface, so a
// development server bound to 127.0.0.1 is reachable from a laptop, and lists
// the TCP ports that are listening in the workspace.
package portforward

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/agentd/agent/internal/relay"
	"github.com/agentd/agent/protocol"
)

// Options configures a Forwarder. The zero value works.
type Options struct {
	Logger *slog.Logger
	// DialTimeout bounds the dial to the workspace's loopback made before the
	// tailnet accepts a connection. Loopback refuses at once, so this only
	// matters when the workspace is overloaded. Default 2 s.
	DialTimeout time.Duration
	// UDPIdleTimeout ends a UDP flow after this long without a datagram in
	// either direction. Default 60 s.
	UDPIdleTimeout time.Duration
	// BufferSize is the copy buffer per direction of a TCP connection.
	// Default relay.DefaultBufferSize.
	BufferSize int
	// HandlerTimeout closes a dialled loopback connection when the tailnet
	// does not take it within this time (its handshake with the peer
	// failed). Default 30 s.
	HandlerTimeout time.Duration
	// ProcNet is where the kernel's socket tables are read to find whether a
	// UDP service is bound to IPv4 or only to IPv6 loopback. Default
	// "/proc/net".
	ProcNet string
}

// Stats counts the flows a Forwarder is carrying right now.
type Stats struct {
	TCP int `json:"tcp"`
	UDP int `json:"udp"`
}

// Forwarder hands tailnet flows to the workspace's loopback interface. Its
// TCP and UDP methods have the shape of the tailnet's fallback hooks.
type Forwarder struct {
	log   *slog.Logger
	opts  Options
	pool  *relay.BufferPool
	ctx   context.Context
	stop  context.CancelFunc
	flows sync.WaitGroup

	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{}
	stats  Stats
}

// New returns a Forwarder with opts' defaults filled in.
func New(opts Options) *Forwarder {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 2 * time.Second
	}
	if opts.UDPIdleTimeout <= 0 {
		opts.UDPIdleTimeout = 60 * time.Second
	}
	if opts.HandlerTimeout <= 0 {
		opts.HandlerTimeout = 30 * time.Second
	}
	if opts.ProcNet == "" {
		opts.ProcNet = "/proc/net"
	}
	ctx, stop := context.WithCancel(context.Background())
	return &Forwarder{
		log:   opts.Logger,
		opts:  opts,
		pool:  relay.NewBufferPool(opts.BufferSize),
		ctx:   ctx,
		stop:  stop,
		conns: make(map[net.Conn]struct{}),
	}
}

// Forwardable reports whether a tailnet port is forwarded to the workspace.
func Forwardable(port uint16) bool { return port > protocol.ReservedPorts }

// TCP decides what happens to an inbound TCP flow to dst. It connects to
// dst's port on the workspace's loopback (127.0.0.1, then [::1]) before
// answering, so that a port nobody listens on is refused at once
// (ok=false: the tailnet answers the SYN with a reset) instead of accepting
// and then hanging up. When the port answers, the returned handler carries
// the tailnet connection to it until both sides are done.
func (f *Forwarder) TCP(src, dst netip.AddrPort) (handler func(net.Conn), ok bool) {
	port := dst.Port()
	if !Forwardable(port) || f.isClosed() {
		return nil, false
	}
	local, err := f.dialLoopbackTCP(port)
	if err != nil {
		if relay.IsRefused(err) {
			f.log.Debug("workspace port closed", "port", port, "from", src)
		} else {
			f.log.Warn("cannot reach workspace port", "port", port, "from", src, "err", err)
		}
		return nil, false
	}
	if !f.add(local) {
		local.Close()
		return nil, false
	}
	// The tailnet calls the handler once its side of the handshake is done.
	// If that never happens, do not keep the loopback connection open.
	unused := time.AfterFunc(f.opts.HandlerTimeout, func() {
		if f.remove(local) {
			f.log.Warn("tailnet did not take a forwarded connection; closing it", "port", port, "from", src)
			local.Close()
		}
	})
	return func(remote net.Conn) {
		if !unused.Stop() {
			remote.Close()
			return
		}
		if !f.begin(&f.stats.TCP, local, remote) {
			local.Close()
			remote.Close()
			return
		}
		defer f.end(&f.stats.TCP, local, remote)
		start := time.Now()
		res := relay.Relay(remote, local, f.pool)
		f.log.Debug("forwarded connection ended", "port", port, "from", src,
			"in", res.AToB, "out", res.BToA, "duration", time.Since(start), "err", res.Err)
	}, true
}

func (f *Forwarder) dialLoopbackTCP(port uint16) (net.Conn, error) {
	d := net.Dialer{Timeout: f.opts.DialTimeout}
	p := strconv.Itoa(int(port))
	c, err := d.DialContext(f.ctx, "tcp4", net.JoinHostPort("127.0.0.1", p))
	if err == nil {
		return c, nil
	}
	if !relay.IsRefused(err) {
		return nil, err
	}
	// Some servers listen on IPv6 loopback only.
	c, err6 := d.DialContext(f.ctx, "tcp6", net.JoinHostPort("::1", p))
	if err6 == nil {
		return c, nil
	}
	if relay.IsRefused(err6) {
		return nil, err
	}
	// No IPv6 loopback here (or it failed otherwise): the IPv4 refusal is
	// the answer.
	return nil, err
}

// UDP decides what happens to an inbound UDP flow to dst. The handler is
// given a connection whose peer is src; it relays datagrams between it and
// dst's port on the workspace's loopback until the flow has been idle for
// Options.UDPIdleTimeout.
func (f *Forwarder) UDP(src, dst netip.AddrPort) (handler func(net.Conn), ok bool) {
	port := dst.Port()
	if !Forwardable(port) || f.isClosed() {
		return nil, false
	}
	return func(remote net.Conn) {
		local, err := f.dialLoopbackUDP(port)
		if err != nil {
			f.log.Warn("cannot open UDP socket toward workspace port", "port", port, "from", src, "err", err)
			remote.Close()
			return
		}
		if !f.begin(&f.stats.UDP, local, remote) {
			local.Close()
			remote.Close()
			return
		}
		defer f.end(&f.stats.UDP, local, remote)
		in, out := RelayDatagrams(remote, local, f.opts.UDPIdleTimeout)
		f.log.Debug("UDP flow ended", "port", port, "from", src, "datagrams_in", in, "datagrams_out", out)
	}, true
}

func (f *Forwarder) dialLoopbackUDP(port uint16) (net.Conn, error) {
	host := "127.0.0.1"
	// A UDP "connection" cannot be refused up front, so look in the socket
	// tables for a service bound only to IPv6 loopback.
	if v4, v6 := udpBound(f.opts.ProcNet, port); !v4 && v6 {
		host = "::1"
	}
	var d net.Dialer
	c, err := d.DialContext(f.ctx, "udp", net.JoinHostPort(host, strconv.Itoa(int(port))))
	if err != nil {
		return nil, fmt.Errorf("dial UDP %s port %d: %w", host, port, err)
	}
	return c, nil
}

// Stats returns how many flows are being forwarded now.
func (f *Forwarder) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// Close ends every forwarded flow and refuses new ones. It waits for the
// flows' handlers to return.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.stop()
	conns := make([]net.Conn, 0, len(f.conns))
	for c := range f.conns {
		conns = append(conns, c)
	}
	f.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	f.flows.Wait()
	return nil
}

func (f *Forwarder) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// add registers a connection that is not yet part of a running flow, so
// Close can end it.
func (f *Forwarder) add(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

// remove forgets a connection registered with add and reports whether it
// was still registered.
func (f *Forwarder) remove(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.conns[c]
	delete(f.conns, c)
	return ok
}

// begin registers a running flow and its connections; Close waits for the
// matching end.
func (f *Forwarder) begin(counter *int, conns ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		for _, c := range conns {
			delete(f.conns, c)
		}
		return false
	}
	for _, c := range conns {
		f.conns[c] = struct{}{}
	}
	*counter++
	f.flows.Add(1)
	return true
}

func (f *Forwarder) end(counter *int, conns ...net.Conn) {
	f.mu.Lock()
	for _, c := range conns {
		delete(f.conns, c)
	}
	*counter--
	f.mu.Unlock()
	f.flows.Done()
}

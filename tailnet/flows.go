// Flows: listening and dialing on the tailnet through netstack, and the
// caller's decisions for inbound flows nobody listens for.

package tailnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"tailscale.com/types/nettype"
)

// FlowHandlerFunc decides what to do with an inbound flow that no listener
// took: return a handler to take it, or ok=false to refuse it.
type FlowHandlerFunc func(src, dst netip.AddrPort) (handler func(net.Conn), ok bool)

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
	return func(nc net.Conn) {
		c.limitDeadPeer(nc)
		h(nc)
	}, true
}

// limitDeadPeer applies DeadPeerTimeout to an accepted connection.
func (c *Conn) limitDeadPeer(nc net.Conn) {
	if !limitDeadPeer(nc, c.opts.deadPeerTimeout()) {
		c.logger.Warn("cannot bound how long this connection outlives its peer; it ends only on netstack's 2 h keepalive", "remote", nc.RemoteAddr())
	}
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
	return newMultiListener(lns, netip.AddrPortFrom(c.opts.Addresses[0].Addr(), port), c.limitDeadPeer), nil
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

package agent

import (
	"errors"
	"net"
	"net/netip"
	"sync"
)

// flows tracks the tailnet connections each peer address holds (SSH
// connections, forwarded TCP and UDP flows), so that an access decision can
// end them at once: closing an SSH connection hangs up its sessions (SIGHUP,
// then SIGKILL after the SSH server's grace) and its forwards.
type flows struct {
	mu    sync.Mutex
	conns map[netip.Addr]map[*trackedConn]struct{}
}

func newFlows() *flows {
	return &flows{conns: map[netip.Addr]map[*trackedConn]struct{}{}}
}

type trackedConn struct {
	net.Conn
	f    *flows
	from netip.Addr
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.f.forget(c) })
	return c.Conn.Close()
}

// CloseWrite and SetLinger pass through, so half-closes and resets still
// reach the peer.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

func (c *trackedConn) SetLinger(sec int) error {
	if l, ok := c.Conn.(interface{ SetLinger(int) error }); ok {
		return l.SetLinger(sec)
	}
	return errors.New("connection has no linger setting")
}

func (f *flows) track(c net.Conn, from netip.Addr) net.Conn {
	tc := &trackedConn{Conn: c, f: f, from: from.Unmap()}
	f.mu.Lock()
	m := f.conns[tc.from]
	if m == nil {
		m = map[*trackedConn]struct{}{}
		f.conns[tc.from] = m
	}
	m[tc] = struct{}{}
	f.mu.Unlock()
	return tc
}

func (f *flows) forget(c *trackedConn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if m := f.conns[c.from]; m != nil {
		delete(m, c)
		if len(m) == 0 {
			delete(f.conns, c.from)
		}
	}
}

// closeFrom ends every connection from the addresses and reports how many.
func (f *flows) closeFrom(addrs ...netip.Addr) int {
	var victims []*trackedConn
	f.mu.Lock()
	for _, a := range addrs {
		for c := range f.conns[a.Unmap()] {
			victims = append(victims, c)
		}
	}
	f.mu.Unlock()
	for _, c := range victims {
		c.Close()
	}
	return len(victims)
}

// holds reports whether any connection from the addresses is open.
func (f *flows) holds(addrs ...netip.Addr) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range addrs {
		if len(f.conns[a.Unmap()]) > 0 {
			return true
		}
	}
	return false
}

// listener tracks each connection it accepts.
func (f *flows) listener(ln net.Listener) net.Listener { return &trackedListener{Listener: ln, f: f} }

type trackedListener struct {
	net.Listener
	f *flows
}

func (l *trackedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.f.track(c, addrOf(c.RemoteAddr())), nil
}

// handler tracks each flow a tailnet fallback handler takes.
func (f *flows) handler(fn func(src, dst netip.AddrPort) (func(net.Conn), bool)) func(src, dst netip.AddrPort) (func(net.Conn), bool) {
	return func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		h, ok := fn(src, dst)
		if !ok {
			return nil, false
		}
		return func(c net.Conn) { h(f.track(c, src.Addr())) }, true
	}
}

// addrOf is the IP of a tailnet connection's remote address.
func addrOf(remote net.Addr) netip.Addr {
	var ip netip.Addr
	switch ad := remote.(type) {
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(ad.IP)
	case *net.UDPAddr:
		ip, _ = netip.AddrFromSlice(ad.IP)
	default:
		if ap, err := netip.ParseAddrPort(remote.String()); err == nil {
			ip = ap.Addr()
		}
	}
	return ip.Unmap()
}

package agent

import (
	"net"
	"net/netip"
	"sync"

	"github.com/agentd/agent/metrics"
)

// counted wraps a tailnet flow handler so that each flow it takes is counted
// as a connection of kind, with its bytes.
func (a *Agent) counted(kind metrics.Kind, fn func(src, dst netip.AddrPort) (func(net.Conn), bool)) func(src, dst netip.AddrPort) (func(net.Conn), bool) {
	return func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		h, ok := fn(src, dst)
		if !ok {
			return nil, false
		}
		return func(c net.Conn) {
			closed := a.metrics.ConnectionOpened(kind)
			defer closed()
			cc := &countingConn{Conn: c}
			defer func() {
				a.metrics.AddBytes(kind, metrics.DirectionIn, cc.in)
				a.metrics.AddBytes(kind, metrics.DirectionOut, cc.out)
			}()
			h(cc)
		}, true
	}
}

// countingConn counts the bytes of one connection. The counts are read only
// after the handler returned, when nothing else touches them; the mutex
// covers the two directions running on different goroutines.
type countingConn struct {
	net.Conn
	mu      sync.Mutex
	in, out int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.in += int64(n)
	c.mu.Unlock()
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.mu.Lock()
	c.out += int64(n)
	c.mu.Unlock()
	return n, err
}

// CloseWrite keeps half-close working through the wrapper.
func (c *countingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// countingListener counts accepted connections until they close.
type countingListener struct {
	net.Listener
	opened func() (closed func())
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &closeHookConn{Conn: c, onClose: l.opened()}, nil
}

type closeHookConn struct {
	net.Conn
	once    sync.Once
	onClose func()
}

func (c *closeHookConn) Close() error {
	c.once.Do(c.onClose)
	return c.Conn.Close()
}

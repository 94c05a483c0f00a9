package tailnet

import (
	"net"
	"net/netip"
	"sync"
)

// multiListener merges the per-address netstack listeners behind one
// net.Listener, and turns "accept after close" into net.ErrClosed so
// servers built on it stop quietly.
type multiListener struct {
	lns   []net.Listener
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	dead  chan struct{} // closed when every underlying listener has failed
	once  sync.Once
	wg    sync.WaitGroup
	// accepted prepares each connection before a caller sees it.
	accepted func(net.Conn)
}

func newMultiListener(lns []net.Listener, addr netip.AddrPort, accepted func(net.Conn)) *multiListener {
	m := &multiListener{
		accepted: accepted,
		lns:      lns,
		addr:     net.TCPAddrFromAddrPort(addr),
		conns:    make(chan net.Conn),
		done:     make(chan struct{}),
		dead:     make(chan struct{}),
	}
	for _, ln := range lns {
		m.wg.Add(1)
		go m.acceptLoop(ln)
	}
	go func() {
		m.wg.Wait()
		close(m.dead)
	}()
	return m
}

func (m *multiListener) acceptLoop(ln net.Listener) {
	defer m.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			// netstack listeners fail only when closed or when the stack
			// shuts down; either way this address is done.
			return
		}
		if m.accepted != nil {
			m.accepted(c)
		}
		select {
		case m.conns <- c:
		case <-m.done:
			c.Close()
			return
		}
	}
}

func (m *multiListener) Accept() (net.Conn, error) {
	select {
	case c := <-m.conns:
		return c, nil
	case <-m.done:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: m.addr, Err: net.ErrClosed}
	case <-m.dead:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: m.addr, Err: net.ErrClosed}
	}
}

func (m *multiListener) Close() error {
	m.once.Do(func() {
		close(m.done)
		for _, ln := range m.lns {
			ln.Close()
		}
		m.wg.Wait()
	})
	return nil
}

func (m *multiListener) Addr() net.Addr { return m.addr }

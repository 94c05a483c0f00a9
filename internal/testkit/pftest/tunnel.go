// Package pftest holds the port-forwarding checks as functions that take the
// path under test as dial functions, so the same checks run over a loopback
// stand-in here and over the real tailnet between network namespaces
// elsewhere. It also holds that loopback stand-in (Tunnel) and iperf3
// helpers for throughput comparisons.
package pftest

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"
)

// Fallback has the shape of the tailnet's SetTCPFallback and SetUDPFallback
// hooks (and of portforward.Forwarder's TCP and UDP methods).
type Fallback func(src, dst netip.AddrPort) (handler func(net.Conn), ok bool)

// TunnelOptions configures a Tunnel.
type TunnelOptions struct {
	TCP, UDP Fallback
	// Opaque hides that the tunnel's connections are kernel TCP sockets
	// (no SetLinger, ReadFrom or File), so the code under test sees only what
	// the tailnet's userspace connections offer: net.Conn and CloseWrite.
	Opaque bool
}

// Tunnel stands in for the tailnet on loopback: DialTCP and DialUDP connect
// over real TCP to a listener that asks the fallback hooks what to do with
// the flow, just as the tailnet does for an inbound SYN or datagram. A
// refused flow is reset and the dial fails with ECONNREFUSED; an accepted
// one is handed to the handler. UDP flows are carried as length-prefixed
// datagrams over the TCP connection.
type Tunnel struct {
	opts TunnelOptions
	ln   net.Listener
	wg   sync.WaitGroup

	mu    sync.Mutex
	conns map[io.Closer]struct{}
}

// Header bytes sent by the dialling side before the flow starts.
const (
	kindTCP = 'T'
	kindUDP = 'U'
	ackByte = 0x01
)

// NewTunnel starts a Tunnel on 127.0.0.1. Close stops it.
func NewTunnel(opts TunnelOptions) (*Tunnel, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("tunnel listener: %w", err)
	}
	t := &Tunnel{opts: opts, ln: ln, conns: make(map[io.Closer]struct{})}
	t.wg.Add(1)
	go t.serve()
	return t, nil
}

func (t *Tunnel) serve() {
	defer t.wg.Done()
	for {
		c, err := t.ln.Accept()
		if err != nil {
			return
		}
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			t.handle(c.(*net.TCPConn))
		}()
	}
}

func (t *Tunnel) track(c io.Closer, on bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if on {
		t.conns[c] = struct{}{}
	} else {
		delete(t.conns, c)
	}
}

func (t *Tunnel) handle(c *net.TCPConn) {
	t.track(c, true)
	defer t.track(c, false)
	var hdr [3]byte
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	t.accept(c, hdr[0], binary.BigEndian.Uint16(hdr[1:]), true)
}

// accept asks the fallback for the flow and resets or hands over c.
func (t *Tunnel) accept(c *net.TCPConn, kind byte, port uint16, ack bool) {
	src := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	var fallback Fallback
	switch kind {
	case kindTCP:
		fallback = t.opts.TCP
	case kindUDP:
		fallback = t.opts.UDP
	}
	var handler func(net.Conn)
	ok := false
	if fallback != nil {
		handler, ok = fallback(src, dst)
	}
	if !ok || handler == nil {
		c.SetLinger(0) // a reset, like the tailnet's answer to the SYN
		c.Close()
		return
	}
	if ack {
		if _, err := c.Write([]byte{ackByte}); err != nil {
			// Let the handler release what it prepared for the flow.
			c.Close()
			handler(c)
			return
		}
	}
	var conn net.Conn = c
	if kind == kindUDP {
		conn = newDatagramConn(c)
	} else if t.opts.Opaque {
		conn = opaqueConn{c}
	}
	handler(conn)
}

// Expose opens a plain TCP listener on 127.0.0.1 whose connections enter
// the TCP fallback as flows to port, with no header: as if the tailnet had
// accepted a SYN for that port. Ordinary clients such as iperf3 can then
// use the agent side alone. The listener closes with the tunnel.
func (t *Tunnel) Expose(port uint16) (netip.AddrPort, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("exposing port %d: %w", port, err)
	}
	t.track(ln, true)
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		defer t.track(ln, false)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.wg.Add(1)
			go func() {
				defer t.wg.Done()
				t.track(c, true)
				defer t.track(c, false)
				t.accept(c.(*net.TCPConn), kindTCP, port, false)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort(), nil
}

// DialTCP opens a stream to port through the tunnel.
func (t *Tunnel) DialTCP(ctx context.Context, port uint16) (net.Conn, error) {
	c, err := t.dial(ctx, kindTCP, port)
	if err != nil {
		return nil, err
	}
	if t.opts.Opaque {
		return opaqueConn{c}, nil
	}
	return c, nil
}

// DialUDP opens a datagram flow to port through the tunnel.
func (t *Tunnel) DialUDP(ctx context.Context, port uint16) (net.Conn, error) {
	c, err := t.dial(ctx, kindUDP, port)
	if err != nil {
		return nil, err
	}
	return newDatagramConn(c), nil
}

func (t *Tunnel) dial(ctx context.Context, kind byte, port uint16) (*net.TCPConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp4", t.ln.Addr().String())
	if err != nil {
		return nil, err
	}
	c := nc.(*net.TCPConn)
	hdr := []byte{kind, 0, 0}
	binary.BigEndian.PutUint16(hdr[1:], port)
	if deadline, ok := ctx.Deadline(); ok {
		c.SetDeadline(deadline)
	}
	var ack [1]byte
	if _, err = c.Write(hdr); err == nil {
		_, err = io.ReadFull(c, ack[:])
	}
	c.SetDeadline(time.Time{})
	if err != nil || ack[0] != ackByte {
		c.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, &net.OpError{Op: "dial", Net: "tunnel", Err: context.DeadlineExceeded}
		}
		return nil, &net.OpError{Op: "dial", Net: "tunnel", Err: syscall.ECONNREFUSED}
	}
	return c, nil
}

// Close stops the tunnel and closes every flow it carries.
func (t *Tunnel) Close() error {
	err := t.ln.Close()
	t.mu.Lock()
	for c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
	return err
}

// opaqueConn is a kernel TCP connection that shows only what the tailnet's
// userspace connections offer: net.Conn and CloseWrite.
type opaqueConn struct{ net.Conn }

func (c opaqueConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

// datagramConn carries datagrams over a stream as 2-byte length prefixed
// frames. A reader goroutine splits frames, so read deadlines never cut a
// frame in half.
type datagramConn struct {
	net.Conn
	frames chan []byte
	closed chan struct{}
	once   sync.Once
	wmu    sync.Mutex

	mu       sync.Mutex
	deadline time.Time
	readErr  error
}

func newDatagramConn(c net.Conn) *datagramConn {
	d := &datagramConn{Conn: c, frames: make(chan []byte, 64), closed: make(chan struct{})}
	go d.readFrames()
	return d
}

func (d *datagramConn) readFrames() {
	defer close(d.frames)
	r := bufio.NewReaderSize(d.Conn, 128<<10)
	var hdr [2]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			d.setErr(err)
			return
		}
		frame := make([]byte, binary.BigEndian.Uint16(hdr[:]))
		if _, err := io.ReadFull(r, frame); err != nil {
			d.setErr(err)
			return
		}
		select {
		case d.frames <- frame:
		case <-d.closed:
			return
		}
	}
}

func (d *datagramConn) setErr(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = io.EOF
	}
	d.readErr = err
}

func (d *datagramConn) Read(b []byte) (int, error) {
	d.mu.Lock()
	deadline := d.deadline
	d.mu.Unlock()
	var timeout <-chan time.Time
	if !deadline.IsZero() {
		wait := time.Until(deadline)
		if wait <= 0 {
			return 0, os.ErrDeadlineExceeded
		}
		timer := time.NewTimer(wait)
		defer timer.Stop()
		timeout = timer.C
	}
	select {
	case frame, ok := <-d.frames:
		if !ok {
			d.mu.Lock()
			defer d.mu.Unlock()
			return 0, d.readErr
		}
		return copy(b, frame), nil
	case <-timeout:
		return 0, os.ErrDeadlineExceeded
	case <-d.closed:
		return 0, net.ErrClosed
	}
}

func (d *datagramConn) Write(b []byte) (int, error) {
	if len(b) > 65535 {
		return 0, fmt.Errorf("datagram of %d bytes is larger than UDP allows", len(b))
	}
	frame := make([]byte, 2+len(b))
	binary.BigEndian.PutUint16(frame, uint16(len(b)))
	copy(frame[2:], b)
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if _, err := d.Conn.Write(frame); err != nil {
		return 0, err
	}
	return len(b), nil
}

func (d *datagramConn) SetReadDeadline(t time.Time) error {
	d.mu.Lock()
	d.deadline = t
	d.mu.Unlock()
	return nil
}

func (d *datagramConn) SetDeadline(t time.Time) error {
	d.SetReadDeadline(t)
	return d.Conn.SetWriteDeadline(t)
}

func (d *datagramConn) Close() error {
	d.once.Do(func() { close(d.closed) })
	return d.Conn.Close()
}

// Package relay is the byte plumbing both sides of a port forward share:
// the laptop's listener (forwardclient) and the workspace's forwarder
// (agent/portforward) copy a connection pair with the same pooled buffers,
// half-closes and reset handling, and tell a refusal from a reset the same
// way.
package relay

import (
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
)

// DefaultBufferSize is the copy buffer per direction of a relayed stream.
// Large buffers mean fewer read and write calls per byte on fast paths; the
// netstack side of the tailnet hands over whole receive windows at a time.
const DefaultBufferSize = 256 << 10

// BufferPool hands out copy buffers of one size so that hundreds of
// connections do not each allocate their own for every copy.
type BufferPool struct {
	size int
	pool sync.Pool
}

// NewBufferPool returns a pool of buffers of size bytes (DefaultBufferSize
// when size <= 0).
func NewBufferPool(size int) *BufferPool {
	if size <= 0 {
		size = DefaultBufferSize
	}
	p := &BufferPool{size: size}
	p.pool.New = func() any {
		b := make([]byte, p.size)
		return &b
	}
	return p
}

func (p *BufferPool) get() *[]byte  { return p.pool.Get().(*[]byte) }
func (p *BufferPool) put(b *[]byte) { p.pool.Put(b) }

// RelayResult says how a relayed stream ended.
type RelayResult struct {
	// AToB and BToA count the bytes copied in each direction.
	AToB, BToA int64
	// Err is the first error other than a clean end of stream, if any.
	Err error
}

// Relay copies a to b and b to a until both directions end, then closes both.
//
// A clean end of stream in one direction is carried to the other side as a
// half-close (CloseWrite) when that side supports it, so protocols that
// signal "done sending" by shutting down their write side keep working. A
// connection that cannot half-close is closed completely instead. An error in
// either direction aborts both, with a reset where the socket allows it, so
// neither end waits for data that will never come.
//
// Each direction copies through a small buffer while traffic is light and a
// large one from pool while bulk data flows.
func Relay(a, b net.Conn, pool *BufferPool) RelayResult {
	if pool == nil {
		pool = NewBufferPool(0)
	}
	type half struct {
		n   int64
		err error
	}
	done := make(chan half, 1)
	var abortOnce sync.Once
	abort := func() {
		abortOnce.Do(func() {
			resetOnClose(a)
			resetOnClose(b)
			a.Close()
			b.Close()
		})
	}
	go func() {
		n, err := copyHalf(b, a, pool, abort)
		done <- half{n, err}
	}()
	// The second direction runs on the caller's goroutine: one goroutine
	// fewer per connection.
	bToA, errBA := copyHalf(a, b, pool, abort)
	h := <-done
	a.Close()
	b.Close()
	res := RelayResult{AToB: h.n, BToA: bToA}
	switch {
	case h.err != nil:
		res.Err = h.err
	case errBA != nil:
		res.Err = errBA
	}
	return res
}

type closeWriter interface{ CloseWrite() error }

// copyHalf copies src to dst. On a clean end of src it half-closes dst; on an
// error it aborts the whole relay and reports the error unless it was caused
// by that abort (a closed connection).
func copyHalf(dst, src net.Conn, pool *BufferPool, abort func()) (int64, error) {
	n, err := copyStream(dst, src, pool)
	if err == nil {
		if cw, ok := dst.(closeWriter); ok {
			if cwErr := cw.CloseWrite(); cwErr == nil || isClosed(cwErr) {
				return n, nil
			}
		}
		// No half-close on this connection type: ending the stream means
		// ending the connection.
		dst.Close()
		src.Close()
		return n, nil
	}
	abort()
	if isClosed(err) {
		return n, nil
	}
	return n, err
}

// smallBuffer is what each direction reads into while traffic is light, so
// hundreds of mostly idle connections hold little memory. A read that fills
// it means bulk data is flowing, and the copy moves to a large buffer from
// the pool until reads come back small again.
const smallBuffer = 16 << 10

// copyStream copies src to dst until src ends (nil error) or either fails.
// splice(2) is deliberately not used even between two kernel sockets: on
// loopback it measured slower than a large user-space buffer.
func copyStream(dst, src net.Conn, pool *BufferPool) (int64, error) {
	small := make([]byte, smallBuffer)
	buf := small
	var big *[]byte
	defer func() {
		if big != nil {
			pool.put(big)
		}
	}()
	var total int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			total += int64(nw)
			if werr != nil {
				return total, werr
			}
			if nw != nr {
				return total, io.ErrShortWrite
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return total, nil
			}
			return total, rerr
		}
		switch {
		case big == nil && nr == len(buf) && pool.size > smallBuffer:
			big = pool.get()
			buf = *big
		case big != nil && nr < smallBuffer/4:
			pool.put(big)
			big, buf = nil, small
		}
	}
}

// resetOnClose makes the next Close send a TCP reset instead of a FIN, where
// the connection supports it, so that the peer learns the stream was cut
// short rather than finished.
func resetOnClose(c net.Conn) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		l.SetLinger(0)
	}
}

// isClosed reports errors that only say the connection was already closed
// by us, which are the expected result of an abort and not worth reporting.
func isClosed(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe)
}

// IsRefused reports whether err says that nothing accepted the connection:
// a kernel ECONNREFUSED, or the same condition as worded by the userspace
// network stack ("connection was refused"). A reset of a connection that
// was already set up is not a refusal; see IsReset.
func IsRefused(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return true
	}
	msg := strings.ToLower(err.Error())
	return strings.Contains(msg, "connection refused") || strings.Contains(msg, "connection was refused")
}

// IsReset reports whether err says the peer reset a connection: a kernel
// ECONNRESET, or the userspace network stack's "connection reset by peer".
func IsReset(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, syscall.ECONNRESET) {
		return true
	}
	return strings.Contains(strings.ToLower(err.Error()), "connection reset")
}

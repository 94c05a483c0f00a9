package sshd

import (
	"net"
	"sync"
	"time"
)

// x/crypto/ssh flushes every packet on its own, through a 4 KiB bufio.Writer:
// a 32 KiB data packet leaves as two writes (4 KiB, then the rest), and every
// small packet (an sftp status, a window adjust) as one. On a bulk transfer
// the client then wakes for each piece: on loopback OpenSSH's ssh made six
// times as many read calls against us as against OpenSSH's sshd, which
// writes whatever its loop produced in one go. batchedConn gives the same
// effect without delaying anything: a write goes out at once when the
// socket is idle, and whatever is written while a write is under way leaves
// together in the next one.

// maxPending is how much may wait for the socket before a writer blocks, as
// the socket itself would.
const maxPending = 256 << 10

// closeFlushTimeout bounds how long Close waits for pending bytes (the last
// exit status, a disconnect message) to reach a client that stopped reading.
const closeFlushTimeout = 5 * time.Second

// bufPool holds the pending-write buffers of all connections of a server,
// so idle connections hold none.
type bufPool struct{ p sync.Pool }

func (bp *bufPool) get() *[]byte {
	if b, ok := bp.p.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 0, 64<<10)
	return &b
}

func (bp *bufPool) put(b *[]byte) {
	*b = (*b)[:0]
	bp.p.Put(b)
}

// batchedConn is a net.Conn whose writes are copied to a pending buffer that
// a flushing goroutine (running only while there is something to write)
// hands to the socket, all of it at once.
type batchedConn struct {
	net.Conn
	pool         *bufPool
	closeTimeout time.Duration // closeFlushTimeout; shorter in tests

	mu       sync.Mutex
	changed  sync.Cond // the flusher took the pending bytes, or stopped
	pending  *[]byte   // nil when empty
	flushing bool
	err      error // first write error, or net.ErrClosed once closed
}

func newBatchedConn(nc net.Conn, pool *bufPool) *batchedConn {
	c := &batchedConn{Conn: nc, pool: pool, closeTimeout: closeFlushTimeout}
	c.changed.L = &c.mu
	return c
}

// Write queues p. An error of the socket shows on the next Write, as the
// connection is lost either way.
func (c *batchedConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.err == nil && c.pending != nil && len(*c.pending) >= maxPending {
		c.changed.Wait()
	}
	if c.err != nil {
		return 0, c.err
	}
	if c.pending == nil {
		c.pending = c.pool.get()
	}
	*c.pending = append(*c.pending, p...)
	if !c.flushing {
		c.flushing = true
		go c.flush()
	}
	return len(p), nil
}

// flush writes the pending bytes until there are none left.
func (c *batchedConn) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.pending != nil && c.err == nil {
		buf := c.pending
		c.pending = nil
		c.changed.Broadcast()
		c.mu.Unlock()
		_, err := c.Conn.Write(*buf)
		c.pool.put(buf)
		c.mu.Lock()
		if err != nil && c.err == nil {
			c.err = err
		}
	}
	if c.pending != nil {
		c.pool.put(c.pending)
		c.pending = nil
	}
	c.flushing = false
	c.changed.Broadcast()
}

// Close lets pending bytes reach the client (for at most closeTimeout) and
// closes the socket.
func (c *batchedConn) Close() error {
	c.mu.Lock()
	if c.flushing {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(c.closeTimeout))
	}
	for c.flushing {
		c.changed.Wait()
	}
	if c.err == nil {
		c.err = net.ErrClosed
	}
	c.mu.Unlock()
	return c.Conn.Close()
}

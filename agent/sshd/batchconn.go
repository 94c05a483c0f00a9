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

// chunkSize is the unit pending bytes are kept in: a connection that falls
// behind holds at most maxPending/chunkSize+1 chunks, and a buffer never
// grows by copying (which, on a 1 GiB download, was a fifth of the agent's
// allocations and so of its garbage collections).
const chunkSize = 64 << 10

// keptChunks is how many idle chunks a server keeps for its connections'
// next writes: enough for one connection streaming at full speed (the
// chunks the flusher is writing and a full pending list behind them).
const keptChunks = 2 * (maxPending/chunkSize + 1)

// closeFlushTimeout bounds how long Close waits for pending bytes (the last
// exit status, a disconnect message) to reach a client that stopped reading.
const closeFlushTimeout = 5 * time.Second

// bufPool holds the idle chunks of all connections of a server, so idle
// connections hold none. Unlike a sync.Pool it keeps them across garbage
// collections: under the agent's memory limit a bulk transfer collects
// every few milliseconds, and a sync.Pool would be empty each time.
type bufPool struct {
	mu   sync.Mutex
	idle []*[]byte
}

func (bp *bufPool) get() *[]byte {
	bp.mu.Lock()
	defer bp.mu.Unlock()
	if n := len(bp.idle); n > 0 {
		b := bp.idle[n-1]
		bp.idle[n-1] = nil
		bp.idle = bp.idle[:n-1]
		return b
	}
	b := make([]byte, 0, chunkSize)
	return &b
}

func (bp *bufPool) put(b *[]byte) {
	*b = (*b)[:0]
	bp.mu.Lock()
	defer bp.mu.Unlock()
	if len(bp.idle) < keptChunks {
		bp.idle = append(bp.idle, b)
	}
}

// batchedConn is a net.Conn whose writes are copied to pending chunks that
// a flushing goroutine (running only while there is something to write)
// hands to the socket, all of them at once.
type batchedConn struct {
	net.Conn
	pool         *bufPool
	closeTimeout time.Duration // closeFlushTimeout; shorter in tests

	mu           sync.Mutex
	changed      sync.Cond // the flusher took the pending bytes, or stopped
	pending      []*[]byte // chunks waiting, the last one still filling
	pendingBytes int       // bytes in pending
	spare        []*[]byte // the flusher's other chunk list, reused
	flushing     bool
	err          error // first write error, or net.ErrClosed once closed
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
	for c.err == nil && c.pendingBytes >= maxPending {
		c.changed.Wait()
	}
	if c.err != nil {
		return 0, c.err
	}
	n := len(p)
	for len(p) > 0 {
		var last *[]byte
		if k := len(c.pending); k > 0 && len(*c.pending[k-1]) < cap(*c.pending[k-1]) {
			last = c.pending[k-1]
		} else {
			last = c.pool.get()
			c.pending = append(c.pending, last)
		}
		m := copy((*last)[len(*last):cap(*last)], p)
		*last = (*last)[:len(*last)+m]
		p = p[m:]
	}
	c.pendingBytes += n
	if !c.flushing {
		c.flushing = true
		go c.flush()
	}
	return n, nil
}

// flush writes the pending bytes until there are none left.
func (c *batchedConn) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.pending) > 0 && c.err == nil {
		chunks := c.pending
		c.pending, c.spare = c.spare[:0], nil
		c.pendingBytes = 0
		c.changed.Broadcast()
		c.mu.Unlock()
		var err error
		for i, b := range chunks {
			if err == nil {
				_, err = c.Conn.Write(*b)
			}
			c.pool.put(b)
			chunks[i] = nil
		}
		c.mu.Lock()
		c.spare = chunks[:0]
		if err != nil && c.err == nil {
			c.err = err
		}
	}
	for i, b := range c.pending {
		c.pool.put(b)
		c.pending[i] = nil
	}
	c.pending = c.pending[:0]
	c.pendingBytes = 0
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

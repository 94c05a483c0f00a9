package coordinator

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync/atomic"
	"time"
)

// handshakeGate runs the CPU part of TLS handshakes (the key exchange and,
// for a full handshake, the signature) a few at a time, oldest first.
//
// Why: when thousands of peers return at once (a coordinator restart),
// handshaking every connection at the same time shares the CPU among all of
// them, so each takes as long as all of them together; past the handshake
// timeouts every one fails, all that work is thrown away, and the retries
// start over. Run in order, each handshake finishes in its own short time
// and the queue drains at the machine's speed.
//
// A connection takes its place once its ClientHello is in (a connection
// that sends nothing holds none) and gives it back at the server's first
// write (its whole first flight, the work done) or when it closes. One
// that waited past maxWait since it was accepted is refused without the
// work: its peer is about to give up, and retries after its backoff.
type handshakeGate struct {
	slots   chan struct{}
	maxWait time.Duration
	logger  *slog.Logger

	dropped  atomic.Int64 // refused since the last warning
	lastWarn atomic.Int64 // unix nanos of the last warning
}

var errHandshakeStale = errors.New("waited too long for a TLS handshake; retry")

func newHandshakeGate(concurrent int, maxWait time.Duration, logger *slog.Logger) *handshakeGate {
	return &handshakeGate{slots: make(chan struct{}, concurrent), maxWait: maxWait, logger: logger}
}

// listener wraps ln so that the gate knows each connection's arrival.
func (g *handshakeGate) listener(ln net.Listener) net.Listener { return gatedListener{ln, g} }

// enter is tls.Config.GetConfigForClient: it waits for a place.
func (g *handshakeGate) enter(hi *tls.ClientHelloInfo) (*tls.Config, error) {
	c, ok := hi.Conn.(*gatedConn)
	if !ok {
		return nil, nil
	}
	select {
	case g.slots <- struct{}{}:
	case <-hi.Context().Done():
		return nil, hi.Context().Err()
	}
	if waited := time.Since(c.arrived); waited > g.maxWait {
		<-g.slots
		g.droppedOne(waited)
		return nil, errHandshakeStale
	}
	c.holding.Store(true)
	return nil, nil
}

// droppedOne counts a refused handshake and says so at most every 10 s,
// so an operator sees the coordinator is past its capacity.
func (g *handshakeGate) droppedOne(waited time.Duration) {
	n := g.dropped.Add(1)
	now := time.Now().UnixNano()
	last := g.lastWarn.Load()
	if now-last < int64(10*time.Second) || !g.lastWarn.CompareAndSwap(last, now) {
		return
	}
	g.dropped.Add(-n)
	g.logger.Warn("more peers arrive than TLS handshakes can be done; refused the ones that waited too long, they retry after their backoff",
		"refused", n, "waited", waited.Round(time.Millisecond), "queue_bound", g.maxWait, "concurrent_handshakes", cap(g.slots))
}

type gatedListener struct {
	net.Listener
	g *handshakeGate
}

func (l gatedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &gatedConn{Conn: c, g: l.g, arrived: time.Now()}, nil
}

// gatedConn is an accepted connection that may hold a handshake place.
type gatedConn struct {
	net.Conn
	g       *handshakeGate
	arrived time.Time
	holding atomic.Bool
}

func (c *gatedConn) release() {
	if c.holding.CompareAndSwap(true, false) {
		<-c.g.slots
	}
}

func (c *gatedConn) Write(p []byte) (int, error) {
	c.release()
	return c.Conn.Write(p)
}

func (c *gatedConn) Close() error {
	c.release()
	return c.Conn.Close()
}

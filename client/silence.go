package client

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"
)

// ErrWorkspaceSilent is the cause of a context from GiveUpWhenSilent that
// ended because the workspace sent nothing for its bound.
type ErrWorkspaceSilent struct {
	Workspace string
	After     time.Duration
}

func (e *ErrWorkspaceSilent) Error() string {
	return fmt.Sprintf("workspace %q sent nothing for %s (--timeout)", e.Workspace, e.After)
}

// GiveUpWhenSilent returns a context that ends once the workspace has sent
// us nothing over the tailnet for d (d <= 0: never). A workspace that is
// busy answers slowly but keeps sending (WireGuard, TCP acknowledgements,
// path probes), so a connection that makes progress is not cut short by a
// fixed total; one that is gone or unreachable ends after d. The bytes
// counted are WireGuard's from the workspace's node; it is polled, so the
// end comes up to a tenth of d late.
func (w *Workspace) GiveUpWhenSilent(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return untilSilent(ctx, d, w.rxBytes, &ErrWorkspaceSilent{Workspace: w.name, After: d})
}

// untilSilent returns a context that ends with cause once rx has not
// changed for d (d <= 0: never).
func untilSilent(ctx context.Context, d time.Duration, rx func() int64, cause error) (context.Context, context.CancelFunc) {
	if d <= 0 {
		return context.WithCancel(ctx)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	poll := min(time.Second, d/10)
	go func() {
		t := time.NewTicker(poll)
		defer t.Stop()
		last, heard := rx(), time.Now()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				if n := rx(); n != last {
					last, heard = n, now
				} else if now.Sub(heard) >= d {
					cancel(cause)
					return
				}
			}
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}

// rxBytes is how many bytes WireGuard has received from the workspace's
// node (0 before it is known).
func (w *Workspace) rxBytes() int64 {
	addr := w.Addr()
	if !addr.IsValid() {
		return 0
	}
	for _, p := range w.conn.PeerStatus() {
		for _, a := range p.Addresses {
			if a.Addr() == addr {
				return p.RxBytes
			}
		}
	}
	return 0
}

// BoundHandshake ends the SSH handshake on conn (its reads and writes fail
// with os.ErrDeadlineExceeded) once ctx ends, typically a context from
// GiveUpWhenSilent. Clearing the deadline, as the SSH client does once the
// session is up, stops the watch and calls release (ctx's cancel).
func BoundHandshake(ctx context.Context, release func(), conn net.Conn) net.Conn {
	h := &handshakeConn{Conn: conn, release: release}
	h.stop = context.AfterFunc(ctx, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if !h.done {
			_ = h.Conn.SetDeadline(time.Now())
		}
	})
	return h
}

type handshakeConn struct {
	net.Conn
	stop    func() bool
	release func()
	mu      sync.Mutex
	done    bool // the handshake is over: leave the deadline alone
}

func (h *handshakeConn) SetDeadline(t time.Time) error {
	if t.IsZero() {
		h.mu.Lock()
		h.done = true
		h.mu.Unlock()
		h.stop()
		if h.release != nil {
			h.release()
		}
	}
	return h.Conn.SetDeadline(t)
}

// Close also ends the watch, for a handshake that failed.
func (h *handshakeConn) Close() error {
	h.stop()
	if h.release != nil {
		h.release()
	}
	return h.Conn.Close()
}

// CloseWrite keeps half-closing available through the wrapper.
func (h *handshakeConn) CloseWrite() error {
	if cw, ok := h.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return h.Conn.Close()
}

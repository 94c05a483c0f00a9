package sshd

import (
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"
)

// connKey finds a connection's serverConn in its gliderlabs context.
var connKey = &struct{ name string }{"agentd-sshd-conn"}

func connOf(ctx ssh.Context) *serverConn {
	c, _ := ctx.Value(connKey).(*serverConn)
	return c
}

// serverConn is one client connection: its sessions and forwards, and the
// listeners it opened for remote forwarding.
type serverConn struct {
	srv    *Server
	ctx    ssh.Context // cancelled by gliderlabs when the connection closes
	nc     net.Conn
	peer   string
	logger *slog.Logger
	start  time.Time

	noMoreSessions atomic.Bool

	mu       sync.Mutex
	ending   bool                      // no new work may start
	forwards map[string]*remoteForward // by "tcp:addr:port" or "unix:path"
	wg       sync.WaitGroup            // channel handlers and forwarded connections
}

// sconn is the SSH connection, nil until the handshake is done.
func (c *serverConn) sconn() *gossh.ServerConn {
	sc, _ := c.ctx.Value(ssh.ContextKeyConn).(*gossh.ServerConn)
	return sc
}

// authenticated runs when the client asks for "none" authentication, the
// last step of the handshake here.
func (c *serverConn) authenticated(cm gossh.ConnMetadata) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.start.IsZero() {
		return
	}
	c.start = time.Now()
	c.logger.Info("ssh connection opened", "ssh_user", cm.User(), "client", string(cm.ClientVersion()))
}

// track registers one piece of work (a channel handler, a forwarded
// connection) that the connection must wait for; false once it is ending.
func (c *serverConn) track() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ending {
		return false
	}
	c.wg.Add(1)
	return true
}

// finish runs once the connection is closed: it closes the remote forward
// listeners and waits for every session and forwarded connection to end.
func (c *serverConn) finish() {
	c.mu.Lock()
	c.ending = true
	fs := c.forwards
	c.forwards = nil
	start := c.start
	c.mu.Unlock()
	for _, f := range fs {
		f.close()
	}
	c.wg.Wait()
	if !start.IsZero() {
		c.logger.Info("ssh connection closed", "duration", time.Since(start).Round(time.Millisecond).String())
	}
}

func (c *serverConn) handleNoMoreSessions(*gossh.Request) (bool, []byte) {
	c.noMoreSessions.Store(true)
	return true, nil
}

// keepalive asks the client for a reply every interval and drops the
// connection after KeepaliveCountMax intervals without any answer, so dead
// clients (laptop closed, tailnet path gone) release their sessions.
func (c *serverConn) keepalive() {
	interval := c.srv.opts.KeepaliveInterval
	maxMissed := c.srv.opts.KeepaliveCountMax
	answered := make(chan struct{}, 1)
	var inflight atomic.Bool
	missed := 0
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-answered:
			missed = 0
		case <-t.C:
			sconn := c.sconn()
			if sconn == nil {
				continue // still in the handshake, which has its own timeout
			}
			if inflight.Load() {
				missed++
				if missed >= maxMissed {
					c.logger.Warn("ssh client stopped answering keepalives; closing connection", "missed", missed)
					c.nc.Close()
					return
				}
				continue
			}
			inflight.Store(true)
			go func() {
				_, _, err := sconn.SendRequest("keepalive@openssh.com", true, nil)
				inflight.Store(false)
				if err == nil {
					select {
					case answered <- struct{}{}:
					default:
					}
				}
			}()
		}
	}
}

package sshd

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// serverConn is one client connection: its channels, its global requests
// and the listeners it opened for remote forwarding.
type serverConn struct {
	srv    *Server
	sconn  *gossh.ServerConn
	ctx    context.Context
	cancel context.CancelFunc
	peer   string
	logger *slog.Logger

	noMoreSessions atomic.Bool

	mu       sync.Mutex
	forwards map[string]*remoteForward // by "tcp:addr:port" or "unix:path"
	wg       sync.WaitGroup
}

func (c *serverConn) close() {
	c.cancel()
	c.sconn.Close()
}

func (c *serverConn) serve(chans <-chan gossh.NewChannel, reqs <-chan *gossh.Request) {
	defer c.wg.Wait()
	defer c.closeForwards()
	defer c.close()

	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.handleGlobalRequests(reqs)
	}()
	if c.srv.opts.KeepaliveInterval > 0 {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.keepalive()
		}()
	}
	// Wait for the whole connection to end before closing: the channel
	// loop ends first only when the transport is gone.
	done := make(chan struct{})
	go func() {
		_ = c.sconn.Wait()
		close(done)
	}()

	for nch := range chans {
		c.handleChannel(nch)
	}
	c.close()
	<-done
}

func (c *serverConn) handleChannel(nch gossh.NewChannel) {
	switch nch.ChannelType() {
	case "session":
		if c.noMoreSessions.Load() {
			_ = nch.Reject(gossh.Prohibited, "no-more-sessions was requested on this connection")
			return
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.handleSession(nch)
		}()
	case "direct-tcpip":
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.handleDirectTCPIP(nch)
		}()
	case "direct-streamlocal@openssh.com":
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.handleDirectStreamLocal(nch)
		}()
	default:
		c.logger.Debug("refused unknown channel type", "type", nch.ChannelType())
		_ = nch.Reject(gossh.UnknownChannelType, "unknown channel type "+nch.ChannelType())
	}
}

func (c *serverConn) handleGlobalRequests(reqs <-chan *gossh.Request) {
	for req := range reqs {
		switch req.Type {
		case "tcpip-forward":
			c.handleTCPIPForward(req)
		case "cancel-tcpip-forward":
			c.handleCancelTCPIPForward(req)
		case "streamlocal-forward@openssh.com":
			c.handleStreamLocalForward(req)
		case "cancel-streamlocal-forward@openssh.com":
			c.handleCancelStreamLocalForward(req)
		case "no-more-sessions@openssh.com":
			c.noMoreSessions.Store(true)
			if req.WantReply {
				_ = req.Reply(true, nil)
			}
		default:
			// keepalive@openssh.com and anything unknown: a failure reply is
			// the correct answer and keeps the connection healthy.
			if req.WantReply {
				_ = req.Reply(false, nil)
			}
		}
	}
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
			if inflight.Load() {
				missed++
				if missed >= maxMissed {
					c.logger.Warn("ssh client stopped answering keepalives; closing connection", "missed", missed)
					c.close()
					return
				}
				continue
			}
			inflight.Store(true)
			go func() {
				_, _, err := c.sconn.SendRequest("keepalive@openssh.com", true, nil)
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

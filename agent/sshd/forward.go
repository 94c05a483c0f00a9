package sshd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/metrics"
)

// Payloads from RFC 4254 §7 and OpenSSH's PROTOCOL (streamlocal).
type directTCPIPMsg struct {
	DestAddr   string
	DestPort   uint32
	OriginAddr string
	OriginPort uint32
}

type tcpipForwardMsg struct {
	BindAddr string
	BindPort uint32
}

type tcpipForwardReply struct {
	Port uint32
}

type forwardedTCPIPMsg struct {
	BindAddr   string
	BindPort   uint32
	OriginAddr string
	OriginPort uint32
}

type directStreamLocalMsg struct {
	SocketPath string
	Reserved0  string
	Reserved1  uint32
}

type streamLocalForwardMsg struct {
	SocketPath string
}

type forwardedStreamLocalMsg struct {
	SocketPath string
	Reserved   string
}

// remoteForward is a listener opened in the workspace for the client (-R).
type remoteForward struct {
	ln   net.Listener
	path string // Unix socket to remove on close; empty for TCP
}

// handleDirectTCPIP serves ssh -L: connect to host:port from the workspace.
func (c *serverConn) handleDirectTCPIP(nch gossh.NewChannel) {
	var msg directTCPIPMsg
	if err := gossh.Unmarshal(nch.ExtraData(), &msg); err != nil {
		_ = nch.Reject(gossh.ConnectionFailed, "malformed direct-tcpip request")
		return
	}
	addr := net.JoinHostPort(msg.DestAddr, strconv.Itoa(int(msg.DestPort)))
	var d net.Dialer
	target, err := d.DialContext(c.ctx, "tcp", addr)
	if err != nil {
		c.logger.Debug("local forward failed", "target", addr, "err", err)
		_ = nch.Reject(gossh.ConnectionFailed, fmt.Sprintf("connect to %s: %v", addr, err))
		return
	}
	c.logger.Debug("local forward", "target", addr)
	c.pipeChannel(nch, target)
}

// handleDirectStreamLocal serves ssh -L with a Unix socket target.
func (c *serverConn) handleDirectStreamLocal(nch gossh.NewChannel) {
	var msg directStreamLocalMsg
	if err := gossh.Unmarshal(nch.ExtraData(), &msg); err != nil {
		_ = nch.Reject(gossh.ConnectionFailed, "malformed direct-streamlocal request")
		return
	}
	var d net.Dialer
	target, err := d.DialContext(c.ctx, "unix", msg.SocketPath)
	if err != nil {
		_ = nch.Reject(gossh.ConnectionFailed, fmt.Sprintf("connect to %s: %v", msg.SocketPath, err))
		return
	}
	c.logger.Debug("local socket forward", "target", msg.SocketPath)
	c.pipeChannel(nch, target)
}

func (c *serverConn) pipeChannel(nch gossh.NewChannel, target net.Conn) {
	ch, reqs, err := nch.Accept()
	if err != nil {
		target.Close()
		return
	}
	go gossh.DiscardRequests(reqs)
	c.pipe(ch, target, metrics.SSHPortForward)
}

// halfCloser is a connection whose write side can be closed alone.
type halfCloser interface {
	CloseWrite() error
}

// pipe copies both ways, passing EOF on as a half-close so protocols that
// finish one direction first (HTTP/1.0, rsync, git) work, and closes both
// when both directions are done. It counts as one session of the given type.
// The connection is closed outright when the SSH connection ends, so a
// peer that never closes its side cannot hold the goroutines.
func (c *serverConn) pipe(ch gossh.Channel, conn net.Conn, kind metrics.SSHSession) {
	ended := c.srv.opts.Metrics.SSHSessionStarted(kind)
	defer ended()
	stop := context.AfterFunc(c.ctx, func() { conn.Close() })
	defer stop()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		_, _ = io.Copy(conn, ch)
		if hc, ok := conn.(halfCloser); ok {
			_ = hc.CloseWrite()
		} else {
			conn.Close()
		}
	}()
	go func() {
		defer wg.Done()
		_, _ = io.Copy(ch, conn)
		_ = ch.CloseWrite()
	}()
	wg.Wait()
	ch.Close()
	conn.Close()
}

// forwardBindHost maps the client's bind address to what the workspace
// listens on: the empty address and "localhost" mean loopback, as with
// OpenSSH's default GatewayPorts=no. Other ports of the tailnet address are
// forwarded to the workspace's loopback anyway.
func forwardBindHost(addr string) string {
	switch addr {
	case "", "localhost", "*", "0.0.0.0":
		return "127.0.0.1"
	case "::":
		return "::1"
	}
	return addr
}

func (c *serverConn) handleTCPIPForward(req *gossh.Request) {
	var msg tcpipForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil || msg.BindPort > 65535 {
		_ = req.Reply(false, nil)
		return
	}
	host := forwardBindHost(msg.BindAddr)
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(int(msg.BindPort))))
	if err != nil {
		c.logger.Info("remote forward refused", "bind", msg.BindAddr, "port", msg.BindPort, "err", err)
		_ = req.Reply(false, nil)
		return
	}
	port := uint32(ln.Addr().(*net.TCPAddr).Port)
	// Keyed by what the client asked for: cancel-tcpip-forward repeats it.
	key := fmt.Sprintf("tcp:%s:%d", msg.BindAddr, msg.BindPort)
	if msg.BindPort == 0 {
		key = fmt.Sprintf("tcp:%s:%d", msg.BindAddr, port)
	}
	if !c.addForward(key, &remoteForward{ln: ln}) {
		ln.Close()
		_ = req.Reply(false, nil)
		return
	}
	var reply []byte
	if msg.BindPort == 0 {
		reply = gossh.Marshal(tcpipForwardReply{Port: port})
	}
	_ = req.Reply(true, reply)
	c.logger.Debug("remote forward", "listen", ln.Addr().String())

	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.acceptForwarded(ln, func(conn net.Conn) (string, []byte) {
			origin, originPort := splitAddr(conn.RemoteAddr())
			return "forwarded-tcpip", gossh.Marshal(forwardedTCPIPMsg{
				BindAddr: msg.BindAddr, BindPort: port,
				OriginAddr: origin, OriginPort: originPort,
			})
		})
	}()
}

func (c *serverConn) handleCancelTCPIPForward(req *gossh.Request) {
	var msg tcpipForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil {
		_ = req.Reply(false, nil)
		return
	}
	ok := c.removeForward(fmt.Sprintf("tcp:%s:%d", msg.BindAddr, msg.BindPort))
	_ = req.Reply(ok, nil)
}

func (c *serverConn) handleStreamLocalForward(req *gossh.Request) {
	var msg streamLocalForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil || msg.SocketPath == "" {
		_ = req.Reply(false, nil)
		return
	}
	ln, err := net.Listen("unix", msg.SocketPath)
	if err != nil {
		c.logger.Info("remote socket forward refused", "path", msg.SocketPath, "err", err)
		_ = req.Reply(false, nil)
		return
	}
	// We remove the socket file ourselves when the forward ends.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	if !c.addForward("unix:"+msg.SocketPath, &remoteForward{ln: ln, path: msg.SocketPath}) {
		ln.Close()
		_ = req.Reply(false, nil)
		return
	}
	_ = req.Reply(true, nil)
	c.logger.Debug("remote socket forward", "path", msg.SocketPath)

	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.acceptForwarded(ln, func(net.Conn) (string, []byte) {
			return "forwarded-streamlocal@openssh.com", gossh.Marshal(forwardedStreamLocalMsg{SocketPath: msg.SocketPath})
		})
	}()
}

func (c *serverConn) handleCancelStreamLocalForward(req *gossh.Request) {
	var msg streamLocalForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil {
		_ = req.Reply(false, nil)
		return
	}
	_ = req.Reply(c.removeForward("unix:"+msg.SocketPath), nil)
}

// acceptForwarded opens one channel back to the client per accepted
// connection until the listener closes.
func (c *serverConn) acceptForwarded(ln net.Listener, describe func(net.Conn) (string, []byte)) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			chType, payload := describe(conn)
			ch, reqs, err := c.sconn.OpenChannel(chType, payload)
			if err != nil {
				conn.Close()
				return
			}
			go gossh.DiscardRequests(reqs)
			c.pipe(ch, conn, metrics.SSHPortForward)
		}()
	}
}

func (c *serverConn) addForward(key string, f *remoteForward) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx.Err() != nil {
		return false
	}
	if c.forwards == nil {
		c.forwards = map[string]*remoteForward{}
	}
	if _, dup := c.forwards[key]; dup {
		return false
	}
	c.forwards[key] = f
	return true
}

func (c *serverConn) removeForward(key string) bool {
	c.mu.Lock()
	f, ok := c.forwards[key]
	delete(c.forwards, key)
	c.mu.Unlock()
	if ok {
		f.close()
	}
	return ok
}

func (c *serverConn) closeForwards() {
	c.mu.Lock()
	fs := c.forwards
	c.forwards = nil
	c.mu.Unlock()
	for _, f := range fs {
		f.close()
	}
}

func (f *remoteForward) close() {
	f.ln.Close()
	if f.path != "" {
		if err := os.Remove(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return
		}
	}
}

func splitAddr(a net.Addr) (string, uint32) {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String(), uint32(ta.Port)
	}
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String(), 0
	}
	p, _ := strconv.Atoi(port)
	return host, uint32(p)
}

package sshd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
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
func (c *serverConn) handleDirectTCPIP(_ *gossh.ServerConn, nch gossh.NewChannel) {
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
func (c *serverConn) handleDirectStreamLocal(_ *gossh.ServerConn, nch gossh.NewChannel) {
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

// forwardBindHost is where the workspace listens for a remote forward:
// always loopback, as with OpenSSH's default GatewayPorts=no, whatever bind
// address the client asked for ("", "localhost", "*", 0.0.0.0 or one of the
// workspace's other addresses). Only the workspace's own processes can
// reach it; other hosts on the workspace's network cannot. An IPv6 request
// listens on ::1.
func forwardBindHost(addr string) string {
	if ip, err := netip.ParseAddr(strings.Trim(addr, "[]")); err == nil && ip.Is6() && !ip.Is4In6() {
		return "::1"
	}
	return "127.0.0.1"
}

func (c *serverConn) handleTCPIPForward(req *gossh.Request) (bool, []byte) {
	var msg tcpipForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil || msg.BindPort > 65535 {
		return false, nil
	}
	host := forwardBindHost(msg.BindAddr)
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(int(msg.BindPort))))
	if err != nil {
		c.logger.Info("remote forward refused", "bind", msg.BindAddr, "port", msg.BindPort, "err", err)
		return false, nil
	}
	port := uint32(ln.Addr().(*net.TCPAddr).Port)
	// Keyed by what the client asked for: cancel-tcpip-forward repeats it.
	key := fmt.Sprintf("tcp:%s:%d", msg.BindAddr, msg.BindPort)
	if msg.BindPort == 0 {
		key = fmt.Sprintf("tcp:%s:%d", msg.BindAddr, port)
	}
	if !c.addForward(key, &remoteForward{ln: ln}) {
		ln.Close()
		return false, nil
	}
	switch msg.BindAddr {
	case "", "localhost", "127.0.0.1", "::1":
		c.logger.Debug("remote forward", "listen", ln.Addr().String())
	default:
		c.logger.Info("remote forward listens on loopback only, not on the address the client asked for",
			"asked", msg.BindAddr, "listen", ln.Addr().String())
	}
	c.startAccepting(ln, func(conn net.Conn) (string, []byte) {
		origin, originPort := splitAddr(conn.RemoteAddr())
		return "forwarded-tcpip", gossh.Marshal(forwardedTCPIPMsg{
			BindAddr: msg.BindAddr, BindPort: port,
			OriginAddr: origin, OriginPort: originPort,
		})
	})
	if msg.BindPort == 0 {
		return true, gossh.Marshal(tcpipForwardReply{Port: port})
	}
	return true, nil
}

func (c *serverConn) handleCancelTCPIPForward(req *gossh.Request) (bool, []byte) {
	var msg tcpipForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil {
		return false, nil
	}
	return c.removeForward(fmt.Sprintf("tcp:%s:%d", msg.BindAddr, msg.BindPort)), nil
}

func (c *serverConn) handleStreamLocalForward(req *gossh.Request) (bool, []byte) {
	var msg streamLocalForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil || msg.SocketPath == "" {
		return false, nil
	}
	ln, err := net.Listen("unix", msg.SocketPath)
	if err != nil {
		c.logger.Info("remote socket forward refused", "path", msg.SocketPath, "err", err)
		return false, nil
	}
	// We remove the socket file ourselves when the forward ends.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	if !c.addForward("unix:"+msg.SocketPath, &remoteForward{ln: ln, path: msg.SocketPath}) {
		ln.Close()
		return false, nil
	}
	c.logger.Debug("remote socket forward", "path", msg.SocketPath)
	c.startAccepting(ln, func(net.Conn) (string, []byte) {
		return "forwarded-streamlocal@openssh.com", gossh.Marshal(forwardedStreamLocalMsg{SocketPath: msg.SocketPath})
	})
	return true, nil
}

func (c *serverConn) handleCancelStreamLocalForward(req *gossh.Request) (bool, []byte) {
	var msg streamLocalForwardMsg
	if err := gossh.Unmarshal(req.Payload, &msg); err != nil {
		return false, nil
	}
	return c.removeForward("unix:" + msg.SocketPath), nil
}

// startAccepting opens one channel back to the client per connection
// accepted on ln (a remote forward or the agent socket) until ln closes.
func (c *serverConn) startAccepting(ln net.Listener, describe func(net.Conn) (string, []byte)) {
	if !c.track() {
		ln.Close()
		return
	}
	go func() {
		defer c.wg.Done()
		c.acceptForwarded(ln, describe)
	}()
}

func (c *serverConn) acceptForwarded(ln net.Listener, describe func(net.Conn) (string, []byte)) {
	sconn := c.sconn()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		if !c.track() {
			conn.Close()
			return
		}
		go func() {
			defer c.wg.Done()
			chType, payload := describe(conn)
			ch, reqs, err := sconn.OpenChannel(chType, payload)
			if err != nil {
				conn.Close()
				return
			}
			go gossh.DiscardRequests(reqs)
			kind := metrics.SSHPortForward
			if chType == agentChannelType {
				kind = metrics.SSHAgentForward
			}
			c.pipe(ch, conn, kind)
		}()
	}
}

func (c *serverConn) addForward(key string, f *remoteForward) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ending {
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

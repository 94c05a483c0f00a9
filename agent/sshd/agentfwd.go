package sshd

import (
	"net"
	"os"
	"path/filepath"

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/metrics"
)

// agentForward is the SSH_AUTH_SOCK of one session: a Unix socket in a
// private 0700 directory whose connections are carried back to the
// client's ssh-agent over "auth-agent@openssh.com" channels.
type agentForward struct {
	dir  string
	path string
	ln   net.Listener
}

func (c *serverConn) startAgentForward() (*agentForward, error) {
	dir, err := os.MkdirTemp("", "agent-ssh-")
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	af := &agentForward{dir: dir, path: path, ln: ln}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				ch, reqs, err := c.sconn.OpenChannel("auth-agent@openssh.com", nil)
				if err != nil {
					conn.Close()
					return
				}
				go gossh.DiscardRequests(reqs)
				c.pipe(ch, conn, metrics.SSHAgentForward)
			}()
		}
	}()
	return af, nil
}

func (af *agentForward) close() {
	af.ln.Close()
	os.RemoveAll(af.dir)
}

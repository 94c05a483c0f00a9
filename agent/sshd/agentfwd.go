package sshd

import (
	"net"
	"os"
	"path/filepath"

	"github.com/gliderlabs/ssh"
)

// agentChannelType carries one connection to the client's ssh-agent.
const agentChannelType = "auth-agent@openssh.com"

// agentForward is the SSH_AUTH_SOCK of one session: a Unix socket in a
// private 0700 directory (made by gliderlabs' NewAgentListener) whose
// connections are carried back to the client's ssh-agent.
type agentForward struct {
	path string
	ln   net.Listener
}

func (c *serverConn) startAgentForward() (*agentForward, error) {
	ln, err := ssh.NewAgentListener()
	if err != nil {
		return nil, err
	}
	af := &agentForward{path: ln.Addr().String(), ln: ln}
	// Our accept loop rather than ssh.ForwardAgentConnections: it counts
	// each connection in the metrics and the connection waits for it.
	c.startAccepting(ln, func(net.Conn) (string, []byte) { return agentChannelType, nil })
	return af, nil
}

func (af *agentForward) close() {
	af.ln.Close()
	os.RemoveAll(filepath.Dir(af.path))
}

package agent

import (
	"net"
	"net/netip"

	"github.com/agentd/agent/metrics"
)

// counted wraps a tailnet flow handler so that each flow it takes is counted
// as a connection and a session of kind, with its bytes as they flow. (The
// SSH server counts its own connections, sessions and bytes.)
func (a *Agent) counted(kind metrics.Kind, fn func(src, dst netip.AddrPort) (func(net.Conn), bool)) func(src, dst netip.AddrPort) (func(net.Conn), bool) {
	return func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		h, ok := fn(src, dst)
		if !ok {
			return nil, false
		}
		return func(c net.Conn) {
			closed := a.metrics.ConnectionOpened(kind)
			defer closed()
			ended := a.metrics.SessionStarted(kind)
			defer ended()
			h(a.metrics.CountBytes(kind, c))
		}, true
	}
}

package tailnet

import (
	"net"
	"reflect"
	"time"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// DefaultDeadPeerTimeout is how long an inbound TCP connection outlives a
// peer that stopped answering (killed, or its network gone, so no FIN
// came): 30 s idle, then 3 keepalive probes 10 s apart, as OpenSSH's
// ClientAlive does. Netstack's own default is over two hours.
const DefaultDeadPeerTimeout = 60 * time.Second

// deadPeerTimeout is the bound the options ask for; negative means off.
func (o Options) deadPeerTimeout() time.Duration {
	if o.DeadPeerTimeout == 0 {
		return DefaultDeadPeerTimeout
	}
	return o.DeadPeerTimeout
}

// limitDeadPeer makes netstack close an accepted connection within d once
// its peer stops answering: keepalive probes after d/2 of silence, 3 of
// them d/6 apart, and the same bound for data that stays unacknowledged
// (a peer that vanished while we were sending never probes idle). It
// reports false when c is not a netstack connection it can reach into.
func limitDeadPeer(c net.Conn, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	ep, ok := netstackEndpoint(c)
	if !ok {
		return false
	}
	idle := tcpip.KeepaliveIdleOption(d / 2)
	intvl := tcpip.KeepaliveIntervalOption(d / 6)
	user := tcpip.TCPUserTimeoutOption(d)
	if ep.SetSockOpt(&idle) != nil || ep.SetSockOpt(&intvl) != nil ||
		ep.SetSockOptInt(tcpip.KeepaliveCountOption, 3) != nil || ep.SetSockOpt(&user) != nil {
		return false
	}
	ep.SocketOptions().SetKeepAlive(true)
	return true
}

// netstackEndpoint is the gVisor endpoint behind a netstack connection.
// gonet keeps it unexported and netstack sets socket options only from
// environment variables, for the whole process.
func netstackEndpoint(c net.Conn) (tcpip.Endpoint, bool) {
	tc, ok := c.(*gonet.TCPConn)
	if !ok || tc == nil {
		return nil, false
	}
	f := reflect.ValueOf(tc).Elem().FieldByName("ep")
	if !f.IsValid() || f.Type() != reflect.TypeFor[tcpip.Endpoint]() {
		return nil, false
	}
	ep := *(*tcpip.Endpoint)(unsafe.Pointer(f.UnsafeAddr()))
	return ep, ep != nil
}

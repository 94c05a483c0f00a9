package tailnet

import (
	"reflect"
	"sync/atomic"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"tailscale.com/net/packet"
	"tailscale.com/net/tstun"
	"tailscale.com/types/ipproto"
	"tailscale.com/wgengine/filter"
	"tailscale.com/wgengine/netstack"
	"tailscale.com/wgengine/netstack/gro"
)

// timeWaitRecycler lets a new connection reuse the address and port pair
// of one that is still in TIME-WAIT on our side, as Linux does.
//
// When our side closes a connection first (an HTTP server answering
// "Connection: close", say), netstack keeps it in TIME-WAIT for 60 s. The
// peer's netstack picks its source ports at random and knows nothing of our
// TIME-WAIT, so with a thousand such connections a minute about one new
// connection in fifty reuses a pair we still hold. gVisor hands a SYN that
// arrives in TIME-WAIT to a listening socket, but flows taken by the
// forwarder (every forwarded port) have none, so it drops the SYN, and every
// retransmission of it, until TIME-WAIT ends: the dial fails after 15 s.
// Through `agent port-forward` that lost 1-2 % of connections in bursts.
//
// This hook runs before netstack sees an inbound packet: for a SYN whose
// pair is in TIME-WAIT, it ends that old endpoint, so the SYN opens a new
// connection. Old duplicate SYNs, which TIME-WAIT guards against, do not
// outlive a connection inside a WireGuard tunnel. The RST the old endpoint
// sends on its way out carries its own sequence numbers, which the peer's
// new connection (in SYN-SENT) discards.
type timeWaitRecycler struct {
	st   *stack.Stack
	next tstun.GROFilterFunc
	// recycled counts the endpoints ended, for tests and diagnosis.
	recycled atomic.Int64
}

// installTimeWaitRecycler hooks the recycler into w ahead of netstack. It
// returns nil, leaving netstack as it is, if Tailscale's netstack no longer
// has the field it reaches by reflection.
func installTimeWaitRecycler(w *tstun.Wrapper, ns *netstack.Impl) *timeWaitRecycler {
	st, ok := gvisorStack(ns)
	if !ok || w.PostFilterPacketInboundFromWireGuard == nil {
		return nil
	}
	r := &timeWaitRecycler{st: st, next: w.PostFilterPacketInboundFromWireGuard}
	w.PostFilterPacketInboundFromWireGuard = r.filter
	return r
}

func (r *timeWaitRecycler) filter(p *packet.Parsed, w *tstun.Wrapper, batch *gro.GRO) (filter.Response, *gro.GRO) {
	if p.IPProto == ipproto.TCP && p.IsTCPSyn() {
		r.recycle(p)
	}
	return r.next(p, w, batch)
}

func (r *timeWaitRecycler) recycle(p *packet.Parsed) {
	netProto := ipv4.ProtocolNumber
	if p.Dst.Addr().Is6() {
		netProto = ipv6.ProtocolNumber
	}
	id := stack.TransportEndpointID{
		LocalPort:     p.Dst.Port(),
		LocalAddress:  tcpip.AddrFromSlice(p.Dst.Addr().AsSlice()),
		RemotePort:    p.Src.Port(),
		RemoteAddress: tcpip.AddrFromSlice(p.Src.Addr().AsSlice()),
	}
	ep, ok := r.st.FindTransportEndpoint(netProto, tcp.ProtocolNumber, id, netstackNIC).(*tcp.Endpoint)
	if !ok || ep.EndpointState() != tcp.StateTimeWait {
		return
	}
	// Abort takes the endpoint out of the demultiplexer before it returns,
	// so netstack hands this SYN to a listener or the forwarder.
	ep.Abort()
	r.recycled.Add(1)
}

// netstackNIC is the one NIC Tailscale's netstack creates.
const netstackNIC tcpip.NICID = 1

// gvisorStack returns the gVisor stack inside ns. Tailscale does not export
// it; it is reached by reflection, like the packet queue in nsclose.go.
func gvisorStack(ns *netstack.Impl) (*stack.Stack, bool) {
	f := reflect.ValueOf(ns).Elem().FieldByName("ipstack")
	if !f.IsValid() || f.Type() != reflect.TypeFor[*stack.Stack]() || f.IsNil() {
		return nil, false
	}
	return *(**stack.Stack)(unsafe.Pointer(f.UnsafeAddr())), true
}

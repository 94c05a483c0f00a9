package tailnet

import (
	"net/netip"
	"sync"

	"tailscale.com/net/packet"
	"tailscale.com/net/tstun"
	"tailscale.com/wgengine/filter"
	"tailscale.com/wgengine/netstack/gro"
)

// groOneFlow works around a gVisor bug in the version Tailscale v1.102.5
// pins: GRO.Flush hands up only the first packet of each hash bucket
// (groPacketList.Remove clears the link the loop follows; upstream
// google/gvisor#14081). The packets left behind stay in a GRO object that
// goes back to a process-wide pool, and are delivered whenever that object
// is next used, by whichever netstack takes it. Under a burst of
// connections that showed as lost and late segments, and with two Conns in
// one process (tests, agent dev) as one node's own packets delivered into
// the other's stack: it then adopted the peer's address as a subnet address
// and reset every connection to it ("wedged").
//
// A GRO batch holding a single TCP flow never has more than one packet per
// bucket (gVisor keeps one pending packet per flow), so Flush drains it
// fully. This hook flushes the batch whenever the next packet belongs to
// another flow. Bulk transfers, where consecutive packets share a flow, keep
// their coalescing.
type groOneFlow struct {
	next tstun.GROFilterFunc

	mu   sync.Mutex
	flow map[*gro.GRO]groFlow // the flow each batch in progress holds
}

type groFlow struct{ src, dst netip.AddrPort }

// maxGROBatches bounds groOneFlow.flow: tstun flushes a batch at its end
// without telling us, so entries are forgotten in bulk. Losing a live entry
// only ends that batch's coalescing early.
const maxGROBatches = 64

func installGROOneFlow(w *tstun.Wrapper) {
	if w.PostFilterPacketInboundFromWireGuard == nil {
		return
	}
	g := &groOneFlow{next: w.PostFilterPacketInboundFromWireGuard, flow: make(map[*gro.GRO]groFlow)}
	w.PostFilterPacketInboundFromWireGuard = g.filter
}

func (g *groOneFlow) filter(p *packet.Parsed, w *tstun.Wrapper, batch *gro.GRO) (filter.Response, *gro.GRO) {
	key := groFlow{p.Src, p.Dst}
	if batch != nil {
		g.mu.Lock()
		held, ok := g.flow[batch]
		if !ok || held != key {
			delete(g.flow, batch)
		}
		g.mu.Unlock()
		if !ok || held != key {
			batch.Flush()
			batch = nil
		}
	}
	res, out := g.next(p, w, batch)
	if out != nil {
		g.mu.Lock()
		if len(g.flow) >= maxGROBatches {
			clear(g.flow)
		}
		g.flow[out] = key
		g.mu.Unlock()
	}
	return res, out
}

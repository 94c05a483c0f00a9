package tailnet

import (
	"expvar"
	"reflect"
	"sync"
	"time"
	"unsafe"

	"tailscale.com/net/packet"
	"tailscale.com/net/tstun"
	"tailscale.com/wgengine/filter"
	"tailscale.com/wgengine/magicsock"
)

// outboundPacer bounds how many packets WireGuard holds between reading them
// from netstack and handing them to the socket.
//
// WireGuard gives every packet a 64 KiB buffer, whatever its size, and
// queues up to 1,024 batches of 128 packets between its reader and its
// sender with nothing pushing back on netstack. So when the sender falls
// behind (a busy CPU), a TCP sender's whole window moves out of netstack's
// compact buffers into WireGuard's queue at 64 KiB per 1.2 KB segment: during
// a 1 GiB download from an agent, its outbound queue held 30-45 MiB. Holding
// a packet here instead, while too many are in flight, makes netstack's
// outbound queue fill and its TCP wait, as a NIC's full ring does; the
// window stays as large as the path needs and the bytes wait in netstack.
//
// WireGuard reports no sends, so the packets in flight are ours handed to
// it minus the packets magicsock counts as sent or failed. A packet
// WireGuard drops itself (no session yet, a full staging queue) is never
// counted as sent: when nothing is sent for a while the count starts over,
// so a stale count can slow a burst but never stop the flow.
type outboundPacer struct {
	next tstun.FilterFunc
	// sent are magicsock's counters of packets sent on each path and of
	// sends that failed.
	sent []*expvar.Int
	// limit is the most packets in flight before the next one waits.
	limit int64
	// mtu is the tailnet MTU, to count the packets netstack's large
	// segments are split into.
	mtu int

	mu      sync.Mutex
	entered int64 // packets handed to WireGuard
	// written off are packets counted as in flight that WireGuard dropped,
	// or sends of its own (handshakes, keepalives) counted against ours.
	writtenOff int64
}

const (
	// outboundPacketLimit is one of WireGuard's read batches, about two
	// of netstack's 64 KiB segments at MTU 1280 (53 packets each), so one
	// is encrypted and sent while the next is read: 8 MiB of buffers. In
	// a 1 GiB download from `agent run` it took the agent's peak RSS from
	// 52-55 MB to 48.5 MB; twice that limit saved about 2 MB, and in
	// interleaved transfers neither was slower than no limit (docs/bench.md).
	outboundPacketLimit = 128
	// outboundStall is how long the sent count may stand still while
	// packets wait here before the packets in flight are written off.
	outboundStall = 5 * time.Millisecond
	// outboundPoll is how often a waiting packet looks at the sent count.
	outboundPoll = 50 * time.Microsecond
)

// installOutboundPacer hooks the pacer into w's outbound path. The hook
// used is the one tstun runs for every packet netstack hands to WireGuard
// (meant for app connectors, which we do not use; another user of it is
// chained). It returns nil, leaving WireGuard's queue unbounded as before,
// if magicsock no longer has the counters it reads.
func installOutboundPacer(w *tstun.Wrapper, mc *magicsock.Conn) *outboundPacer {
	sent, ok := magicsockSendCounters(mc)
	if !ok {
		return nil
	}
	p := &outboundPacer{
		next:  w.PreFilterPacketOutboundToWireGuardAppConnectorIntercept,
		sent:  sent,
		limit: outboundPacketLimit,
		mtu:   int(tstun.DefaultTUNMTU()),
	}
	w.PreFilterPacketOutboundToWireGuardAppConnectorIntercept = p.filter
	return p
}

// counts returns the packets handed to WireGuard, those magicsock sent or
// failed to send, and those written off.
func (p *outboundPacer) counts() (entered, sent, writtenOff int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.entered, p.sentTotal(), p.writtenOff
}

func (p *outboundPacer) filter(pkt *packet.Parsed, w *tstun.Wrapper) filter.Response {
	p.await(wireSegments(pkt, p.mtu))
	if p.next != nil {
		return p.next(pkt, w)
	}
	return filter.Accept
}

// wireSegments is how many packets of at most mtu bytes p becomes: netstack
// hands over TCP segments of up to 64 KiB, which tstun splits.
func wireSegments(p *packet.Parsed, mtu int) int64 {
	n := len(p.Buffer())
	if n <= mtu {
		return 1
	}
	hdr := n - len(p.Payload())
	per := mtu - hdr
	if per <= 0 {
		return 1
	}
	return int64((n - hdr + per - 1) / per)
}

// await returns once fewer than limit packets are in flight, or once the
// sent count stood still for outboundStall, and counts n more packets.
func (p *outboundPacer) await(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	sent := p.sentTotal()
	var lastMove time.Time
	for {
		inFlight := p.entered - sent - p.writtenOff
		if inFlight < 0 {
			// More was sent than we handed over (WireGuard's own
			// packets, or packets written off that went out later).
			p.writtenOff += inFlight
			inFlight = 0
		}
		if inFlight < p.limit {
			break
		}
		if lastMove.IsZero() {
			lastMove = time.Now()
		} else if time.Since(lastMove) > outboundStall {
			p.writtenOff += inFlight
			break
		}
		time.Sleep(outboundPoll)
		if now := p.sentTotal(); now != sent {
			sent, lastMove = now, time.Now()
		}
	}
	p.entered += n
}

func (p *outboundPacer) sentTotal() int64 {
	var n int64
	for _, c := range p.sent {
		n += c.Value()
	}
	return n
}

// magicsockSendCounters finds magicsock's per-Conn counters of outbound
// packets (direct IPv4 and IPv6, DERP, peer relays) and of failed sends.
// They are not exported, so they are reached by reflection.
func magicsockSendCounters(mc *magicsock.Conn) ([]*expvar.Int, bool) {
	m := reflect.ValueOf(mc).Elem().FieldByName("metrics")
	if !m.IsValid() || m.Kind() != reflect.Pointer || m.IsNil() || m.Type().Elem().Kind() != reflect.Struct {
		return nil, false
	}
	metrics := m.Elem()
	var counters []*expvar.Int
	for _, name := range []string{
		"outboundPacketsIPv4Total", "outboundPacketsIPv6Total", "outboundPacketsDERPTotal",
		"outboundPacketsPeerRelayIPv4Total", "outboundPacketsPeerRelayIPv6Total",
		"outboundPacketsDroppedErrors",
	} {
		f := metrics.FieldByName(name)
		if !f.IsValid() || f.Type() != reflect.TypeFor[expvar.Int]() {
			return nil, false
		}
		counters = append(counters, (*expvar.Int)(unsafe.Pointer(f.UnsafeAddr())))
	}
	return counters, true
}

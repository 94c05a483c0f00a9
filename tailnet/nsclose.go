package tailnet

import (
	"context"
	"reflect"
	"time"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"tailscale.com/wgengine/netstack"
)

// closeNetstack closes ns without hanging when many TCP endpoints are open.
//
// netstack.Impl.Close stops the goroutine that reads netstack's outbound
// packet queue (512 packets) and only then closes the gVisor stack, which
// aborts every connected endpoint, TIME-WAIT included, each with a RST
// written to that queue. With more than about 512 of them (a port forward
// that carried a thousand short connections in the last minute) the queue
// fills and Close blocks forever. Reading the queue while Close runs lets it
// finish; the packets are dropped, since the engine is going away anyway.
// The queue is not exported, so it is reached by reflection; if Tailscale
// renames it, Close runs as before.
func closeNetstack(ns *netstack.Impl) {
	q, ok := linkQueue(ns)
	if !ok {
		ns.Close()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		for {
			pkt := q.ReadContext(ctx)
			if pkt == nil {
				return
			}
			pkt.DecRef()
		}
	}()
	ns.Close()
	cancel()
	<-drained
}

type packetQueue interface {
	ReadContext(context.Context) *stack.PacketBuffer
	NumQueued() int
}

const (
	// closeLinger bounds how long Close lets packets already on their way
	// out (the FINs and RSTs of connections the program just closed)
	// reach the wire before the engine goes, as a kernel keeps sending a
	// closed socket's last segments after its process exits. Without it,
	// `agent port-forward` exiting under load could drop a FIN, and the
	// agent held that flow until its keepalive gave up.
	closeLinger = 500 * time.Millisecond
	// closeQuiet is how long the outbound path must have been still
	// (nothing queued in netstack, nothing new handed to WireGuard or
	// sent) before Close goes on.
	closeQuiet = 20 * time.Millisecond
)

// lingerOutbound waits until the outbound path has been quiet for
// closeQuiet, or closeLinger has passed. It returns how long it waited.
func (c *Conn) lingerOutbound() time.Duration {
	start := time.Now()
	if c.ns == nil {
		return 0
	}
	q, ok := linkQueue(c.ns)
	if !ok && c.outPacer == nil {
		return 0
	}
	var lastEntered, lastSent int64 = -1, -1
	var stillSince time.Time
	for {
		now := time.Now()
		busy := ok && q.NumQueued() > 0
		if c.outPacer != nil {
			entered, sent, _ := c.outPacer.counts()
			if entered != lastEntered || sent != lastSent {
				busy = true
			}
			lastEntered, lastSent = entered, sent
		}
		switch {
		case busy:
			stillSince = time.Time{}
		case stillSince.IsZero():
			stillSince = now
		case now.Sub(stillSince) >= closeQuiet:
			return now.Sub(start)
		}
		if now.Sub(start) >= closeLinger {
			return now.Sub(start)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func linkQueue(ns *netstack.Impl) (packetQueue, bool) {
	f := reflect.ValueOf(ns).Elem().FieldByName("linkEP")
	if !f.IsValid() || f.Kind() != reflect.Pointer || f.IsNil() {
		return nil, false
	}
	v := reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem().Interface()
	q, ok := v.(packetQueue)
	return q, ok
}

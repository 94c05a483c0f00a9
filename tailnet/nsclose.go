package tailnet

import (
	"context"
	"reflect"
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

package portforward

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentd/agent/internal/relay"
)

// maxDatagram is the largest UDP payload; one buffer of this size per
// direction holds any datagram whole.
const maxDatagram = 64 << 10

// RelayDatagrams copies datagrams between two connected packet connections,
// one datagram per Read and Write, until neither direction has carried a
// datagram for idle, or either side fails. It then closes both and returns
// how many datagrams went each way.
//
// A refusal (the workspace answered with ICMP port unreachable because
// nothing is bound yet) does not end the flow: the service may start a
// moment later, and UDP gives the sender no promise anyway.
func RelayDatagrams(a, b net.Conn, idle time.Duration) (aToB, bToA int64) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var once sync.Once
	stop := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	done := make(chan int64, 1)
	go func() { done <- copyDatagrams(b, a, &last, idle, stop) }()
	bToA = copyDatagrams(a, b, &last, idle, stop)
	aToB = <-done
	return aToB, bToA
}

// copyDatagrams moves datagrams from src to dst. Idleness is judged on the
// last datagram in either direction, so a flow where only one side talks
// stays up as long as it talks.
func copyDatagrams(dst, src net.Conn, last *atomic.Int64, idle time.Duration, stop func()) int64 {
	defer stop()
	buf := make([]byte, maxDatagram)
	var count int64
	for {
		deadline := time.Unix(0, last.Load()).Add(idle)
		if err := src.SetReadDeadline(deadline); err != nil {
			return count
		}
		n, err := src.Read(buf)
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				if time.Since(time.Unix(0, last.Load())) >= idle {
					return count
				}
				continue
			case relay.IsRefused(err):
				continue
			default:
				return count
			}
		}
		last.Store(time.Now().UnixNano())
		if _, err := dst.Write(buf[:n]); err != nil && !relay.IsRefused(err) {
			return count
		}
		count++
	}
}

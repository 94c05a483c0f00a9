package forwardclient

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentd/agent/internal/relay"
)

// udpQueue is how many datagrams from one local sender may wait while its
// flow to the workspace is being set up or is slow; beyond that they are
// dropped, as a congested UDP path would.
const udpQueue = 128

// udpListener serves one local UDP socket. Each local sender address is one
// flow with its own connection to the workspace port, so replies go back to
// the sender that asked.
type udpListener struct {
	f  *Forwarder
	m  Mapping
	pc *net.UDPConn

	mu     sync.Mutex
	flows  map[netip.AddrPort]*udpFlow
	wg     sync.WaitGroup
	closed bool
}

type udpFlow struct {
	src  netip.AddrPort
	in   chan []byte
	last atomic.Int64
	done chan struct{}
	once sync.Once
}

func (f *udpFlow) stop() { f.once.Do(func() { close(f.done) }) }

func (l *udpListener) serve() error {
	buf := make([]byte, 64<<10)
	for {
		n, src, err := l.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if l.f.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			if relay.IsRefused(err) {
				continue // a reply to a sender that has gone away
			}
			return fmt.Errorf("reading local UDP %s: %w", l.pc.LocalAddr(), err)
		}
		flow := l.flow(src)
		if flow == nil {
			return nil
		}
		select {
		case flow.in <- append([]byte(nil), buf[:n]...):
		default:
		}
	}
}

// flow returns the flow for src, starting one if needed; nil once closed.
func (l *udpListener) flow(src netip.AddrPort) *udpFlow {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	if fl := l.flows[src]; fl != nil {
		return fl
	}
	fl := &udpFlow{src: src, in: make(chan []byte, udpQueue), done: make(chan struct{})}
	fl.last.Store(time.Now().UnixNano())
	l.flows[src] = fl
	l.wg.Add(1)
	go l.run(fl)
	return fl
}

func (l *udpListener) run(fl *udpFlow) {
	defer l.wg.Done()
	defer func() {
		l.mu.Lock()
		if l.flows[fl.src] == fl {
			delete(l.flows, fl.src)
		}
		l.mu.Unlock()
	}()
	f := l.f
	ctx, cancel := context.WithTimeout(f.ctx, f.opts.DialTimeout)
	remote, err := f.opts.Dialer.DialUDP(ctx, l.m.Remote)
	cancel()
	if err != nil {
		if f.ctx.Err() == nil {
			f.opts.Notify(fmt.Sprintf("cannot reach UDP port %d in the workspace: %v", l.m.Remote, err))
		}
		return
	}
	defer remote.Close()
	idle := f.opts.UDPIdleTimeout

	// Replies from the workspace go back to this flow's sender.
	replies := make(chan struct{})
	go func() {
		defer close(replies)
		defer fl.stop()
		buf := make([]byte, 64<<10)
		for {
			remote.SetReadDeadline(time.Now().Add(idle))
			n, err := remote.Read(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) || relay.IsRefused(err) {
					select {
					case <-fl.done:
						return
					default:
						continue // the sending side decides when the flow is idle
					}
				}
				return
			}
			fl.last.Store(time.Now().UnixNano())
			if _, err := l.pc.WriteToUDPAddrPort(buf[:n], fl.src); err != nil && !relay.IsRefused(err) {
				return
			}
		}
	}()

	timer := time.NewTimer(idle)
	defer timer.Stop()
	for {
		select {
		case b := <-fl.in:
			fl.last.Store(time.Now().UnixNano())
			if _, err := remote.Write(b); err != nil && !relay.IsRefused(err) {
				fl.stop()
			}
		case <-timer.C:
			since := time.Since(time.Unix(0, fl.last.Load()))
			if since >= idle {
				fl.stop()
				continue
			}
			timer.Reset(idle - since)
		case <-fl.done:
			remote.Close()
			<-replies
			return
		case <-f.ctx.Done():
			fl.stop()
		}
	}
}

func (l *udpListener) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.flows)
}

func (l *udpListener) close() {
	l.mu.Lock()
	l.closed = true
	for _, fl := range l.flows {
		fl.stop()
	}
	l.mu.Unlock()
	l.pc.Close()
	l.wg.Wait()
}

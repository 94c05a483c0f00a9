package netcheck

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// icmpMethod says which kind of socket could send ICMP echo.
type icmpMethod string

const (
	icmpDatagram icmpMethod = "icmp (unprivileged ping socket)"
	icmpRaw      icmpMethod = "icmp (raw socket)"
)

// errNoICMP means neither socket kind is allowed: no CAP_NET_RAW and the
// group is outside net.ipv4.ping_group_range.
var errNoICMP = errors.New("ICMP not permitted")

// pinger sends IPv4 echo requests with the don't-fragment bit set, so that
// a probe of a given size either arrives whole or not at all.
type pinger struct {
	fd     int
	method icmpMethod
	id     uint16

	mu      sync.Mutex
	waiters map[uint16]chan time.Time
	closed  bool
}

func openPinger() (*pinger, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	method := icmpDatagram
	if err != nil {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		method = icmpRaw
		if err != nil {
			return nil, errNoICMP
		}
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_PROBE); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting don't-fragment on the ICMP socket: %w", err)
	}
	// A short receive timeout lets the reader notice Close.
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting a receive timeout on the ICMP socket: %w", err)
	}
	p := &pinger{fd: fd, method: method, id: uint16(os.Getpid()), waiters: map[uint16]chan time.Time{}}
	if method == icmpDatagram {
		// The kernel rewrites the echo ID to the socket's port.
		if sa, err := unix.Getsockname(fd); err == nil {
			if in, ok := sa.(*unix.SockaddrInet4); ok {
				p.id = uint16(in.Port)
			}
		}
	}
	go p.readLoop()
	return p, nil
}

func (p *pinger) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
}

func (p *pinger) readLoop() {
	defer unix.Close(p.fd)
	buf := make([]byte, 65536)
	for {
		p.mu.Lock()
		closed := p.closed
		p.mu.Unlock()
		if closed {
			return
		}
		n, _, err := unix.Recvfrom(p.fd, buf, 0)
		if err != nil {
			continue
		}
		pkt := buf[:n]
		if p.method == icmpRaw {
			if n < 20 {
				continue
			}
			ihl := int(pkt[0]&0x0f) * 4
			if ihl > n {
				continue
			}
			pkt = pkt[ihl:]
		}
		msg, err := icmp.ParseMessage(1, pkt)
		if err != nil || msg.Type != ipv4.ICMPTypeEchoReply {
			continue
		}
		echo, ok := msg.Body.(*icmp.Echo)
		if !ok || (p.method == icmpRaw && uint16(echo.ID) != p.id) {
			continue
		}
		p.mu.Lock()
		ch := p.waiters[uint16(echo.Seq)]
		p.mu.Unlock()
		if ch != nil {
			select {
			case ch <- time.Now():
			default:
			}
		}
	}
}

// errTooBig: the packet exceeds the local interface MTU (EMSGSIZE), so it
// never left.
var errTooBig = errors.New("larger than the local MTU")

// echo sends one request of totalSize bytes (IP header included) and waits
// for its reply until ctx ends. It returns the round-trip time.
func (p *pinger) echo(ctx context.Context, dst netip.Addr, seq uint16, totalSize int) (time.Duration, error) {
	dataLen := totalSize - 28
	if dataLen < 8 {
		dataLen = 8
	}
	data := make([]byte, dataLen)
	copy(data, "agent netcheck probe")
	binary.BigEndian.PutUint64(data[dataLen-8:], uint64(time.Now().UnixNano()))
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: int(p.id), Seq: int(seq), Data: data}}
	wire, err := msg.Marshal(nil)
	if err != nil {
		return 0, err
	}
	ch := make(chan time.Time, 1)
	p.mu.Lock()
	p.waiters[seq] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.waiters, seq)
		p.mu.Unlock()
	}()
	sent := time.Now()
	sa := &unix.SockaddrInet4{Addr: dst.As4()}
	if err := unix.Sendto(p.fd, wire, 0, sa); err != nil {
		if errors.Is(err, unix.EMSGSIZE) {
			return 0, errTooBig
		}
		return 0, fmt.Errorf("sending ICMP echo to %s: %w", dst, err)
	}
	select {
	case at := <-ch:
		return at.Sub(sent), nil
	case <-ctx.Done():
		return 0, fmt.Errorf("no reply from %s within %v", dst, time.Since(sent).Round(time.Millisecond))
	}
}

// pingGroupRange returns net.ipv4.ping_group_range for the evidence.
func pingGroupRange() string {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	if err != nil {
		return "unknown"
	}
	return strings.Join(strings.Fields(string(b)), " ")
}

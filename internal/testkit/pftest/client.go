package pftest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/agentd/agent/client/forwardclient"
)

// ClientPath routes every check through the laptop side too: for each
// workspace port it opens a forwardclient listener on 127.0.0.1 (local port
// chosen by the system) whose connections go through d, and dials that
// listener. Messages the forwarder prints for the user are collected in
// Notices.
type ClientPath struct {
	tb testing.TB
	d  forwardclient.Dialer

	mu      sync.Mutex
	fwds    map[string]*forwardclient.Forwarder
	notices []string
}

// NewClientPath returns a ClientPath whose listeners close at tb's cleanup.
func NewClientPath(tb testing.TB, d forwardclient.Dialer) *ClientPath {
	p := &ClientPath{tb: tb, d: d, fwds: make(map[string]*forwardclient.Forwarder)}
	tb.Cleanup(p.close)
	return p
}

// Env returns the checks' Env for this path.
func (p *ClientPath) Env() Env {
	return Env{DialTCP: p.DialTCP, DialUDP: p.DialUDP}
}

// Notices returns the user-facing messages printed so far.
func (p *ClientPath) Notices() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.notices...)
}

// Forwarder returns the forwarder for network and port, opening it if
// needed.
func (p *ClientPath) Forwarder(network string, port uint16) (*forwardclient.Forwarder, error) {
	key := fmt.Sprintf("%s/%d", network, port)
	p.mu.Lock()
	defer p.mu.Unlock()
	if f := p.fwds[key]; f != nil {
		return f, nil
	}
	m := forwardclient.Mapping{Network: network, Bind: netip.MustParseAddr("127.0.0.1"), Remote: port}
	f, err := forwardclient.Listen(forwardclient.Options{
		Dialer: p.d,
		Notify: func(msg string) {
			p.mu.Lock()
			p.notices = append(p.notices, msg)
			p.mu.Unlock()
		},
	}, []forwardclient.Mapping{m})
	if err != nil {
		return nil, err
	}
	go f.Serve(context.Background())
	p.fwds[key] = f
	return f, nil
}

func (p *ClientPath) localAddr(network string, port uint16) (string, error) {
	f, err := p.Forwarder(network, port)
	if err != nil {
		return "", err
	}
	return f.Active()[0].Addrs[0].String(), nil
}

// DialTCP connects to the local listener that forwards to port.
func (p *ClientPath) DialTCP(ctx context.Context, port uint16) (net.Conn, error) {
	addr, err := p.localAddr("tcp", port)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp4", addr)
}

// DialUDP connects a UDP socket to the local listener that forwards to port.
func (p *ClientPath) DialUDP(ctx context.Context, port uint16) (net.Conn, error) {
	addr, err := p.localAddr("udp", port)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	return d.DialContext(ctx, "udp4", addr)
}

func (p *ClientPath) close() {
	p.mu.Lock()
	fwds := p.fwds
	p.fwds = nil
	p.mu.Unlock()
	for _, f := range fwds {
		f.Close()
	}
}

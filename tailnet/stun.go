package tailnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"tailscale.com/net/stun"
)

// STUNServer answers STUN binding requests, so nodes learn their public
// UDP address.
type STUNServer struct {
	logger *slog.Logger
	pc     *net.UDPConn
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// ListenSTUN listens on addr ("host:port", UDP) and serves until ctx ends
// or Close. It logs to logger (nil discards).
func ListenSTUN(ctx context.Context, addr string, logger *slog.Logger) (*STUNServer, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	lc := net.ListenConfig{}
	pc, err := lc.ListenPacket(ctx, "udp", addr)
	if err != nil {
		return nil, fmt.Errorf("tailnet: STUN listen on %s: %w", addr, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &STUNServer{
		logger: logger,
		pc:     pc.(*net.UDPConn),
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
	}
	go func() {
		<-ctx.Done()
		s.pc.Close() // ends the read in serve
	}()
	go s.serve()
	logger.Debug("STUN listening", "addr", s.pc.LocalAddr().String())
	return s, nil
}

func (s *STUNServer) serve() {
	defer close(s.done)
	// Binding requests are a few dozen bytes; anything that does not fit
	// is not one, and fails to parse.
	buf := make([]byte, 2048)
	for {
		n, src, err := s.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || s.ctx.Err() != nil {
				return
			}
			s.logger.Warn("STUN read failed; retrying in 1 s", "err", err)
			select {
			case <-time.After(time.Second):
			case <-s.ctx.Done():
				return
			}
			continue
		}
		reply, ok := stunReply(buf[:n], src)
		if !ok {
			continue
		}
		if _, err := s.pc.WriteToUDPAddrPort(reply, src); err != nil {
			s.logger.Debug("STUN reply not sent", "to", src.String(), "err", err)
		}
	}
}

// stunReply answers a binding request with the address it came from; it
// reports false for anything else.
func stunReply(pkt []byte, src netip.AddrPort) ([]byte, bool) {
	if !stun.Is(pkt) {
		return nil, false
	}
	txID, err := stun.ParseBindingRequest(pkt)
	if err != nil {
		return nil, false
	}
	// A dual-stack socket reports IPv4 senders as ::ffff:a.b.c.d; they
	// must learn their IPv4 address.
	return stun.Response(txID, netip.AddrPortFrom(src.Addr().Unmap(), src.Port())), true
}

// LocalAddr is the UDP address the server listens on.
func (s *STUNServer) LocalAddr() net.Addr { return s.pc.LocalAddr() }

// Close stops the server and waits for it.
func (s *STUNServer) Close() error {
	s.cancel()
	<-s.done
	return nil
}

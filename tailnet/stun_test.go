package tailnet

import (
	"context"
	"github.com/agentd/agent/internal/syncbuf"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"tailscale.com/net/stun"
)

func TestSTUNServer(t *testing.T) {
	var logs syncbuf.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := ListenSTUN(ctx, "127.0.0.1:0", logger)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !strings.Contains(logs.String(), "STUN listening") || !strings.Contains(logs.String(), s.LocalAddr().String()) {
		t.Fatalf("listen address not logged through our logger; got %q", logs.String())
	}

	client, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server := s.LocalAddr().(*net.UDPAddr).AddrPort()
	ask := func(pkt []byte, wait time.Duration) (reply []byte, ok bool) {
		t.Helper()
		if _, err := client.WriteToUDPAddrPort(pkt, server); err != nil {
			t.Fatal(err)
		}
		client.SetReadDeadline(time.Now().Add(wait))
		buf := make([]byte, 1500)
		n, err := client.Read(buf)
		if err != nil {
			return nil, false
		}
		return buf[:n], true
	}

	// Junk gets no answer, and the server keeps serving.
	if reply, ok := ask([]byte("not a STUN packet"), 300*time.Millisecond); ok {
		t.Fatalf("server answered junk with %q", reply)
	}
	tx := stun.NewTxID()
	reply, ok := ask(stun.Request(tx), 5*time.Second)
	if !ok {
		t.Fatal("no answer to a binding request")
	}
	gotTx, addr, err := stun.ParseResponse(reply)
	if err != nil {
		t.Fatalf("answer does not parse: %v", err)
	}
	want := client.LocalAddr().(*net.UDPAddr).AddrPort()
	if gotTx != tx || addr != want {
		t.Fatalf("answer says tx %x, address %v; want tx %x, address %v", gotTx, addr, tx, want)
	}

	// Ending the context stops the server.
	cancel()
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		t.Fatal("server still running after its context ended")
	}
	if _, ok := ask(stun.Request(stun.NewTxID()), 300*time.Millisecond); ok {
		t.Fatal("server answered after its context ended")
	}
	if _, err := ListenSTUN(context.Background(), "127.0.0.1:notaport", nil); err == nil {
		t.Fatal("ListenSTUN accepted a bad address")
	}
}

func TestSTUNReplyUnmapsIPv4(t *testing.T) {
	tx := stun.NewTxID()
	src := netip.MustParseAddrPort("[::ffff:192.0.2.7]:41641")
	reply, ok := stunReply(stun.Request(tx), src)
	if !ok {
		t.Fatal("binding request not answered")
	}
	_, addr, err := stun.ParseResponse(reply)
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.MustParseAddrPort("192.0.2.7:41641"); addr != want {
		t.Fatalf("reply carries %v, want %v", addr, want)
	}
}

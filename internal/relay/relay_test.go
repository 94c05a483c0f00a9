package relay

import (
	"errors"
	"net"
	"testing"
	"time"
)

// A refusal and a reset are told apart on real kernel errors: only a port
// nobody listens on is "refused".
func TestRefusedIsNotReset(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := <-accepted
	s.(*net.TCPConn).SetLinger(0)
	s.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, reset := c.Read(make([]byte, 1))
	ln.Close()
	_, refused := net.Dial("tcp4", addr)

	if !IsRefused(refused) || IsReset(refused) {
		t.Errorf("dial to a closed port: %v: IsRefused %v, IsReset %v, want true, false", refused, IsRefused(refused), IsReset(refused))
	}
	if IsRefused(reset) || !IsReset(reset) {
		t.Errorf("read after the peer reset: %v: IsRefused %v, IsReset %v, want false, true", reset, IsRefused(reset), IsReset(reset))
	}
	// The userspace stack's wording of the same two conditions.
	if !IsRefused(errors.New("connect tcp [fd5e::1]:80: connection was refused")) {
		t.Error("netstack's refusal is not recognised")
	}
	if IsRefused(errors.New("read tcp [fd5e::1]:80: connection reset by peer")) {
		t.Error("netstack's reset is taken for a refusal")
	}
}

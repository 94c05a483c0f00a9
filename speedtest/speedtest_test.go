package speedtest

import (
	"context"
	"net"
	"testing"
	"time"
)

// Both directions over real loopback TCP: bytes flow for about the
// duration and the counts agree with what was sent.
func TestBothDirectionsOverTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()

	for _, dir := range []Direction{Download, Upload} {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		res, err := Run(ctx, c, dir, 300*time.Millisecond)
		if err != nil {
			t.Fatalf("%v: %v", dir, err)
		}
		if res.Bytes < chunk || res.Duration < 200*time.Millisecond || res.Duration > 10*time.Second {
			t.Errorf("%v: %d bytes in %v", dir, res.Bytes, res.Duration)
		}
		t.Logf("%v: %.0f Mbit/s", dir, res.BitsPerSecond()/1e6)
	}
}

// A connection that is not a speed test is closed, and the server goes on.
func TestGarbageIsClosed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 10)); err == nil {
		t.Fatalf("read %d bytes from a refused request", n)
	}
	c.Close()
	c, _ = net.Dial("tcp", ln.Addr().String())
	if _, err := Run(ctx, c, Download, 100*time.Millisecond); err != nil {
		t.Fatalf("after garbage: %v", err)
	}
}

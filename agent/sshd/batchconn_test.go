package sshd

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// loopbackPair is a connected pair of real TCP sockets.
func loopbackPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// Many small writes made while the socket is busy leave together, in
// order, and nothing is lost.
func TestBatchedConnCoalescesInOrder(t *testing.T) {
	client, server := loopbackPair(t)
	inner := &countingConn{Conn: server}
	c := newBatchedConn(inner, &bufPool{})
	const pieces, size = 8192, 1024
	var want bytes.Buffer
	for i := 0; i < pieces; i++ {
		want.Write(bytes.Repeat([]byte{byte(i)}, size))
	}
	wrote := make(chan error, 1)
	go func() {
		src := want.Bytes()
		for i := 0; i < pieces; i++ {
			if _, err := c.Write(src[i*size : (i+1)*size]); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	// Not reading for a while fills the socket, so writes pile up.
	time.Sleep(200 * time.Millisecond)
	got := make([]byte, want.Len())
	if _, err := io.ReadFull(client, got); err != nil {
		t.Fatal(err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Fatal("bytes arrived changed or out of order")
	}
	if n := inner.writes.Load(); n > pieces/8 {
		t.Fatalf("%d writes of %d bytes reached the socket as %d writes, want at most %d", pieces, size, n, pieces/8)
	}
}

// Close delivers what is pending before closing the socket.
func TestBatchedConnCloseFlushes(t *testing.T) {
	client, server := loopbackPair(t)
	c := newBatchedConn(server, &bufPool{})
	msg := bytes.Repeat([]byte("last words "), 100000)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("got %d bytes before the close, want %d", len(got), len(msg))
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after close: %v, want net.ErrClosed", err)
	}
}

// A client that stops reading holds Close for at most its timeout, and the
// writer blocked behind the full buffer gets an error instead of hanging.
func TestBatchedConnCloseBoundedWhenPeerStalls(t *testing.T) {
	_, server := loopbackPair(t)
	c := newBatchedConn(server, &bufPool{})
	c.closeTimeout = 300 * time.Millisecond
	writeErr := make(chan error, 1)
	go func() {
		chunk := make([]byte, 64<<10)
		for {
			if _, err := c.Write(chunk); err != nil {
				writeErr <- err
				return
			}
		}
	}()
	time.Sleep(300 * time.Millisecond) // socket and pending buffer fill up
	start := time.Now()
	c.Close()
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("Close took %v with a stalled peer, want about %v", d, c.closeTimeout)
	}
	select {
	case err := <-writeErr:
		if err == nil {
			t.Fatal("blocked write returned no error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("write blocked behind a closed connection")
	}
}

// Idle chunks outlive garbage collections (a bulk transfer under the
// agent's memory limit collects every few milliseconds), and a stream of
// writes reuses them instead of allocating.
func TestBatchedConnReusesChunks(t *testing.T) {
	var pool bufPool
	b := pool.get()
	pool.put(b)
	runtime.GC()
	runtime.GC()
	if got := pool.get(); got != b {
		t.Fatal("an idle chunk did not survive two garbage collections")
	}

	client, server := loopbackPair(t)
	c := newBatchedConn(server, &pool)
	go io.Copy(io.Discard, client)
	piece := make([]byte, 32<<10)
	write := func(n int) {
		for range n {
			if _, err := c.Write(piece); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(256) // warm: the pool holds what a stream needs
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	write(2048) // 64 MiB
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 4*chunkSize {
		t.Errorf("writing 64 MiB allocated %d KiB, want at most %d KiB", got>>10, 4*chunkSize>>10)
	}
}

package client

import (
	"context"
	"errors"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// A peer that keeps sending keeps the context alive well past the bound;
// once it stops, the context ends about the bound later, with the cause.
func TestUntilSilentFollowsProgress(t *testing.T) {
	const bound = 300 * time.Millisecond
	var rx atomic.Int64
	why := errors.New("silent")
	ctx, cancel := untilSilent(context.Background(), bound, rx.Load, why)
	defer cancel()
	sending := time.Now()
	var last time.Time
	for time.Since(sending) < 4*bound {
		rx.Add(100)
		last = time.Now()
		select {
		case <-ctx.Done():
			t.Fatalf("ended after %v while the peer kept sending", time.Since(sending).Round(time.Millisecond))
		case <-time.After(bound / 3):
		}
	}
	select {
	case <-ctx.Done():
	case <-time.After(10 * bound):
		t.Fatalf("still on %v after the peer went silent", 10*bound)
	}
	if took := time.Since(last); took < bound {
		t.Errorf("ended %v after the peer went silent, want at least about %v", took, bound)
	}
	if !errors.Is(context.Cause(ctx), why) {
		t.Errorf("cause %v, want %v", context.Cause(ctx), why)
	}
}

func TestUntilSilentWithoutBound(t *testing.T) {
	ctx, cancel := untilSilent(context.Background(), 0, func() int64 { return 0 }, errors.New("silent"))
	defer cancel()
	select {
	case <-ctx.Done():
		t.Fatal("a context without a bound ended")
	case <-time.After(100 * time.Millisecond):
	}
}

// The handshake ends when its context does; once the handshake clears the
// deadline (the session is up), the context no longer touches the
// connection, and the watch is released.
func TestBoundHandshake(t *testing.T) {
	t.Run("silent", func(t *testing.T) {
		a, b := net.Pipe()
		defer b.Close()
		ctx, cancel := context.WithCancel(context.Background())
		conn := BoundHandshake(ctx, nil, a)
		defer conn.Close()
		time.AfterFunc(50*time.Millisecond, cancel)
		_, err := conn.Read(make([]byte, 1))
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("a read during a handshake whose context ended: %v, want a deadline error", err)
		}
	})
	t.Run("up", func(t *testing.T) {
		a, b := net.Pipe()
		defer b.Close()
		ctx, cancel := context.WithCancel(context.Background())
		var released atomic.Bool
		conn := BoundHandshake(ctx, func() { released.Store(true) }, a)
		defer conn.Close()
		conn.SetDeadline(time.Time{})
		if !released.Load() {
			t.Error("the watch was not released when the handshake cleared its deadline")
		}
		cancel()
		go b.Write([]byte{1})
		if _, err := conn.Read(make([]byte, 1)); err != nil {
			t.Fatalf("a read after the handshake, once the context ended: %v", err)
		}
	})
	t.Run("failed", func(t *testing.T) {
		a, b := net.Pipe()
		defer b.Close()
		var released atomic.Bool
		conn := BoundHandshake(context.Background(), func() { released.Store(true) }, a)
		conn.Close()
		if !released.Load() {
			t.Error("closing the connection did not release the watch")
		}
	})
}

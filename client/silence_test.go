package client

import (
	"context"
	"errors"
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

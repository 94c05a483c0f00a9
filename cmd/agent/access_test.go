package main

import (
	"context"
	"errors"
	"testing"
	"time"
)

// openAccess is a workspace's access: on until done is closed, then ended
// for the reason why.
type openAccess struct {
	done chan struct{}
	why  error
}

func (a *openAccess) Done() <-chan struct{} { return a.done }
func (a *openAccess) Err() error {
	select {
	case <-a.done:
		return a.why
	default:
		return nil
	}
}

// When the command itself is going away (Ctrl-C, or OpenSSH gone from under
// agent ssh --stdio), its error is not a hang-up whose reason the
// coordinator may be about to send: untilAccessEnds returns at once. It
// used to wait a second for a reason, and every `ssh ws.agent` through the
// ProxyCommand that OpenSSH hung up first took 1.2 s instead of 0.2 s.
func TestUntilAccessEndsDoesNotWaitWhenCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	ws := &openAccess{done: make(chan struct{})}
	start := time.Now()
	err := untilAccessEnds(ctx, ws, func(ctx context.Context) error {
		cancel()
		return ctx.Err()
	})
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("untilAccessEnds took %v after its context was cancelled, want no wait", took)
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
}

// A connection that fails while access is still on waits a moment for the
// coordinator's reason, and reports the reason instead of the failure.
func TestUntilAccessEndsReportsTheReason(t *testing.T) {
	why := errors.New(`access to workspace "ws1" ended: token revoked`)
	ws := &openAccess{done: make(chan struct{}), why: why}
	err := untilAccessEnds(context.Background(), ws, func(ctx context.Context) error {
		time.AfterFunc(100*time.Millisecond, func() { close(ws.done) })
		return errors.New("SSH connection to the workspace: EOF")
	})
	if !errors.Is(err, why) {
		t.Errorf("got %v, want the access decision %v", err, why)
	}
}

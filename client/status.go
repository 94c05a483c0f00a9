package client

import (
	"context"
	"fmt"
	"time"

	"github.com/agentd/agent/protocol"
)

// This file words what the coordinator knows about the workspace's agent
// (its tunnel_status: online or since when offline, and the agent's own
// network verdict), so that a failed connection names its cause instead of
// ending in a bare timeout.

// hostCheckHint is the next step when the workspace's network is broken:
// the causes are visible only from the node.
const hostCheckHint = `run "agent netcheck --host" on its node`

// problem is problemLocked under the lock.
func (w *Workspace) problem() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.problemLocked()
}

// problemLocked explains why the workspace cannot be reached, as far as the
// coordinator knows: "it is offline: ..." or "it reports its network broken
// (...)". It is "" when the agent is online and its network not broken.
func (w *Workspace) problemLocked() string {
	s := w.status
	switch {
	case s == nil:
		return ""
	case !s.Online:
		return "it is " + offlineText(s)
	case s.Network != nil && s.Network.Status == protocol.NetworkBroken:
		return fmt.Sprintf("it reports its network broken (agent netcheck at %s: %s); %s", clock(s.Network.At), s.Network.Summary, hostCheckHint)
	}
	return ""
}

// warningLocked is the line to warn with before connecting, and a key that
// changes only when the state behind it does.
func (w *Workspace) warningLocked() (text, key string) {
	s := w.status
	if s == nil {
		return "", ""
	}
	// Not OfflineSince: a version 1 coordinator leaves it to the client
	// to note, and a version 2 one then says it again more exactly.
	key = fmt.Sprint(s.Online, s.OfflineReason)
	if s.Network != nil {
		// Not At: the agent's quick probe and the full report after it
		// say the same thing a moment apart.
		key += fmt.Sprint(s.Network.Status, s.Network.Summary)
	}
	subject := fmt.Sprintf("workspace %q", w.name)
	switch {
	case !s.Online:
		return subject + " is " + offlineText(s) + "; waiting for it", key
	case s.Network == nil:
		return "", key
	case s.Network.Status == protocol.NetworkBroken:
		return fmt.Sprintf("%s reports its network broken (agent netcheck at %s: %s); %s", subject, clock(s.Network.At), s.Network.Summary, hostCheckHint), key
	case s.Network.Status == protocol.NetworkDegraded:
		return fmt.Sprintf("%s reports its network degraded (agent netcheck at %s: %s); connections may be slow or fail", subject, clock(s.Network.At), s.Network.Summary), key
	}
	return "", key
}

// offlineText words an offline agent: since when, how it left, and the last
// network verdict it gave.
func offlineText(s *protocol.TunnelStatus) string {
	var text string
	switch s.OfflineReason {
	case protocol.GoneLost:
		text = fmt.Sprintf("offline: its agent lost its connection to the coordinator at %s", clockAgo(s.OfflineSince))
	case protocol.GoneDisconnected:
		text = fmt.Sprintf("offline: its agent disconnected at %s (the workspace stopped or is restarting)", clockAgo(s.OfflineSince))
	default:
		text = "offline: its agent is not connected to the coordinator"
	}
	v := s.Network
	if v == nil {
		return text
	}
	switch v.Status {
	case protocol.NetworkOK:
		return fmt.Sprintf("%s; its last network self-check (agent netcheck at %s) was ok", text, clock(v.At))
	case protocol.NetworkBroken:
		return fmt.Sprintf("%s; its last network verdict was broken (agent netcheck at %s: %s); %s", text, clock(v.At), v.Summary, hostCheckHint)
	}
	return fmt.Sprintf("%s; its last network verdict was %s (agent netcheck at %s: %s)", text, v.Status, clock(v.At), v.Summary)
}

// clock shows a time of day in the local zone, with the date when it is not
// today.
func clock(t time.Time) string {
	t = t.Local()
	now := time.Now()
	if y, m, d := t.Date(); y == now.Year() && m == now.Month() && d == now.Day() {
		return t.Format("15:04:05")
	}
	return t.Format("2006-01-02 15:04:05")
}

func clockAgo(t time.Time) string {
	return fmt.Sprintf("%s, %s ago", clock(t), time.Since(t).Round(time.Second))
}

// giveUpWhenUnhealthy calls giveUp with the reason once the workspace has
// been offline, or its network broken, for UnhealthyWait without a break.
// It returns when ctx ends or after calling giveUp.
func (w *Workspace) giveUpWhenUnhealthy(ctx context.Context, giveUp func(problem string)) {
	if w.unhealthyWait < 0 {
		return
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		w.mu.Lock()
		problem, changed := w.problemLocked(), w.changed
		w.mu.Unlock()
		var fire <-chan time.Time
		switch {
		case problem != "" && timer == nil:
			timer = time.NewTimer(w.unhealthyWait)
			fire = timer.C
		case problem != "":
			fire = timer.C
		case timer != nil:
			timer.Stop()
			timer = nil
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-fire:
			giveUp(problem)
			return
		}
	}
}

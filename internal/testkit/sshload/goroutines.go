package sshload

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// Goroutines reads the agent's goroutine dump (runtime/pprof's grouped
// text form) from its status socket.
func (p *Probe) Goroutines(ctx context.Context) (string, error) {
	body, err := p.get(ctx, "/debug/goroutines", "goroutines")
	if err != nil {
		return "", err
	}
	defer body.Close()
	dump, err := io.ReadAll(io.LimitReader(body, 16<<20))
	if err != nil {
		return "", fmt.Errorf("read the agent's goroutines: %w", err)
	}
	return string(dump), nil
}

// GoroutinesAbove names the stacks of which now has more goroutines than
// idle, most grown first: "+4 device.(*Peer).RoutineSequentialSender".
// A stack is named by its first two frames outside the runtime and the
// standard library's waits, which is where it blocks in our code or a
// library's.
func GoroutinesAbove(idle, now string) string {
	before, after := stackCounts(idle), stackCounts(now)
	type grown struct {
		stack string
		by    int
	}
	var up []grown
	for stack, n := range after {
		if d := n - before[stack]; d > 0 {
			up = append(up, grown{stack, d})
		}
	}
	slices.SortFunc(up, func(a, b grown) int { return cmp.Or(b.by-a.by, strings.Compare(a.stack, b.stack)) })
	var parts []string
	for _, g := range up {
		parts = append(parts, fmt.Sprintf("+%d %s", g.by, g.stack))
	}
	if len(parts) == 0 {
		return "no stack grew"
	}
	return strings.Join(parts, "; ")
}

// stackCounts parses a goroutine dump: "N @ addresses" starts a group,
// "#\taddress\tfunction+offset\tfile:line" lines are its frames.
func stackCounts(dump string) map[string]int {
	counts := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(dump))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	n := 0
	var frames []string
	flush := func() {
		if n > 0 {
			key := strings.Join(frames, " <- ")
			if key == "" {
				key = "(no frames outside the runtime)"
			}
			counts[key] += n
		}
		n, frames = 0, nil
	}
	for sc.Scan() {
		line := sc.Text()
		if head, _, ok := strings.Cut(line, " @ "); ok && !strings.HasPrefix(line, "#") {
			flush()
			n, _ = strconv.Atoi(head)
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) < 3 || f[0] != "#" || len(frames) == 2 {
			continue
		}
		fn, _, _ := strings.Cut(f[2], "+0x")
		if waitFrame(fn) {
			continue
		}
		// Short names: the last path element with its function.
		frames = append(frames, fn[strings.LastIndex(fn, "/")+1:])
	}
	flush()
	return counts
}

// waitFrame reports whether fn is a frame of how a goroutine waits (the
// scheduler, channels, locks, the poller) rather than of what it does.
func waitFrame(fn string) bool {
	for _, p := range []string{"runtime.", "internal/", "sync.", "syscall.", "net.(*netFD)", "net.(*conn)", "os.(*File)"} {
		if strings.HasPrefix(fn, p) {
			return true
		}
	}
	return false
}

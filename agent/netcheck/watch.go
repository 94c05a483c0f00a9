package netcheck

import (
	"context"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink"
)

// WatchOptions tune Watch.
type WatchOptions struct {
	// Interval is how often the quick probe (local state plus the gateway
	// round trip) runs; default 1 s. A host-side teardown makes no netlink
	// event inside the workspace, so this probe is what notices it.
	Interval time.Duration
	// ProbeTimeout bounds each quick probe; default 500 ms. Interval plus
	// ProbeTimeout is the worst-case detection time.
	ProbeTimeout time.Duration
	// FullInterval is how often a full report runs anyway; default 60 s.
	FullInterval time.Duration
}

func (w WatchOptions) withDefaults() WatchOptions {
	if w.Interval <= 0 {
		w.Interval = time.Second
	}
	if w.ProbeTimeout <= 0 {
		w.ProbeTimeout = 500 * time.Millisecond
	}
	if w.FullInterval <= 0 {
		w.FullInterval = time.Minute
	}
	return w
}

// Watch keeps checking until ctx ends. fn gets a full report at the start,
// a report as soon as the status changes (a quick one first, for speed,
// then a full one with every finding), and a full report every
// FullInterval. Netlink link, address and route events trigger an
// immediate check. fn runs on Watch's goroutine.
func Watch(ctx context.Context, opts Options, wopts WatchOptions, fn func(*Report)) error {
	o := opts.withDefaults()
	w := wopts.withDefaults()
	quickOpts := o
	quickOpts.Timeout = w.ProbeTimeout * 9 / 5 // the gateway gets 5/9 of it
	return WatchWith(ctx, o.Logger, w,
		func() *Report { return runWorkspace(ctx, &o, "full") },
		func() *Report { return runWorkspace(ctx, &quickOpts, "quick") },
		fn)
}

// WatchWith is Watch's loop for any pair of runs: full gives the complete
// report, quick the fast probe whose status change triggers a full run
// (the node checks pass the same function twice).
func WatchWith(ctx context.Context, logger *slog.Logger, wopts WatchOptions, full, quick func() *Report, fn func(*Report)) error {
	w := wopts.withDefaults()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	events := make(chan struct{}, 1)
	done := make(chan struct{})
	defer close(done)
	subscribe(logger, events, done)

	last := full()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	fn(last)
	// The quick probe's status, tracked separately: a quick report leaves
	// out checks, so it is compared only with what a quick probe would say.
	// The baseline is read off the full report's quick checks, not taken
	// from a probe of its own: a first probe that failed by chance (a slow
	// answer under load) would otherwise become the baseline, and a real
	// fault that gives the same status would never count as a change.
	quickIDs := checkIDs(quick())
	lastQuick := quickStatus(last, quickIDs)
	tick := time.NewTicker(w.Interval)
	defer tick.Stop()
	fullTick := time.NewTicker(w.FullInterval)
	defer fullTick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-fullTick.C:
			last = full()
			lastQuick = quickStatus(last, quickIDs)
			fn(last)
			continue
		case <-events:
			// Let a burst of events settle.
			select {
			case <-time.After(50 * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
			drain(events)
		case <-tick.C:
		}
		q := quick()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if q.Status != lastQuick {
			lastQuick = q.Status
			fn(q)
			last = full()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fn(last)
		}
	}
}

func checkIDs(r *Report) map[string]bool {
	ids := map[string]bool{}
	for _, c := range r.Checks {
		ids[c.ID] = true
	}
	return ids
}

// quickStatus is the status a quick probe would give, read off a full
// report: the worst of the checks named in ids and their findings.
func quickStatus(r *Report, ids map[string]bool) Status {
	s := StatusOK
	for _, c := range r.Checks {
		if ids[c.ID] && (c.Status == StatusBroken || c.Status == StatusDegraded) {
			s = Worse(s, c.Status)
		}
	}
	for _, f := range r.Findings {
		if ids[f.Check] {
			s = Worse(s, f.Severity)
		}
	}
	return s
}

func drain(ch chan struct{}) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}

// subscribe turns rtnetlink link, address and route notifications into
// events. Joining these multicast groups needs no privileges; where
// netlink is unavailable (some sandboxes) the periodic probe still runs.
func subscribe(logger *slog.Logger, events chan struct{}, done chan struct{}) {
	notify := func() {
		select {
		case events <- struct{}{}:
		default:
		}
	}
	onErr := func(err error) { logger.Debug("netlink subscription", "err", err) }
	links := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		onErr(err)
	} else {
		go forward(links, done, notify)
	}
	addrs := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		onErr(err)
	} else {
		go forward(addrs, done, notify)
	}
	routes := make(chan netlink.RouteUpdate, 64)
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr}); err != nil {
		onErr(err)
	} else {
		go forward(routes, done, notify)
	}
}

func forward[T any](ch chan T, done chan struct{}, notify func()) {
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
			notify()
		case <-done:
			return
		}
	}
}

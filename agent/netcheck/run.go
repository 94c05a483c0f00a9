package netcheck

import (
	"context"
	"errors"
	"fmt"
	"github.com/agentd/agent/agent/netcheck/internal/netstate"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentd/agent/tailnet"
)

// Options configure a workspace run. The zero value checks the workspace
// network without a coordinator.
type Options struct {
	Logger *slog.Logger `json:"-"`

	// CoordinatorURL is the coordinator's base URL (https://host[:port]).
	CoordinatorURL string
	// Fingerprint pins the coordinator's certificate: hex SHA-256 of its DER
	// form (colons allowed). Empty: verify the chain with the system roots.
	Fingerprint string
	// STUNPort is the coordinator's STUN port (default 3478).
	STUNPort int
	// DERPMap overrides the relay map derived from CoordinatorURL.
	DERPMap *tailnet.DERPMap
	// Interface overrides the interface to check (default: the one the
	// default route uses).
	Interface string
	// ResolvConf is the resolver configuration to read (default
	// /etc/resolv.conf).
	ResolvConf string
	// Getenv reads proxy variables (default os.Getenv).
	Getenv func(string) string `json:"-"`
	// Timeout bounds the active probes of one run (default 1.8 s), so a
	// full report on a healthy network takes well under 2 s and a broken
	// one returns in about that time.
	Timeout time.Duration

	// Now returns the time (tests move the clock).
	Now func() time.Time `json:"-"`
}

func (o *Options) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.STUNPort == 0 {
		o.STUNPort = 3478
	}
	if o.ResolvConf == "" {
		o.ResolvConf = "/etc/resolv.conf"
	}
	if o.Getenv == nil {
		o.Getenv = os.Getenv
	}
	if o.Timeout <= 0 {
		o.Timeout = 1800 * time.Millisecond
	}
	return o
}

// coordinatorURL parses and checks CoordinatorURL; nil when unset.
func (o *Options) coordinatorURL() (*url.URL, error) {
	if o.CoordinatorURL == "" {
		return nil, nil
	}
	s := o.CoordinatorURL
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("coordinator URL %q: %w", o.CoordinatorURL, err)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return nil, fmt.Errorf("coordinator URL %q: scheme must be https", o.CoordinatorURL)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("coordinator URL %q has no host", o.CoordinatorURL)
	}
	return u, nil
}

// Validate reports a configuration error in one line.
func (o *Options) Validate() error {
	if _, err := o.coordinatorURL(); err != nil {
		return err
	}
	fp := strings.ReplaceAll(o.Fingerprint, ":", "")
	if fp != "" && len(fp) != 64 {
		return fmt.Errorf("fingerprint %q: want the 64 hex digits of a SHA-256", o.Fingerprint)
	}
	for _, c := range fp {
		if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
			return fmt.Errorf("fingerprint %q: want hex digits", o.Fingerprint)
		}
	}
	if o.STUNPort < 0 || o.STUNPort > 65535 {
		return fmt.Errorf("STUN port %d: want 1-65535", o.STUNPort)
	}
	return nil
}

// Run performs one full check of the workspace's network and returns the
// report. It never returns nil; problems running a check become findings.
// The node's side is package node.
func Run(ctx context.Context, opts Options) *Report {
	o := opts.withDefaults()
	return runWorkspace(ctx, &o, "full")
}

// runWorkspace runs the in-workspace checks. scope "quick" stops after the
// local state and the gateway round trip (the watch loop's heartbeat).
func runWorkspace(ctx context.Context, o *Options, scope string) *Report {
	started := time.Now()
	rep := &Report{Mode: "workspace", Scope: scope}
	u, err := o.coordinatorURL()
	if err != nil {
		c := NewCheck("options", "Options")
		c.Fail(StatusBroken, "options.invalid", err.Error(), nil, Remedy{Text: "pass --coordinator-url https://HOST[:PORT]"})
		rep.Add(c.Done())
		rep.Finish(started)
		return rep
	}

	st, err := netstate.Read()
	if err != nil {
		c := NewCheck("link", "Interface, carrier and MTU")
		c.Fail(StatusBroken, "netlink.unavailable", fmt.Sprintf("cannot read the network configuration: %v", err), nil,
			Remedy{Text: "rtnetlink is unavailable (a sandboxed runtime such as gVisor?); the active probes below still run"})
		rep.Add(c.Done())
	}
	prim := &primary{}
	if st != nil {
		var local []*CheckBuilder
		local, prim = localChecks(st, o)
		for _, c := range local {
			rep.Add(c)
		}
	}

	png, perr := openPinger()
	if perr != nil && !errors.Is(perr, errNoICMP) {
		o.Logger.Debug("ICMP unavailable", "err", perr)
	}
	if png != nil {
		defer png.Close()
	}
	var seq atomic.Uint32

	budget := o.Timeout
	gwBudget := budget * 5 / 9
	var wg sync.WaitGroup
	var mu sync.Mutex
	add := func(cs ...*CheckBuilder) {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range cs {
			rep.Add(c)
		}
	}

	gwDone := make(chan *probeResult, 1)
	gwFinished := make(chan struct{})
	var gwReachable bool
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, res := gatewayCheck(ctx, prim, png, &seq, gwBudget)
		add(c)
		gwReachable = res.reachable
		close(gwFinished)
		gwDone <- res
	}()
	// viaGW says whether traffic to a goes through the gateway: only such
	// traffic proves the gateway works (an on-link coordinator answers with
	// the gateway gone).
	viaGW := func(a netip.Addr) bool {
		if st == nil || prim.link == nil || !prim.gateway.IsValid() || !a.IsValid() {
			return false
		}
		return !st.OnLink(prim.link.Attrs().Index, net.IP(a.AsSlice()))
	}
	ev := evidence{viaGW: viaGW}
	if scope == "quick" {
		// A gateway that has not answered within 100 ms (it answers in
		// well under 1 ms when healthy) may only be ignoring ICMP: connect
		// to the coordinator meanwhile, so the quick probe reaches the same
		// verdict as a full report at little cost in detection time.
		var beyond chan []string
		if u != nil {
			beyond = make(chan []string, 1)
			go func() {
				select {
				case <-gwFinished:
					if gwReachable {
						beyond <- nil
						return
					}
				case <-time.After(100 * time.Millisecond):
				}
				beyond <- probeBeyond(ctx, u, gwBudget, viaGW)
			}()
		}
		wg.Wait()
		rep.SortChecks()
		if rep.Finding("gateway.unreachable") != nil && beyond != nil {
			ev.beyond = <-beyond
		}
		diagnose(rep, ev)
		rep.Finish(started)
		return rep
	}

	// The coordinator's address, once DNS (or the literal URL) gives it, is a
	// second MTU probe target.
	coordAddr := make(chan netip.Addr, 1)
	host := ""
	if u != nil {
		host = u.Hostname()
		if a, err := netip.ParseAddr(host); err == nil {
			coordAddr <- a
			ev.coord = a
		}
	}
	if u == nil {
		close(coordAddr)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, resolved := dnsCheck(ctx, o, host, budget*2/3)
		add(c)
		mu.Lock()
		if !ev.coord.IsValid() && len(resolved) > 0 {
			ev.coord = resolved[0]
		}
		mu.Unlock()
		if u != nil && len(resolved) > 0 {
			select {
			case coordAddr <- resolved[0]:
			default:
			}
		}
		if u != nil {
			select {
			case coordAddr <- netip.Addr{}:
			default:
			}
		}
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		res := <-gwDone
		c := mtuCheck(ctx, prim, res, func() netip.Addr {
			a, ok := <-coordAddr
			if !ok {
				return netip.Addr{}
			}
			return a
		}, &seq, budget-gwBudget)
		add(c)
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		pc, proxyURL := proxyCheck(ctx, o, u, budget/2)
		add(pc)
		var hwg sync.WaitGroup
		hwg.Add(2)
		go func() {
			defer hwg.Done()
			add(httpsCheck(ctx, o, u, proxyURL, budget))
		}()
		go func() {
			defer hwg.Done()
			add(relayChecks(ctx, o, u, proxyURL, budget))
		}()
		hwg.Wait()
	}()
	wg.Wait()
	rep.SortChecks()
	diagnose(rep, ev)
	rep.Finish(started)
	return rep
}

// probeBeyond is the quick probe's check past a silent gateway: a TCP
// connect to the coordinator. An accept or a refusal both crossed the
// gateway and came back, so the quick probe reaches the same verdict as a
// full report where HTTPS works.
func probeBeyond(ctx context.Context, u *url.URL, budget time.Duration, viaGW func(netip.Addr) bool) []string {
	if budget <= 0 {
		return nil
	}
	port := u.Port()
	if port == "" {
		port = "443"
	}
	addr := net.JoinHostPort(u.Hostname(), port)
	d := net.Dialer{Timeout: budget}
	conn, err := d.DialContext(ctx, "tcp", addr)
	remote := func(a net.Addr) bool {
		ap, perr := netip.ParseAddrPort(fmt.Sprint(a))
		return perr == nil && viaGW(ap.Addr().Unmap())
	}
	var opErr *net.OpError
	switch {
	case err == nil:
		defer conn.Close()
		if remote(conn.RemoteAddr()) {
			return []string{fmt.Sprintf("TCP connect to the coordinator %s through the gateway succeeds", addr)}
		}
	case isRefused(err) && errors.As(err, &opErr) && opErr.Addr != nil && remote(opErr.Addr):
		return []string{fmt.Sprintf("TCP connect to the coordinator %s is refused: the refusal came back through the gateway", addr)}
	}
	return nil
}

// Add appends a finished check and its findings.
func (r *Report) Add(c *CheckBuilder) {
	r.Checks = append(r.Checks, c.Check)
	r.Findings = append(r.Findings, c.Findings...)
}

// checkOrder is the order checks appear in, from the wire outwards.
var checkOrder = []string{"options", "link", "address", "route", "gateway", "mtu", "dns", "proxy", "https", "clock", "derp", "udp",
	"bridges", "veths", "forwarding", "firewall", "networkd", "networkd-state", "udev-link", "foreign-routes"}

// SortChecks orders checks from the wire outwards.
func (r *Report) SortChecks() {
	pos := func(id string) int {
		for i, x := range checkOrder {
			if x == id {
				return i
			}
		}
		return len(checkOrder)
	}
	sorted := make([]Check, 0, len(r.Checks))
	for i := 0; i <= len(checkOrder); i++ {
		for _, c := range r.Checks {
			if pos(c.ID) == i {
				sorted = append(sorted, c)
			}
		}
	}
	r.Checks = sorted
}

// evidence is what a run learned about traffic past the gateway.
type evidence struct {
	// viaGW reports whether traffic to an address goes through the gateway.
	viaGW func(netip.Addr) bool
	// coord is the coordinator's address, if known.
	coord netip.Addr
	// beyond is evidence gathered by the run itself (the quick probe's
	// connect to the coordinator).
	beyond []string
}

// beyondGateway lists evidence that traffic through the gateway works: a
// check past it that passed, or failed only after an answer came back,
// counted only when its destination is routed through the gateway.
func beyondGateway(r *Report, e evidence) []string {
	out := append([]string{}, e.beyond...)
	if e.viaGW == nil {
		return out
	}
	coordVia := e.viaGW(e.coord)
	dnsVia := false
	if c := r.Check("dns"); c != nil {
		ns, _ := c.Details["nameservers"].([]string)
		dnsVia = len(ns) > 0
		for _, s := range ns {
			if a, err := netip.ParseAddr(s); err != nil || !e.viaGW(a) {
				dnsVia = false
			}
		}
	}
	for _, id := range []string{"dns", "https", "derp", "udp"} {
		if (id == "dns" && !dnsVia) || (id != "dns" && !coordVia) {
			continue
		}
		if c := r.Check(id); c != nil && c.Status == StatusOK {
			out = append(out, fmt.Sprintf("%s works through the gateway: %s", id, c.Summary))
		}
	}
	// These answers crossed the gateway both ways.
	for _, code := range []string{"https.refused", "https.server_error", "https.fingerprint_mismatch", "https.certificate_untrusted", "https.certificate_invalid", "https.certificate_name", "dns.nxdomain", "dns.servfail", "dns.refused", "dns.no_records"} {
		if (strings.HasPrefix(code, "dns.") && !dnsVia) || (strings.HasPrefix(code, "https.") && !coordVia) {
			continue
		}
		if f := r.Finding(code); f != nil {
			out = append(out, fmt.Sprintf("an answer came back through the gateway: %s", f.Problem))
		}
	}
	return out
}

// diagnose names the root cause when several findings share one: a silent
// gateway explains DNS, HTTPS and relay failures behind it; and it keeps
// the verdict consistent with all the evidence: a gateway that ignores
// ICMP echo while traffic through it works is odd, not broken.
func diagnose(r *Report, e evidence) {
	if gwf := r.Finding("gateway.unreachable"); gwf != nil {
		if ev := beyondGateway(r, e); len(ev) > 0 {
			gwf.Code = "gateway.icmp_filtered"
			gwf.Severity = StatusDegraded
			gw := r.Check("gateway")
			addr, _ := gw.Details["gateway"].(string)
			gwf.Problem = fmt.Sprintf("the gateway %s does not answer ICMP echo, but traffic through it works: ICMP to the gateway is filtered, the network is not broken", addr)
			gwf.Evidence = append(gwf.Evidence, ev...)
			gwf.Remedy = Remedy{Text: "nothing to repair for connectivity; to let this check prove the path by ICMP again, allow echo requests to the bridge address on the node (e.g. `nft insert rule inet filter input icmp type echo-request accept`), or find which firewall rule drops them"}
			gw.Status = StatusDegraded
			gw.Summary = fmt.Sprintf("%s ignores ICMP echo; traffic through it works", addr)
		}
	}
	if f := r.Finding("https.dns_slow"); f != nil && r.Finding("dns.partial") != nil {
		// Lookups do finish once the dead nameserver times out: slow, not
		// broken. The DNS finding is the cause and the headline.
		f.Severity = StatusDegraded
		if c := r.Check("https"); c != nil {
			c.Status = StatusDegraded
		}
		r.Summary = r.Finding("dns.partial").Problem
	}
	gw := r.Finding("gateway.unreachable")
	if gw == nil {
		if inconclusive := r.Finding("gateway.no_answer"); inconclusive != nil {
			// Without ICMP the gateway probe alone is not decisive; the
			// path is broken if nothing beyond it answers either.
			if r.Finding("https.timeout") != nil || r.Finding("dns.unreachable") != nil {
				inconclusive.Severity = StatusBroken
				inconclusive.Code = "gateway.unreachable"
				inconclusive.Problem = "workspace network broken past the interface: neither the gateway nor anything beyond it answers"
				if c := r.Check("gateway"); c != nil {
					c.Status = StatusBroken
				}
				gw = inconclusive
			}
		}
	}
	if gw != nil {
		r.Summary = gw.Problem
		for i := range r.Findings {
			f := &r.Findings[i]
			switch f.Check {
			case "dns", "https", "derp", "udp", "mtu", "proxy":
				f.Evidence = append(f.Evidence, "likely a consequence of: "+gw.Problem)
			}
		}
		return
	}
	if f := r.Finding("route.no_default"); f != nil {
		r.Summary = f.Problem
	}
}

package netcheck

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// resolvConf is the part of /etc/resolv.conf a diagnosis needs.
type resolvConf struct {
	nameservers []netip.Addr
	search      []string
	options     []string
}

func readResolvConf(path string) (*resolvConf, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rc := &resolvConf{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || strings.HasPrefix(fields[0], "#") || strings.HasPrefix(fields[0], ";") {
			continue
		}
		switch fields[0] {
		case "nameserver":
			if a, err := netip.ParseAddr(fields[1]); err == nil {
				rc.nameservers = append(rc.nameservers, a.WithZone(""))
			}
		case "search", "domain":
			rc.search = fields[1:]
		case "options":
			rc.options = append(rc.options, fields[1:]...)
		}
	}
	return rc, sc.Err()
}

// dnsAnswer is one nameserver's answer.
type dnsAnswer struct {
	server  netip.Addr
	rcode   dnsmessage.RCode
	addrs   []netip.Addr
	rtt     time.Duration
	err     error
	timeout bool
}

// queryDNS asks one server for name's A records over UDP.
func queryDNS(ctx context.Context, server netip.Addr, name string, qtype dnsmessage.Type) dnsAnswer {
	ans := dnsAnswer{server: server}
	fqdn := name
	if !strings.HasSuffix(fqdn, ".") {
		fqdn += "."
	}
	qn, err := dnsmessage.NewName(fqdn)
	if err != nil {
		ans.err = fmt.Errorf("%q is not a valid DNS name: %w", name, err)
		return ans
	}
	var idb [2]byte
	_, _ = rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	msg := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: qn, Type: qtype, Class: dnsmessage.ClassINET}},
	}
	wire, err := msg.Pack()
	if err != nil {
		ans.err = err
		return ans
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", netip.AddrPortFrom(server, 53).String())
	if err != nil {
		ans.err = err
		return ans
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	start := time.Now()
	// Resend once halfway through, as resolvers do, in case one packet is lost.
	stopResend := make(chan struct{})
	defer close(stopResend)
	go func() {
		dl, ok := ctx.Deadline()
		if !ok {
			return
		}
		select {
		case <-time.After(time.Until(dl) / 2):
			_, _ = conn.Write(wire)
		case <-stopResend:
		}
	}()
	if _, err := conn.Write(wire); err != nil {
		ans.err = err
		return ans
	}
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				ans.timeout = true
				ans.err = fmt.Errorf("no answer within %v", time.Since(start).Round(time.Millisecond))
			} else {
				ans.err = err
			}
			return ans
		}
		var resp dnsmessage.Message
		if err := resp.Unpack(buf[:n]); err != nil || resp.ID != id || !resp.Response {
			continue
		}
		ans.rtt = time.Since(start)
		ans.rcode = resp.RCode
		for _, rr := range resp.Answers {
			switch b := rr.Body.(type) {
			case *dnsmessage.AResource:
				ans.addrs = append(ans.addrs, netip.AddrFrom4(b.A))
			case *dnsmessage.AAAAResource:
				ans.addrs = append(ans.addrs, netip.AddrFrom16(b.AAAA))
			}
		}
		return ans
	}
}

// dnsCheck queries every nameserver in resolv.conf directly for the
// coordinator's name, so a timeout (transport) is told apart from SERVFAIL
// (upstream) and NXDOMAIN (the name or search configuration).
func dnsCheck(ctx context.Context, opts *Options, host string, budget time.Duration) (*CheckBuilder, []netip.Addr) {
	c := NewCheck("dns", "DNS configuration and resolution")
	rc, err := readResolvConf(opts.ResolvConf)
	if err != nil {
		c.Summary = fmt.Sprintf("cannot read %s", opts.ResolvConf)
		c.Fail(StatusBroken, "dns.no_config", fmt.Sprintf("cannot read %s: %v", opts.ResolvConf, err), nil,
			Remedy{Text: "the runtime did not provide a resolver configuration; check the pod's dnsPolicy/dnsConfig or the container's --dns settings"})
		return c.Done(), nil
	}
	c.Detail("nameservers", addrList(rc.nameservers))
	if len(rc.search) > 0 {
		c.Detail("search", rc.search)
	}
	if len(rc.options) > 0 {
		c.Detail("options", rc.options)
	}
	if len(rc.nameservers) == 0 {
		c.Summary = "no nameserver configured"
		c.Fail(StatusBroken, "dns.no_nameserver", fmt.Sprintf("%s lists no nameserver", opts.ResolvConf), nil,
			Remedy{Text: "configure a nameserver (pod dnsConfig, or the runtime's --dns)"})
		return c.Done(), nil
	}
	name, qtype := host, dnsmessage.TypeA
	literal := false
	if _, err := netip.ParseAddr(host); err == nil || host == "" {
		// Nothing to resolve: ask for the root's NS records, which any
		// working resolver answers, to prove the transport.
		name, qtype, literal = ".", dnsmessage.TypeNS, true
	}
	c.Detail("query", name)
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	answers := make([]dnsAnswer, len(rc.nameservers))
	var wg sync.WaitGroup
	for i, ns := range rc.nameservers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = queryDNS(ctx, ns, name, qtype)
			if !literal && answers[i].err == nil && answers[i].rcode == dnsmessage.RCodeSuccess && len(answers[i].addrs) == 0 {
				// No A record: the name may be IPv6 only.
				if a6 := queryDNS(ctx, ns, name, dnsmessage.TypeAAAA); a6.err == nil {
					answers[i].addrs = a6.addrs
				}
			}
		}()
	}
	wg.Wait()

	var ok []dnsAnswer
	var timeouts, servfail, nxdomain, other []string
	var resolved []netip.Addr
	for _, a := range answers {
		switch {
		case a.timeout || a.err != nil:
			timeouts = append(timeouts, fmt.Sprintf("%s: %v", a.server, a.err))
		case a.rcode == dnsmessage.RCodeSuccess:
			ok = append(ok, a)
			if len(resolved) == 0 {
				resolved = a.addrs
			}
		case a.rcode == dnsmessage.RCodeServerFailure:
			servfail = append(servfail, fmt.Sprintf("%s: SERVFAIL", a.server))
		case a.rcode == dnsmessage.RCodeNameError:
			nxdomain = append(nxdomain, fmt.Sprintf("%s: NXDOMAIN", a.server))
		default:
			other = append(other, fmt.Sprintf("%s: %v", a.server, a.rcode))
		}
	}
	switch {
	case len(ok) > 0 && literal:
		c.Summary = fmt.Sprintf("%d/%d nameservers answer (%.1f ms)", len(ok), len(answers), ms(ok[0].rtt))
		partialDNS(c, rc, answers, timeouts)
		slowDNS(c, ok)
	case literal && len(nxdomain)+len(servfail)+len(other) > 0:
		// Any answer proves the transport; the coordinator is addressed by
		// IP, so what the resolver says about the root zone does not stop
		// the agent. A resolver with no upstream (NXDOMAIN or SERVFAIL for
		// ".") is still worth a word: programs in the workspace need it.
		answered := append(append(append([]string{}, nxdomain...), servfail...), other...)
		c.Summary = fmt.Sprintf("nameservers answer, but not for the root zone (%s)", answered[0])
		c.Fail(StatusDegraded, "dns.no_upstream", "the nameservers answer but cannot resolve the root zone: they have no working upstream", answered,
			Remedy{Text: "the agent does not need DNS (the coordinator URL is an address), but programs in the workspace do: check the resolver's forwarders"})
	case literal:
		c.Summary = fmt.Sprintf("no nameserver answers (%v)", addrList(rc.nameservers))
		c.Fail(StatusDegraded, "dns.unreachable", fmt.Sprintf("no nameserver answers: %v", addrList(rc.nameservers)), timeouts,
			Remedy{Text: "the agent does not need DNS (the coordinator URL is an address), but programs in the workspace do: check that UDP port 53 to the nameservers is allowed"})
	case len(ok) > 0 && len(resolved) == 0:
		c.Summary = fmt.Sprintf("%s has no address records", host)
		c.Fail(StatusBroken, "dns.no_records", fmt.Sprintf("the coordinator's name %s exists but has no A or AAAA records", host),
			[]string{fmt.Sprintf("%s: NOERROR with no addresses", ok[0].server)},
			Remedy{Text: "add an address record for the coordinator's name, or use --coordinator-url with an address"})
	case len(ok) > 0:
		c.Summary = fmt.Sprintf("%s → %v via %s (%.1f ms)", host, addrList(resolved), ok[0].server, ms(ok[0].rtt))
		c.Detail("addresses", addrList(resolved))
		partialDNS(c, rc, answers, timeouts)
		slowDNS(c, ok)
	case len(nxdomain) > 0:
		c.Summary = fmt.Sprintf("%s does not exist (NXDOMAIN)", host)
		c.Fail(StatusBroken, "dns.nxdomain", fmt.Sprintf("the nameservers say %s does not exist", host), nxdomain,
			Remedy{Text: "check the coordinator URL's host name; for a cluster-internal name use its fully qualified form (ndots/search can change what is asked)"})
	case len(servfail) > 0:
		c.Summary = "nameservers fail upstream (SERVFAIL)"
		c.Fail(StatusBroken, "dns.servfail", fmt.Sprintf("the nameservers cannot resolve %s (SERVFAIL): their upstream is failing", name), append(servfail, timeouts...),
			Remedy{Text: "the resolver is reachable but its upstream is not; check the cluster DNS (CoreDNS) logs and its forwarders"})
	case len(other) > 0:
		c.Summary = "nameservers refuse the query"
		c.Fail(StatusBroken, "dns.refused", fmt.Sprintf("the nameservers refuse to resolve %s", name), append(other, timeouts...),
			Remedy{Text: "the configured nameserver does not serve this client; point resolv.conf at the cluster DNS"})
	default:
		c.Summary = fmt.Sprintf("no nameserver answers (%v)", addrList(rc.nameservers))
		c.Fail(StatusBroken, "dns.unreachable", fmt.Sprintf("no nameserver answers: %v", addrList(rc.nameservers)), timeouts,
			Remedy{Text: "the nameservers are unreachable over UDP port 53: check the gateway finding first; otherwise a NetworkPolicy or firewall blocks DNS, or the DNS service is down"})
	}
	return c.Done(), resolved
}

func addrList(a []netip.Addr) []string {
	out := make([]string, len(a))
	for i, x := range a {
		out[i] = x.String()
	}
	return out
}

// partialDNS names nameservers that do not answer while others do: lookups
// still succeed, but every one that tries a dead server first waits out
// its timeout, and that time shows up in whatever did the lookup.
func partialDNS(c *CheckBuilder, rc *resolvConf, answers []dnsAnswer, timeouts []string) {
	if len(timeouts) == 0 {
		return
	}
	var dead []string
	firstDead := false
	for i, a := range answers {
		if a.timeout || a.err != nil {
			dead = append(dead, a.server.String())
			if i == 0 {
				firstDead = true
			}
		}
	}
	wait := "5 s (the default timeout)"
	for _, o := range rc.options {
		if v, ok := strings.CutPrefix(o, "timeout:"); ok {
			wait = v + " s (options " + o + ")"
		}
	}
	problem := fmt.Sprintf("%d of %d nameservers do not answer (%s): lookups work, but slowly", len(dead), len(answers), strings.Join(dead, ", "))
	if firstDead {
		problem = fmt.Sprintf("the first nameserver %s does not answer (%d of %d answer): every lookup waits %s before trying the next", dead[0], len(answers)-len(dead), len(answers), wait)
	}
	c.Summary += fmt.Sprintf("; %d of %d nameservers dead", len(dead), len(answers))
	c.Detail("nameservers_dead", dead)
	c.Fail(StatusDegraded, "dns.partial", problem, timeouts,
		Remedy{Text: fmt.Sprintf("remove or repair %s in the resolver configuration (the pod's dnsConfig, the node's resolv.conf, or the cluster DNS service's endpoints)", strings.Join(dead, ", "))})
}

// slowDNSAfter is when an answer counts as slow: a resolver on the cluster
// network answers in milliseconds, and every connection waits for it.
const slowDNSAfter = 300 * time.Millisecond

// slowDNS names nameservers that answer, but all of them slowly: lookups
// work, and the time they take shows up in every connection.
func slowDNS(c *CheckBuilder, ok []dnsAnswer) {
	fastest := ok[0]
	for _, a := range ok[1:] {
		if a.rtt < fastest.rtt {
			fastest = a
		}
	}
	if fastest.rtt < slowDNSAfter {
		return
	}
	var ev []string
	for _, a := range ok {
		ev = append(ev, fmt.Sprintf("%s answered in %.0f ms", a.server, ms(a.rtt)))
	}
	c.Detail("slowest_answer_ms", ms(fastest.rtt))
	c.Fail(StatusDegraded, "dns.slow", fmt.Sprintf("the nameservers answer, but the fastest took %.0f ms: every new connection waits that long for its lookup", ms(fastest.rtt)), ev,
		Remedy{Text: "check the resolver's load and its upstream (CoreDNS logs and metrics, its forwarders); a node-local DNS cache helps"})
}

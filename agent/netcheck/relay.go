package netcheck

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/agentd/agent/tailnet"
)

// derpMapFor returns the relay map to check: the one given in the options,
// or the coordinator's embedded relay built from its URL and STUN port.
func derpMapFor(opts *Options, u *url.URL) (*tailnet.DERPMap, error) {
	if opts.DERPMap != nil {
		return opts.DERPMap, nil
	}
	if u == nil {
		return nil, nil
	}
	port := u.Port()
	if port == "" {
		port = "443"
	}
	return tailnet.CoordinatorDERPMap(net.JoinHostPort(u.Hostname(), port), opts.STUNPort, strings.ToLower(strings.ReplaceAll(opts.Fingerprint, ":", "")))
}

// relayChecks runs the DERP relay probe (HTTPS to each relay node) and the
// UDP/STUN check (Tailscale's netcheck against the same map) side by side.
func relayChecks(ctx context.Context, opts *Options, u *url.URL, proxyURL *url.URL, budget time.Duration) (*CheckBuilder, *CheckBuilder) {
	derpC := NewCheck("derp", "DERP relay reachability and latency")
	udpC := NewCheck("udp", "UDP (STUN) reachability and NAT behaviour")
	m, err := derpMapFor(opts, u)
	if err != nil {
		derpC.Fail(StatusBroken, "derp.bad_map", fmt.Sprintf("cannot build the relay map: %v", err), nil,
			Remedy{Text: "check --coordinator-url and --stun-port"})
		udpC.Skip("no relay map")
		return derpC.Done(), udpC.Done()
	}
	if m == nil {
		derpC.Skip("no --coordinator-url given")
		udpC.Skip("no --coordinator-url given")
		return derpC.Done(), udpC.Done()
	}
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()

	type stunResult struct {
		r   *tailnet.NetcheckReport
		err error
	}
	stunDone := make(chan stunResult, 1)
	go func() {
		r, err := tailnet.Netcheck(ctx, opts.Logger, m)
		stunDone <- stunResult{r, err}
	}()

	// DERP: one HTTPS probe per node, all at once.
	type nodeResult struct {
		region string
		node   string
		rtt    time.Duration
		err    error
	}
	var nodes []tailnet.DERPNode
	var regionOf []string
	for _, r := range m.Regions {
		for _, n := range r.Nodes {
			nodes = append(nodes, n)
			regionOf = append(regionOf, fmt.Sprintf("%d/%s", r.ID, r.Code))
		}
	}
	results := make(chan nodeResult, len(nodes))
	for i, n := range nodes {
		go func() {
			rtt, err := probeDERPNode(ctx, n, proxyURL)
			results <- nodeResult{regionOf[i], n.Name, rtt, err}
		}()
	}
	var okNodes []nodeResult
	var failed []string
	for range nodes {
		r := <-results
		if r.err != nil {
			failed = append(failed, fmt.Sprintf("relay %s (region %s): %v", r.node, r.region, r.err))
		} else {
			okNodes = append(okNodes, r)
		}
	}
	sort.Slice(okNodes, func(i, j int) bool { return okNodes[i].rtt < okNodes[j].rtt })
	sort.Strings(failed)
	latency := map[string]float64{}
	for _, r := range okNodes {
		latency[r.node] = ms(r.rtt)
	}
	derpC.Detail("latency_ms", latency)
	switch {
	case len(okNodes) == 0:
		derpC.Summary = "no relay answers"
		derpC.Fail(StatusBroken, "derp.unreachable", "no DERP relay answers over HTTPS: peers cannot be reached when UDP fails", failed,
			Remedy{Text: "the relay runs inside the coordinator; see the https finding (coordinator down, firewall, or proxy)"})
	case len(failed) > 0:
		derpC.Summary = fmt.Sprintf("best relay %s %.1f ms; %d of %d relays fail", okNodes[0].node, ms(okNodes[0].rtt), len(failed), len(nodes))
		derpC.Fail(StatusDegraded, "derp.partial", fmt.Sprintf("%d of %d DERP relays do not answer", len(failed), len(nodes)), failed,
			Remedy{Text: "check the failing relays' servers; the workspace uses the ones that answer"})
	default:
		derpC.Summary = fmt.Sprintf("relay %s answers in %.1f ms", okNodes[0].node, ms(okNodes[0].rtt))
	}

	sr := <-stunDone
	switch {
	case sr.err != nil && sr.r == nil && ctx.Err() == nil:
		udpC.Summary = "UDP check could not run"
		udpC.Fail(StatusDegraded, "udp.check_failed", fmt.Sprintf("the UDP/STUN check could not run: %v", sr.err), nil,
			Remedy{Text: "see the error; the workspace falls back to the relay"})
	case sr.r == nil || !sr.r.UDP:
		stunPort := opts.STUNPort
		udpC.Summary = "no STUN answer: UDP blocked"
		sev := StatusDegraded
		text := "UDP is blocked on the way to the coordinator: connections work but go through the DERP relay (slower)"
		if len(okNodes) == 0 {
			text = "UDP is blocked and the relay is unreachable too"
		}
		ev := []string{fmt.Sprintf("STUN binding requests to %s UDP port %d: no answer within %v", hostOf(u, m), stunPort, budget)}
		if sr.err != nil {
			ev = append(ev, sr.err.Error())
		}
		if len(okNodes) > 0 {
			ev = append(ev, fmt.Sprintf("DERP over HTTPS works (%s %.1f ms)", okNodes[0].node, ms(okNodes[0].rtt)))
		}
		udpC.Fail(sev, "udp.blocked", text, ev,
			Remedy{Text: fmt.Sprintf("allow outbound UDP to the coordinator's STUN port %d and to peers (WireGuard); in Kubernetes check NetworkPolicy egress and the node firewall", stunPort)})
	default:
		r := sr.r
		udpC.Detail("global_v4", r.GlobalV4)
		if r.GlobalV6 != "" {
			udpC.Detail("global_v6", r.GlobalV6)
		}
		lat := map[string]float64{}
		for id, d := range r.RegionLatency {
			lat[strconv.Itoa(id)] = ms(d)
		}
		udpC.Detail("region_latency_ms", lat)
		udpC.Detail("preferred_region", r.PreferredDERP)
		nat := "unknown (needs two STUN servers)"
		if r.MappingVariesByDestIP != nil {
			udpC.Detail("mapping_varies_by_dest_ip", *r.MappingVariesByDestIP)
			if *r.MappingVariesByDestIP {
				nat = "hard NAT (mapping varies by destination)"
			} else {
				nat = "easy NAT (endpoint-independent mapping)"
			}
		}
		udpC.Detail("nat", nat)
		udpC.Summary = fmt.Sprintf("UDP works; public address %s; %s", r.GlobalV4, nat)
		if r.MappingVariesByDestIP != nil && *r.MappingVariesByDestIP {
			udpC.Fail(StatusDegraded, "udp.hard_nat", "the NAT in front of the workspace maps each destination to a different port: direct connections will mostly fall back to the relay",
				[]string{"STUN servers saw different public ports for the same socket"},
				Remedy{Text: "use a NAT with endpoint-independent mapping (Linux masquerade without --random-fully, most cloud NAT gateways with port preservation), or give the node a public address"})
		}
	}
	return derpC.Done(), udpC.Done()
}

func hostOf(u *url.URL, m *tailnet.DERPMap) string {
	if u != nil {
		return u.Hostname()
	}
	if len(m.Regions) > 0 && len(m.Regions[0].Nodes) > 0 {
		return m.Regions[0].Nodes[0].HostName
	}
	return "the relay"
}

// probeDERPNode fetches /derp/probe from a relay node and returns the
// round-trip time of that request.
func probeDERPNode(ctx context.Context, n tailnet.DERPNode, proxyURL *url.URL) (time.Duration, error) {
	host := n.HostName
	if n.IPv4 != "" && n.IPv4 != "none" {
		host = n.IPv4
	} else if n.IPv6 != "" && n.IPv6 != "none" {
		host = n.IPv6
	}
	port := n.DERPPort
	if port == 0 {
		port = 443
	}
	tlsConf := &tls.Config{ServerName: n.HostName}
	if n.InsecureForTests {
		tlsConf.InsecureSkipVerify = true
	}
	if n.CertFingerprint != "" {
		want := strings.ToLower(n.CertFingerprint)
		tlsConf.InsecureSkipVerify = true
		tlsConf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("relay sent no certificate")
			}
			sum := sha256.Sum256(raw[0])
			if got := hex.EncodeToString(sum[:]); got != want {
				return &pinError{got: got, want: want}
			}
			return nil
		}
	}
	tr := &http.Transport{
		TLSClientConfig:   tlsConf,
		DisableKeepAlives: true,
		Proxy:             func(*http.Request) (*url.URL, error) { return proxyURL, nil },
	}
	defer tr.CloseIdleConnections()
	u := fmt.Sprintf("https://%s/derp/probe", net.JoinHostPort(host, strconv.Itoa(port)))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return time.Since(start), nil
}

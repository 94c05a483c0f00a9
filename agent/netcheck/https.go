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
	"net/http/httptrace"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpproxy"
)

// proxyCheck reports the proxy variables and which proxy, if any, the
// coordinator URL goes through; it probes that proxy with a TCP connect.
func proxyCheck(ctx context.Context, opts *Options, u *url.URL, budget time.Duration) (*CheckBuilder, *url.URL) {
	c := NewCheck("proxy", "Proxy environment")
	cfg := &httpproxy.Config{
		HTTPProxy:  firstEnv(opts.Getenv, "HTTP_PROXY", "http_proxy"),
		HTTPSProxy: firstEnv(opts.Getenv, "HTTPS_PROXY", "https_proxy"),
		NoProxy:    firstEnv(opts.Getenv, "NO_PROXY", "no_proxy"),
	}
	set := map[string]string{}
	for _, k := range []string{"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"} {
		if v := opts.Getenv(k); v != "" {
			set[k] = redactURL(v)
		}
	}
	if len(set) > 0 {
		c.Detail("environment", set)
	}
	if u == nil {
		if len(set) == 0 {
			c.Summary = "no proxy variables"
		} else {
			c.Summary = fmt.Sprintf("%d proxy variables set (no coordinator URL to apply them to)", len(set))
		}
		return c.Done(), nil
	}
	proxyURL, err := cfg.ProxyFunc()(u)
	if err != nil {
		c.Summary = "proxy variable is malformed"
		c.Fail(StatusBroken, "proxy.invalid", fmt.Sprintf("the proxy setting for %s is malformed: %v", u.Host, err), nil,
			Remedy{Text: "fix HTTPS_PROXY/HTTP_PROXY to a URL like http://proxy.example:3128, or unset it"})
		return c.Done(), nil
	}
	if proxyURL == nil {
		if len(set) == 0 {
			c.Summary = "no proxy variables; direct connection"
		} else {
			c.Summary = fmt.Sprintf("%s is reached directly (NO_PROXY or no matching variable)", u.Host)
		}
		return c.Done(), nil
	}
	c.Detail("proxy", redactURL(proxyURL.String()))
	hostPort := proxyURL.Host
	if proxyURL.Port() == "" {
		port := "80"
		if proxyURL.Scheme == "https" {
			port = "443"
		}
		hostPort = net.JoinHostPort(proxyURL.Hostname(), port)
	}
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	start := time.Now()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", hostPort)
	if err != nil {
		c.Summary = fmt.Sprintf("proxy %s does not accept connections", hostPort)
		c.Fail(StatusBroken, "proxy.unreachable", fmt.Sprintf("the coordinator is reached through proxy %s, which does not accept connections", hostPort),
			[]string{fmt.Sprintf("TCP connect to %s: %v", hostPort, err)},
			Remedy{Text: fmt.Sprintf("fix or start the proxy, or add %s to NO_PROXY if it is reachable directly", u.Hostname()),
				Commands: []string{fmt.Sprintf("export NO_PROXY=$NO_PROXY,%s", u.Hostname())}})
		return c.Done(), proxyURL
	}
	conn.Close()
	c.Summary = fmt.Sprintf("%s via proxy %s (connect %.1f ms)", u.Host, hostPort, ms(time.Since(start)))
	return c.Done(), proxyURL
}

func firstEnv(getenv func(string) string, names ...string) string {
	for _, n := range names {
		if v := getenv(n); v != "" {
			return v
		}
	}
	return ""
}

// redactURL hides a password in a proxy URL.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return s
	}
	return u.Redacted()
}

// httpsCheck fetches the coordinator URL and times each phase; it verifies
// the certificate (or the pinned fingerprint) and measures clock skew from
// the Date header. The "clock" check comes back alongside.
func httpsCheck(ctx context.Context, opts *Options, u *url.URL, proxyURL *url.URL, budget time.Duration) (*CheckBuilder, *CheckBuilder) {
	c := NewCheck("https", "HTTPS to the coordinator")
	clk := NewCheck("clock", "Clock skew against the coordinator")
	if u == nil {
		c.Skip("no --coordinator-url given")
		clk.Skip("no coordinator to compare with")
		return c.Done(), clk.Done()
	}
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()

	pin := strings.ToLower(strings.ReplaceAll(opts.Fingerprint, ":", ""))
	var peerCert *x509.Certificate
	tlsConf := &tls.Config{ServerName: u.Hostname()}
	if pin != "" {
		// With a pin the chain is not verified; exactly that certificate is
		// accepted (self-signed coordinators).
		tlsConf.InsecureSkipVerify = true
		tlsConf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("server sent no certificate")
			}
			sum := sha256.Sum256(raw[0])
			if got := hex.EncodeToString(sum[:]); got != pin {
				return &pinError{got: got, want: pin}
			}
			return nil
		}
	}
	var tDNS, tConnect, tTLS, tStart time.Time
	var dDNS, dConnect, dTLS time.Duration
	// stage is where the request is, so a timeout is blamed on the stage
	// that spent the time (a dead first nameserver is not a lost packet to
	// the coordinator). The dial may outlive Do, hence the lock.
	var stageMu sync.Mutex
	stage, stageStart := "request", time.Now()
	enter := func(s string) {
		stageMu.Lock()
		defer stageMu.Unlock()
		stage, stageStart = s, time.Now()
	}
	trace := &httptrace.ClientTrace{
		DNSStart:          func(httptrace.DNSStartInfo) { tDNS = time.Now(); enter("dns") },
		DNSDone:           func(httptrace.DNSDoneInfo) { dDNS = time.Since(tDNS); enter("request") },
		ConnectStart:      func(string, string) { tConnect = time.Now(); enter("connect") },
		ConnectDone:       func(string, string, error) { dConnect = time.Since(tConnect); enter("request") },
		TLSHandshakeStart: func() { tTLS = time.Now(); enter("tls") },
		TLSHandshakeDone: func(cs tls.ConnectionState, _ error) {
			dTLS = time.Since(tTLS)
			enter("response")
			if len(cs.PeerCertificates) > 0 {
				peerCert = cs.PeerCertificates[0]
			}
		},
	}
	transport := &http.Transport{
		TLSClientConfig:   tlsConf,
		DisableKeepAlives: true,
		Proxy:             func(*http.Request) (*url.URL, error) { return proxyURL, nil },
		ForceAttemptHTTP2: false,
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, u.String(), nil)
	if err != nil {
		c.Fail(StatusBroken, "https.bad_url", fmt.Sprintf("coordinator URL %q is unusable: %v", u, err), nil,
			Remedy{Text: "pass --coordinator-url https://HOST[:PORT]"})
		clk.Skip("no coordinator response")
		return c.Done(), clk.Done()
	}
	req.Header.Set("User-Agent", "agent-netcheck")
	tStart = time.Now()
	resp, err := client.Do(req)
	total := time.Since(tStart)
	c.Detail("url", u.String())
	if err != nil {
		stageMu.Lock()
		c.Detail("stalled_in", stage)
		c.Detail("stalled_ms", ms(time.Since(stageStart)))
		stageMu.Unlock()
		classifyHTTPSError(c, clk, u, err, peerCert, opts, budget)
		return c.Done(), clk.Done()
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	c.Detail("status", resp.StatusCode)
	c.Detail("dns_ms", ms(dDNS))
	c.Detail("connect_ms", ms(dConnect))
	c.Detail("tls_ms", ms(dTLS))
	c.Detail("total_ms", ms(total))
	if peerCert != nil {
		c.Detail("certificate_subject", peerCert.Subject.String())
		c.Detail("certificate_not_after", peerCert.NotAfter.UTC().Format(time.RFC3339))
		sum := sha256.Sum256(peerCert.Raw)
		c.Detail("certificate_sha256", hex.EncodeToString(sum[:]))
	}
	c.Summary = fmt.Sprintf("HTTP %d in %.0f ms (connect %.1f, TLS %.1f)", resp.StatusCode, ms(total), ms(dConnect), ms(dTLS))
	if resp.StatusCode >= 500 {
		c.Fail(StatusDegraded, "https.server_error", fmt.Sprintf("the coordinator answers with HTTP %d", resp.StatusCode),
			[]string{fmt.Sprintf("GET %s: %s", u, resp.Status)},
			Remedy{Text: "the network path works; the coordinator (or a proxy in front of it) is failing: check its logs"})
	}
	if peerCert != nil && pin == "" {
		if left := time.Until(peerCert.NotAfter); left < 7*24*time.Hour {
			c.Fail(StatusDegraded, "https.certificate_expiring", fmt.Sprintf("the coordinator's certificate expires in %v", left.Round(time.Hour)),
				[]string{fmt.Sprintf("NotAfter %s", peerCert.NotAfter.UTC().Format(time.RFC3339))},
				Remedy{Text: "renew the coordinator's certificate"})
		}
	}
	clockFromDate(clk, resp.Header.Get("Date"), tStart, total, opts.now())
	return c.Done(), clk.Done()
}

type pinError struct{ got, want string }

func (e *pinError) Error() string {
	return fmt.Sprintf("certificate fingerprint %s does not match the pinned %s", e.got, e.want)
}

// clockFromDate compares the local clock with the server's Date header,
// allowing for the request's own duration.
func clockFromDate(clk *CheckBuilder, date string, sent time.Time, rtt time.Duration, now time.Time) {
	if date == "" {
		clk.Skip("the coordinator sent no Date header")
		return
	}
	server, err := http.ParseTime(date)
	if err != nil {
		clk.Skip(fmt.Sprintf("unreadable Date header %q", date))
		return
	}
	// Date has one-second resolution; the midpoint of the request is the
	// best local estimate of when it was generated.
	local := now.Add(-rtt / 2)
	skew := local.Sub(server)
	clk.Detail("skew_seconds", skew.Round(time.Second).Seconds())
	clk.Summary = fmt.Sprintf("local clock %+.0f s from the coordinator's", skew.Round(time.Second).Seconds())
	abs := skew
	if abs < 0 {
		abs = -abs
	}
	switch {
	case abs > 5*time.Minute:
		clk.Fail(StatusBroken, "clock.skew", fmt.Sprintf("the clock is %v off the coordinator's: certificates and tokens will be rejected", skew.Round(time.Second)),
			[]string{fmt.Sprintf("coordinator Date: %s; local time: %s", server.UTC().Format(time.RFC1123), local.UTC().Format(time.RFC1123))},
			Remedy{Text: "synchronise the node's clock (containers share it): enable NTP on the node",
				Commands: []string{"timedatectl set-ntp true   # on the node"}})
	case abs > 30*time.Second:
		clk.Fail(StatusDegraded, "clock.skew", fmt.Sprintf("the clock is %v off the coordinator's", skew.Round(time.Second)),
			[]string{fmt.Sprintf("coordinator Date: %s; local time: %s", server.UTC().Format(time.RFC1123), local.UTC().Format(time.RFC1123))},
			Remedy{Text: "synchronise the node's clock with NTP", Commands: []string{"timedatectl set-ntp true   # on the node"}})
	}
}

func classifyHTTPSError(c, clk *CheckBuilder, u *url.URL, err error, peerCert *x509.Certificate, opts *Options, budget time.Duration) {
	ev := []string{fmt.Sprintf("GET %s: %v", u, err)}
	var pe *pinError
	var invalid x509.CertificateInvalidError
	var unknown x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var opErr *net.OpError
	switch {
	case errors.As(err, &pe):
		c.Summary = "certificate does not match the pinned fingerprint"
		c.Fail(StatusBroken, "https.fingerprint_mismatch", "the coordinator's certificate is not the pinned one", ev,
			Remedy{Text: "if the coordinator's certificate was renewed, update the pin: --fingerprint " + pe.got + "; otherwise something intercepts the connection"})
		clk.Skip("no coordinator response")
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		c.Summary = "certificate expired or not yet valid"
		clk.Skip("no trusted response to read a Date from")
		remedy := Remedy{Text: "renew the coordinator's certificate, or, if it is valid, fix this machine's clock (NTP)"}
		if peerCert != nil {
			now := opts.now()
			ev = append(ev, fmt.Sprintf("certificate valid %s to %s; local time %s",
				peerCert.NotBefore.UTC().Format(time.RFC3339), peerCert.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339)))
			if now.Before(peerCert.NotBefore) || now.After(peerCert.NotAfter.Add(24*time.Hour)) {
				remedy = Remedy{Text: "the local clock is outside the certificate's validity; if the certificate is current, the clock is wrong: enable NTP on the node",
					Commands: []string{"timedatectl set-ntp true   # on the node"}}
			}
		}
		c.Fail(StatusBroken, "https.certificate_invalid", "the coordinator's certificate is expired or not yet valid", ev, remedy)
	case errors.As(err, &unknown):
		c.Summary = "certificate signed by an unknown authority"
		c.Fail(StatusBroken, "https.certificate_untrusted", "the coordinator's certificate is not signed by a trusted authority", ev,
			Remedy{Text: "for a self-signed coordinator pass its fingerprint with --fingerprint (shown by `agent coordinator` at start); otherwise install the issuing CA in the workspace image or check for an intercepting proxy"})
		clk.Skip("no trusted response")
	case errors.As(err, &hostErr):
		c.Summary = "certificate is for another name"
		c.Fail(StatusBroken, "https.certificate_name", fmt.Sprintf("the coordinator's certificate does not cover %s", u.Hostname()), ev,
			Remedy{Text: "use the name the certificate was issued for in --coordinator-url, or reissue the certificate with this name"})
		clk.Skip("no trusted response")
	case errors.As(err, &opErr) && opErr.Op == "dial" && isRefused(err):
		c.Summary = fmt.Sprintf("connection refused by %s", u.Host)
		c.Fail(StatusBroken, "https.refused", fmt.Sprintf("the coordinator at %s refuses connections: the host is reachable but nothing listens", u.Host), ev,
			Remedy{Text: "start the coordinator (or fix the port in --coordinator-url); the network path itself works"})
		clk.Skip("no coordinator response")
	default:
		timeout := errors.Is(err, context.DeadlineExceeded) || isTimeout(err)
		clk.Skip("no coordinator response")
		if timeout && c.Details["stalled_in"] == "dns" {
			c.Summary = fmt.Sprintf("resolving %s used up the %v budget", u.Hostname(), budget)
			c.Fail(StatusBroken, "https.dns_slow", fmt.Sprintf("HTTPS to the coordinator did not start: resolving %s took the whole %v, so the time went to DNS, not to the coordinator", u.Hostname(), budget), ev,
				Remedy{Text: "see the dns check: a nameserver that does not answer delays every lookup by its timeout"})
			return
		}
		if timeout {
			c.Summary = fmt.Sprintf("no answer from %s within %v", u.Host, budget)
			c.Fail(StatusBroken, "https.timeout", fmt.Sprintf("the coordinator at %s does not answer within %v", u.Host, budget), ev,
				Remedy{Text: "packets to the coordinator are lost: check the gateway and MTU findings; otherwise a firewall or NetworkPolicy drops the traffic, or the coordinator host is down"})
			return
		}
		c.Summary = fmt.Sprintf("cannot reach %s", u.Host)
		c.Fail(StatusBroken, "https.failed", fmt.Sprintf("HTTPS to the coordinator at %s fails", u.Host), ev,
			Remedy{Text: "see the error; check the gateway, DNS and proxy findings"})
	}
}

func isRefused(err error) bool {
	return strings.Contains(err.Error(), "connection refused")
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

package coordclient

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestNormalizeFingerprint(t *testing.T) {
	want := strings.Repeat("ab", 32)
	for _, in := range []string{want, strings.ToUpper(want), "sha256:" + want, " " + want + "\n",
		strings.TrimSuffix(strings.Repeat("AB:", 32), ":")} {
		got, err := NormalizeFingerprint(in)
		if err != nil || got != want {
			t.Errorf("%q: %q %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "abc", strings.Repeat("ab", 31), strings.Repeat("zz", 32)} {
		if _, err := NormalizeFingerprint(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestCoordinateURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://c.example:8443":      "https://c.example:8443/api/v1/coordinate",
		"https://c.example:8443/":     "https://c.example:8443/api/v1/coordinate",
		"https://c.example/prefix/":   "https://c.example/prefix/api/v1/coordinate",
		"wss://c.example":             "https://c.example/api/v1/coordinate",
		"http://127.0.0.1:1234?x=y#f": "http://127.0.0.1:1234/api/v1/coordinate",
	} {
		got, err := coordinateURL(in, "", true)
		if err != nil || got != want {
			t.Errorf("%q: %q %v, want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "c.example:8443", "ftp://c.example", "https://"} {
		if _, err := coordinateURL(bad, "", true); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestPlainHTTPNeedsTheFlag sends nothing to a plain-HTTP coordinator
// unless the caller said --insecure-http, and never with a pin: a real
// listener records every request that reaches it.
func TestPlainHTTPNeedsTheFlag(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var auths []string
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		auths = append(auths, r.Header.Get("Authorization"))
		mu.Unlock()
		http.Error(w, `{"code":"token_invalid","message":"no"}`, http.StatusUnauthorized)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	base := "http://" + ln.Addr().String()
	received := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(auths)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hc, err := HTTPClient("")
	if err != nil {
		t.Fatal(err)
	}

	// Refused before anything is sent, with a line that names the flag.
	_, err = WhoAmI(ctx, hc, base, "", false, "usr_secret")
	if err == nil || !strings.Contains(err.Error(), "--insecure-http") {
		t.Fatalf("whoami over http without the flag: %v", err)
	}
	err = New(Config{URL: base, Token: "usr_secret"}, HandlerFuncs{}).Run(ctx)
	if err == nil || !strings.Contains(err.Error(), "--insecure-http") {
		t.Fatalf("coordination over http without the flag: %v", err)
	}
	// A pin cannot be honoured over http: an error even with the flag.
	fp := strings.Repeat("ab", 32)
	_, err = WhoAmI(ctx, hc, base, fp, true, "usr_secret")
	if err == nil || !strings.Contains(err.Error(), "pin") {
		t.Fatalf("whoami over http with a pin: %v", err)
	}
	err = New(Config{URL: base, Token: "usr_secret", Fingerprint: fp, InsecureHTTP: true}, HandlerFuncs{}).Run(ctx)
	if err == nil || !strings.Contains(err.Error(), "pin") {
		t.Fatalf("coordination over http with a pin: %v", err)
	}
	if n := received(); n != 0 {
		t.Fatalf("the plain-HTTP server received %d requests; the token went out in cleartext", n)
	}

	// With the flag, the request goes out.
	if _, err := WhoAmI(ctx, hc, base, "", true, "usr_secret"); err == nil {
		t.Fatal("the recording server refused, yet whoami succeeded")
	}
	if n := received(); n != 1 {
		t.Fatalf("with --insecure-http the server received %d requests, want 1", n)
	}
}

func TestProfileEnvOverridesFile(t *testing.T) {
	dir := t.TempDir()
	vars := map[string]string{"XDG_CONFIG_HOME": dir}
	getenv := func(k string) string { return vars[k] }
	if _, err := LoadProfile(getenv); err == nil || !strings.Contains(err.Error(), "agent login") {
		t.Fatalf("no profile: %v", err)
	}
	fp := strings.Repeat("cd", 32)
	path, err := SaveProfile(getenv, Profile{URL: "https://a.example", Token: "usr_file", Fingerprint: fp})
	if err != nil || path != dir+"/agent/config.json" {
		t.Fatalf("save: %q %v", path, err)
	}
	p, err := LoadProfile(getenv)
	if err != nil || p.URL != "https://a.example" || p.Token != "usr_file" || p.Fingerprint != fp {
		t.Fatalf("load: %+v %v", p, err)
	}
	vars[EnvToken] = "usr_env"
	vars[EnvURL] = "https://b.example"
	if p, _ := LoadProfile(getenv); p.Token != "usr_env" || p.URL != "https://b.example" || p.Fingerprint != fp {
		t.Fatalf("env overrides: %+v", p)
	}
	vars[EnvFingerprint] = "nothex"
	if _, err := LoadProfile(getenv); err == nil {
		t.Fatal("bad fingerprint from the environment accepted")
	}
	// HOME fallback.
	if path, _ := ProfilePath(func(k string) string { return map[string]string{"HOME": "/home/x"}[k] }); path != "/home/x/.config/agent/config.json" {
		t.Fatalf("HOME fallback: %q", path)
	}
}

// The reconnect schedule never waits longer than DefaultMaxBackoff (so a
// peer is back within 2 s of the coordinator's return after any outage),
// and its waits at the cap spread over the cap's upper half.
func TestBackoffBounded(t *testing.T) {
	if DefaultMaxBackoff > 2*time.Second {
		t.Fatalf("DefaultMaxBackoff %v: a peer could return more than 2 s after the coordinator", DefaultMaxBackoff)
	}
	step := DefaultMinBackoff
	lo, hi := time.Hour, time.Duration(0)
	for range 1000 {
		w := jittered(step)
		if w < step/2 || w > step {
			t.Fatalf("wait %v outside [%v, %v]", w, step/2, step)
		}
		if step == DefaultMaxBackoff {
			lo, hi = min(lo, w), max(hi, w)
		}
		step = min(step*2, DefaultMaxBackoff)
	}
	if hi-lo < DefaultMaxBackoff/4 {
		t.Errorf("waits at the cap span only %v to %v: peers would return together", lo, hi)
	}
}

// TestRetryAfterIsHonoured: a coordinator that refuses with 429 (its
// per-token or per-address limits) or 503 (shutting down) and Retry-After
// is not dialled again before that time, however short the client's own
// backoff; a 503 without Retry-After (a proxy's) takes the backoff.
func TestRetryAfterIsHonoured(t *testing.T) {
	for _, tc := range []struct {
		status      int
		retryAfter  string
		minAttempts int
		maxAttempts int
	}{
		{http.StatusTooManyRequests, "2", 2, 2},
		{http.StatusServiceUnavailable, "2", 2, 2},
		{http.StatusServiceUnavailable, "", 10, 1000},
	} {
		t.Run(fmt.Sprintf("%d-%q", tc.status, tc.retryAfter), func(t *testing.T) {
			t.Parallel()
			attempts := refusingAttempts(t, tc.status, tc.retryAfter)
			if len(attempts) < tc.minAttempts || len(attempts) > tc.maxAttempts {
				t.Fatalf("%d attempts in 3.5 s against %d with Retry-After %q, want %d to %d", len(attempts), tc.status, tc.retryAfter, tc.minAttempts, tc.maxAttempts)
			}
			if tc.retryAfter != "" {
				if gap := attempts[1].Sub(attempts[0]); gap < 2*time.Second {
					t.Fatalf("retried after %v, before the coordinator's Retry-After of 2 s", gap)
				}
			}
		})
	}
}

// refusingAttempts runs a client for 3.5 s against a coordinator that
// refuses every dial with status and Retry-After, and returns when it
// dialled.
func refusingAttempts(t *testing.T, status int, retryAfter string) []time.Time {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var attempts []time.Time
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		attempts = append(attempts, time.Now())
		mu.Unlock()
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, `{"code":"limit_exceeded","message":"refused; retry in 2s"}`)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 3500*time.Millisecond)
	defer cancel()
	c := New(Config{URL: "http://" + ln.Addr().String(), Token: "usr_x", InsecureHTTP: true,
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}, HandlerFuncs{})
	c.Run(ctx)
	mu.Lock()
	defer mu.Unlock()
	return slices.Clone(attempts)
}

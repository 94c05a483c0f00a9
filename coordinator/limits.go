package coordinator

import (
	"fmt"
	"math"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
)

// Edge limit defaults. They are generous: a laptop that opens one
// coordination session per `ssh` through ProxyCommand, a hundred at once,
// stays well inside them, and so do a few thousand agents behind one
// ingress address; a runaway script or a stolen token does not.
const (
	DefaultMaxSessionsPerToken   = 256
	DefaultMaxSessionsPerAddress = 4096
	DefaultSessionRatePerToken   = 50 // new sessions per second, sustained
	DefaultSessionBurstPerToken  = 500
	DefaultSessionRatePerAddress = 200
	DefaultSessionBurstPerAddr   = 2000
	DefaultHTTPIdleTimeout       = 90 * time.Second
	DefaultHTTPHeaderTimeout     = 10 * time.Second
	// DefaultHandshakesPerCPU bounds TLS handshakes doing their CPU work
	// at once, per CPU: a few, so each finishes in its own time.
	DefaultHandshakesPerCPU = 2
	// DefaultHandshakeQueueWait is half the handshake bound (the header
	// timeout on this side, coordclient's 10 s on the peer's): a
	// connection still waiting then is refused rather than handshaken
	// for a peer about to give up.
	DefaultHandshakeQueueWait = 5 * time.Second
)

// EdgeLimits bounds what one token and one client address may hold or
// open at the coordinator's edge, so one abuser cannot starve the rest.
// Zero values take the defaults above.
type EdgeLimits struct {
	// MaxSessionsPerToken bounds the coordination sessions open at once
	// with one token.
	MaxSessionsPerToken int
	// MaxSessionsPerAddress bounds them per client IP address (before the
	// token is checked). Behind a reverse proxy every client has the
	// proxy's address: raise it there.
	MaxSessionsPerAddress int
	// SessionRatePerToken and SessionBurstPerToken are a token bucket for
	// new sessions of one token: Burst at once, then Rate per second.
	SessionRatePerToken  float64
	SessionBurstPerToken int
	// The same per client address, counted before authentication, so it
	// also slows down guessing tokens.
	SessionRatePerAddress  float64
	SessionBurstPerAddress int
	// HTTPIdleTimeout closes keep-alive connections idle this long;
	// HTTPHeaderTimeout bounds reading a request's headers. Upgraded
	// connections (coordination, DERP) have their own keepalives.
	HTTPIdleTimeout   time.Duration
	HTTPHeaderTimeout time.Duration
	// MaxHandshakes bounds TLS handshakes doing their CPU work at once
	// (default DefaultHandshakesPerCPU per CPU); more wait, oldest first,
	// and one that waited HandshakeQueueWait since its connection was
	// accepted is refused without the work.
	MaxHandshakes      int
	HandshakeQueueWait time.Duration
}

func (l *EdgeLimits) setDefaults() {
	setInt := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	setFloat := func(v *float64, d float64) {
		if *v <= 0 {
			*v = d
		}
	}
	setDur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	setInt(&l.MaxSessionsPerToken, DefaultMaxSessionsPerToken)
	setInt(&l.MaxSessionsPerAddress, DefaultMaxSessionsPerAddress)
	setFloat(&l.SessionRatePerToken, DefaultSessionRatePerToken)
	setInt(&l.SessionBurstPerToken, DefaultSessionBurstPerToken)
	setFloat(&l.SessionRatePerAddress, DefaultSessionRatePerAddress)
	setInt(&l.SessionBurstPerAddress, DefaultSessionBurstPerAddr)
	setDur(&l.HTTPIdleTimeout, DefaultHTTPIdleTimeout)
	setDur(&l.HTTPHeaderTimeout, DefaultHTTPHeaderTimeout)
	setInt(&l.MaxHandshakes, DefaultHandshakesPerCPU*runtime.GOMAXPROCS(0))
	setDur(&l.HandshakeQueueWait, DefaultHandshakeQueueWait)
}

// edgeCount is one key's open sessions and its token bucket.
type edgeCount struct {
	active int
	tokens float64
	last   time.Time
}

// limiter keeps concurrent-session counts and new-session buckets per key.
type limiter struct {
	what      string // "token", "address": for the refusal
	flagMax   string
	flagRate  string
	max       int
	rate      float64
	burst     float64
	mu        sync.Mutex
	counts    map[string]*edgeCount
	lastSweep time.Time
}

func newLimiter(what, flagMax, flagRate string, max int, rate float64, burst int) *limiter {
	return &limiter{what: what, flagMax: flagMax, flagRate: flagRate, max: max, rate: rate, burst: float64(burst), counts: map[string]*edgeCount{}}
}

// limitError is a refused session: which limit, and when to retry.
type limitError struct {
	msg   string
	retry time.Duration
}

// admit takes a session slot for key, or says which limit refused it.
func (l *limiter) admit(key string, now time.Time) (release func(), _ *limitError) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweep(now)
	c := l.counts[key]
	if c == nil {
		c = &edgeCount{tokens: l.burst, last: now}
		l.counts[key] = c
	}
	c.tokens = math.Min(l.burst, c.tokens+now.Sub(c.last).Seconds()*l.rate)
	c.last = now
	if c.active >= l.max {
		return nil, &limitError{
			msg: fmt.Sprintf("too many coordination sessions from this %s: %d are open, the limit is %d (%s on the coordinator); close some (each agent ssh/port-forward holds one), or retry in %s",
				l.what, c.active, l.max, l.flagMax, 5*time.Second),
			retry: 5 * time.Second,
		}
	}
	if c.tokens < 1 {
		wait := time.Duration((1 - c.tokens) / l.rate * float64(time.Second))
		wait = max(wait.Round(100*time.Millisecond), 100*time.Millisecond)
		return nil, &limitError{
			msg: fmt.Sprintf("too many new coordination sessions from this %s: the limit is %g per second after a burst of %g (%s on the coordinator); retry in %s",
				l.what, l.rate, l.burst, l.flagRate, wait),
			retry: wait,
		}
	}
	c.tokens--
	c.active++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			c.active--
			l.mu.Unlock()
		})
	}, nil
}

// sweep forgets keys with no open session whose bucket has refilled, at
// most once a minute, so the maps follow the live population.
func (l *limiter) sweep(now time.Time) {
	if now.Sub(l.lastSweep) < time.Minute {
		return
	}
	l.lastSweep = now
	for k, c := range l.counts {
		if c.active == 0 && c.tokens+now.Sub(c.last).Seconds()*l.rate >= l.burst {
			delete(l.counts, k)
		}
	}
}

// edge applies EdgeLimits to new coordination sessions.
type edge struct {
	byToken *limiter
	byAddr  *limiter
	metrics *metrics.Coordinator
}

func newEdge(l EdgeLimits, m *metrics.Coordinator) *edge {
	return &edge{
		byToken: newLimiter("token", "--max-sessions-per-token", "--session-rate-per-token",
			l.MaxSessionsPerToken, l.SessionRatePerToken, l.SessionBurstPerToken),
		byAddr: newLimiter("address", "--max-sessions-per-address", "--session-rate-per-address",
			l.MaxSessionsPerAddress, l.SessionRatePerAddress, l.SessionBurstPerAddress),
		metrics: m,
	}
}

// addrKey is the client's IP address (without the port).
func addrKey(remote string) string {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return a.Unmap().String()
	}
	return host
}

// refuse answers a refused session: 429 with Retry-After and one line
// naming the limit, counted as rate_limited.
func (e *edge) refuse(w http.ResponseWriter, le *limitError) {
	e.metrics.MessageRejected(metrics.RejectRateLimited)
	w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(le.retry.Seconds()))))
	writeHTTPError(w, http.StatusTooManyRequests, &protocol.Error{Code: protocol.CodeLimitExceeded, Message: le.msg})
}

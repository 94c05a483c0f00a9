package coordinator_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/internal/pgtest"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// Scale benchmarks: many simulated agents against coordinators running
// in child processes (so that their memory is their own), over real TLS
// WebSockets on loopback, each peer a real coordclient with the default
// reconnect backoff.
//
//	go test -run '^$' -bench 'CoordinatorScale|CoordinatorRestart|WebSocketEchoScale' -benchtime 1x ./coordinator/
//
// COORD_BENCH_AGENTS sets N (default 2000); BenchmarkCoordinatorScale runs
// N/5 and N agents, so the two sizes show how cost grows. Every user owns
// scaleAgentsPerClient agents and has one client connection with a tunnel
// to each of them, so N agents bring N/100 clients. COORD_BENCH_STORES
// picks the deployments (default all three):
//
//	bbolt        one coordinator on its bbolt file (the reference)
//	postgres     one replica on PostgreSQL (a real server, internal/pgtest)
//	postgres-3   three replicas on the same PostgreSQL; agent i and client
//	             u connect to replica i%3 and u%3, so two tunnels in three
//	             cross replicas (through the database and LISTEN/NOTIFY)
//
// Reported per run:
//
//	reg-total-s, reg-per-agent-ms   all agents dial at once; done when
//	                                every agent's node reached its client
//	agent-update-p50/p99-ms         every agent publishes a new node at
//	                                once; time until its client has it
//	client-fanout-p50/p99-ms        every client publishes a new node at
//	                                once; time until each of its agents has it
//	rss-KiB/conn, heap-KiB/conn     the coordinators' RSS and Go heap+stacks
//	                                growth (summed over replicas) divided by
//	                                the connections
//
// BenchmarkCoordinatorRestart (at N/5 and N) connects N agents to one
// bbolt coordinator, all at once (the reference: cold-p50/p99/max-ms from
// the first dial, cold-coord-cpu-us/agent), shuts it down gracefully, keeps
// it down scaleOutage and starts it again on the same address and store:
// how long after its return each agent is back (p50, p99, max), what the
// new coordinator process spent per agent (coord-cpu-us/agent, its start
// included), how spread out they arrive (the busiest 100 ms as a share of
// N; a histogram in the log), and, apart from the time the coordinator
// takes to serve them, when each agent's backoff let it try
// (try-p50/p99/max-ms: the jitter alone).
//
// BenchmarkWebSocketEchoScale is the memory reference: a bare TLS WebSocket
// echo server holding the same number of connections.

const (
	scaleModeEnv         = "COORD_SCALE_CHILD"
	scaleDirEnv          = "COORD_SCALE_DIR"
	scalePGEnv           = "COORD_SCALE_PG"
	scaleListenEnv       = "COORD_SCALE_LISTEN"
	scaleAgentsPerClient = 100
	scaleWait            = 3 * time.Minute
	// restartWait bounds each phase of the restart benchmark: 10,000
	// agents on a loaded two-core machine take minutes.
	restartWait = 5 * time.Minute
	scaleOutage = 5 * time.Second
)

func scaleAgents(b *testing.B) int {
	v := os.Getenv("COORD_BENCH_AGENTS")
	if v == "" {
		return 2000
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < scaleAgentsPerClient || n%scaleAgentsPerClient != 0 {
		b.Fatalf("COORD_BENCH_AGENTS=%q: want a multiple of %d, at least %d", v, scaleAgentsPerClient, scaleAgentsPerClient)
	}
	return n
}

// scaleStores are the deployments COORD_BENCH_STORES picks from.
var scaleStores = map[string]int{"bbolt": 1, "postgres": 1, "postgres-3": 3}

func scaleStoresFromEnv(b *testing.B) []string {
	v := os.Getenv("COORD_BENCH_STORES")
	if v == "" {
		return []string{"bbolt", "postgres", "postgres-3"}
	}
	var out []string
	for _, name := range strings.Split(v, ",") {
		if _, ok := scaleStores[name]; !ok {
			b.Fatalf("COORD_BENCH_STORES=%q: %q is not one of bbolt, postgres, postgres-3", v, name)
		}
		out = append(out, name)
	}
	return out
}

func BenchmarkCoordinatorScale(b *testing.B) {
	if os.Getenv(scaleModeEnv) != "" {
		serveScaleChild(b)
		return
	}
	sizes := scaleSizes(scaleAgents(b))
	stores := scaleStoresFromEnv(b)
	var pg *pgtest.Server
	if slices.ContainsFunc(stores, func(st string) bool { return st != "bbolt" }) {
		pg = pgtest.Start(b) // one server for every run; a database each
	}
	for _, st := range stores {
		for _, size := range sizes {
			b.Run(fmt.Sprintf("store=%s/agents=%d", st, size), func(b *testing.B) {
				pgURL := ""
				var pgCPU func() time.Duration
				if st != "bbolt" {
					pgURL = pg.NewDatabase()
					pgCPU = func() time.Duration {
						d, err := pg.CPUTime()
						if err != nil {
							b.Fatal(err)
						}
						return d
					}
				}
				for b.Loop() {
					runCoordinatorScale(b, size, scaleStores[st], pgURL, pgCPU)
				}
			})
		}
	}
}

func BenchmarkCoordinatorRestart(b *testing.B) {
	if os.Getenv(scaleModeEnv) != "" {
		serveScaleChild(b)
		return
	}
	for _, n := range scaleSizes(scaleAgents(b)) {
		b.Run(fmt.Sprintf("agents=%d", n), func(b *testing.B) {
			for b.Loop() {
				runCoordinatorRestart(b, n)
			}
		})
	}
}

// scaleSizes are N/5 (when at least one client's worth) and N: how cost
// grows with N.
func scaleSizes(n int) []int {
	if small := n / 5 / scaleAgentsPerClient * scaleAgentsPerClient; small >= scaleAgentsPerClient {
		return []int{small, n}
	}
	return []int{n}
}

func BenchmarkWebSocketEchoScale(b *testing.B) {
	if os.Getenv(scaleModeEnv) != "" {
		serveScaleChild(b)
		return
	}
	n := scaleAgents(b)
	conns := n + n/scaleAgentsPerClient
	b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
		for b.Loop() {
			runEchoScale(b, conns)
		}
	})
}

// scaleChild is the server process: it prints its URL and fingerprint, and
// answers "mem" on stdin with its Go heap and stacks after a collection.
type scaleChild struct {
	dir   string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	url   string
	fp    string
}

// startScaleChild starts a child serving mode (coordinator or echo) with
// its data in dir; env adds the child's settings (scalePGEnv,
// scaleListenEnv).
func startScaleChild(b *testing.B, mode, dir string, env ...string) *scaleChild {
	b.Helper()
	bench := "^BenchmarkCoordinatorScale$"
	if mode == "echo" {
		bench = "^BenchmarkWebSocketEchoScale$"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench="+bench, "-test.benchtime=1x")
	cmd.Env = append(append(os.Environ(), scaleModeEnv+"="+mode, scaleDirEnv+"="+dir), env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatalf("starting the %s child: %v", mode, err)
	}
	c := &scaleChild{dir: dir, cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout)}
	b.Cleanup(c.stop)
	line := c.expect(b, "SCALE-READY ")
	if _, err := fmt.Sscanf(line, "%s %s", &c.url, &c.fp); err != nil {
		b.Fatalf("child's ready line %q: %v", line, err)
	}
	return c
}

// expect returns the rest of the next stdout line that starts with prefix.
func (c *scaleChild) expect(b *testing.B, prefix string) string {
	b.Helper()
	for c.out.Scan() {
		if rest, ok := strings.CutPrefix(c.out.Text(), prefix); ok {
			return rest
		}
	}
	b.Fatalf("the child exited before printing %q: %v", prefix, c.out.Err())
	return ""
}

// memory is the child's RSS (from /proc) and its Go heap plus stacks.
type memory struct{ rss, goMem int64 }

func (c *scaleChild) memory(b *testing.B) memory {
	b.Helper()
	if _, err := io.WriteString(c.stdin, "mem\n"); err != nil {
		b.Fatal(err)
	}
	var m memory
	if _, err := fmt.Sscanf(c.expect(b, "SCALE-MEM "), "%d", &m.goMem); err != nil {
		b.Fatal(err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kib, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			m.rss = kib << 10
		}
	}
	return m
}

func (c *scaleChild) stop() {
	c.stdin.Close() // the child exits on EOF
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
}

func reportMemoryPerConn(b *testing.B, before, after memory, conns int) {
	b.ReportMetric(float64(after.rss-before.rss)/1024/float64(conns), "rss-KiB/conn")
	b.ReportMetric(float64(after.goMem-before.goMem)/1024/float64(conns), "heap-KiB/conn")
}

// serveScaleChild is the child's side: a coordinator or an echo server
// until stdin closes.
func serveScaleChild(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var serveErr chan error
	switch mode := os.Getenv(scaleModeEnv); mode {
	case "coordinator":
		// Every simulated machine dials from loopback: lift the
		// per-address limits, which would otherwise see one huge site.
		listen := os.Getenv(scaleListenEnv)
		if listen == "" {
			listen = "127.0.0.1:0"
		}
		// COORD_SCALE_LOG=1 shows the coordinators' warnings, to see why
		// a run falls behind.
		logger := slog.New(slog.DiscardHandler)
		if os.Getenv("COORD_SCALE_LOG") != "" {
			logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		}
		srv, err := coordinator.New(coordinator.Config{
			DataDir:     os.Getenv(scaleDirEnv),
			PostgresURL: os.Getenv(scalePGEnv),
			Listen:      listen,
			Logger:      logger,
			Limits:      coordinator.EdgeLimits{MaxSessionsPerAddress: 1 << 20, SessionRatePerAddress: 1 << 20, SessionBurstPerAddress: 1 << 20},
		})
		if err != nil {
			b.Fatal(err)
		}
		// COORD_SCALE_CPUPROFILE=prefix writes each coordinator child's CPU
		// profile to prefix.PID: -cpuprofile sees only the agents' process.
		if prefix := os.Getenv("COORD_SCALE_CPUPROFILE"); prefix != "" {
			f, err := os.Create(fmt.Sprintf("%s.%d", prefix, os.Getpid()))
			if err != nil {
				b.Fatal(err)
			}
			if err := pprof.StartCPUProfile(f); err != nil {
				b.Fatal(err)
			}
			defer func() { pprof.StopCPUProfile(); f.Close() }()
		}
		serveErr = make(chan error, 1)
		go func() { serveErr <- srv.Serve(ctx) }()
		fmt.Printf("SCALE-READY %s %s\n", srv.URL(), srv.Fingerprint())
	case "echo":
		url, fp := serveEcho(b, ctx)
		fmt.Printf("SCALE-READY %s %s\n", url, fp)
	default:
		b.Fatalf("%s=%q: want coordinator or echo", scaleModeEnv, mode)
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "mem" {
			runtime.GC()
			debug.FreeOSMemory()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			fmt.Printf("SCALE-MEM %d\n", ms.HeapAlloc+ms.StackInuse)
		}
	}
	cancel()
	if serveErr != nil {
		<-serveErr
	}
}

// serveEcho serves a WebSocket echo over TLS with a fresh self-signed
// ECDSA P-256 certificate (the coordinator's kind) and returns its URL and
// the certificate's fingerprint.
func serveEcho(b *testing.B, ctx context.Context) (url, fingerprint string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "echo"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos:   []string{"http/1.1"},
	})
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		for {
			typ, data, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, data); err != nil {
				return
			}
		}
	})}
	go srv.Serve(ln)
	go func() { <-ctx.Done(); srv.Close() }()
	sum := sha256.Sum256(der)
	return "https://" + ln.Addr().String(), hex.EncodeToString(sum[:])
}

func runEchoScale(b *testing.B, conns int) {
	child := startScaleChild(b, "echo", b.TempDir())
	hc, err := coordclient.HTTPClient(child.fp)
	if err != nil {
		b.Fatal(err)
	}
	hc.Timeout = 0
	before := child.memory(b)
	ctx, cancel := context.WithTimeout(context.Background(), scaleWait)
	defer cancel()
	open := make([]*websocket.Conn, conns)
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	sem := make(chan struct{}, 64)
	for i := range open {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			// Each connection has its own transport, as each agent has.
			c, _, err := websocket.Dial(ctx, strings.Replace(child.url, "https", "wss", 1), &websocket.DialOptions{
				HTTPClient: &http.Client{Transport: hc.Transport.(*http.Transport).Clone()},
			})
			if err == nil {
				err = c.Write(ctx, websocket.MessageText, []byte(`{"hello":1}`))
			}
			if err == nil {
				_, _, err = c.Read(ctx)
			}
			if err != nil {
				failed.Store(&err)
				return
			}
			open[i] = c
		}()
	}
	wg.Wait()
	if e := failed.Load(); e != nil {
		b.Fatalf("echo connection: %v", *e)
	}
	after := child.memory(b)
	reportMemoryPerConn(b, before, after, conns)
	for _, c := range open {
		c.CloseNow()
	}
}

// scalePeer is one simulated agent or client: a real coordclient whose
// node carries the current round in its endpoint's port, so a receiver
// can tell which update it got.
type scalePeer struct {
	name   string
	client *coordclient.Client
	hello  chan protocol.Hello
	cancel context.CancelFunc
	done   chan error
	// lastHello is when the coordinator last said hello, and nextTry
	// when the client's backoff lets it try next (Unix ns).
	lastHello, nextTry atomic.Int64

	mu   sync.Mutex
	node *tailnet.Node
}

// startScalePeer connects a peer that publishes its round-1 node as soon
// as the coordinator has said hello.
func startScalePeer(child *scaleChild, name, token string, h coordclient.HandlerFuncs) *scalePeer {
	p := &scalePeer{name: name, hello: make(chan protocol.Hello, 1), done: make(chan error, 1)}
	h.OnHello = func(hello protocol.Hello) {
		p.mu.Lock()
		first := p.node == nil
		if first {
			p.node = &tailnet.Node{
				ID:        hello.NodeID,
				Key:       "nodekey:" + randomHex32(),
				DiscoKey:  "discokey:" + randomHex32(),
				Addresses: hello.Addresses,
				HomeDERP:  tailnet.DefaultRegionID,
				AsOf:      time.Now().UTC().Truncate(time.Second),
			}
		}
		p.mu.Unlock()
		if first {
			p.publish(1)
		}
		select {
		case p.hello <- hello:
		default:
		}
	}
	prevHello := h.OnHello
	h.OnHello = func(hello protocol.Hello) {
		p.lastHello.Store(time.Now().UnixNano())
		prevHello(hello)
	}
	// The default backoff, as agents have: the restart benchmark
	// measures it.
	p.client = coordclient.New(coordclient.Config{URL: child.url, Token: token, Fingerprint: child.fp, Software: "scale-bench",
		OnRetry: func(_ error, wait time.Duration) { p.nextTry.Store(time.Now().Add(wait).UnixNano()) }}, h)
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	go func() { p.done <- p.client.Run(ctx) }()
	return p
}

// publish sends the peer's node for round r.
func (p *scalePeer) publish(round uint16) {
	p.mu.Lock()
	n := p.node.Clone()
	p.mu.Unlock()
	n.Endpoints = []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), round)}
	p.client.UpdateNode(n)
}

// stopPeers ends all peers at once and waits for them.
func stopPeers(peers []*scalePeer) {
	for _, p := range peers {
		p.cancel()
	}
	for _, p := range peers {
		<-p.done
	}
}

func randomHex32() string {
	b := make([]byte, 32)
	rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}

// roundOf is the round a received node belongs to.
func roundOf(n tailnet.Node) uint16 {
	if len(n.Endpoints) == 0 {
		return 0
	}
	return n.Endpoints[0].Port()
}

// arrivals records, per receiver slot, when the node of a round arrived.
type arrivals struct {
	mu     sync.Mutex
	at     map[int]time.Time
	want   int
	round  uint16
	filled chan struct{}
}

func newArrivals(want int, round uint16) *arrivals {
	return &arrivals{at: map[int]time.Time{}, want: want, round: round, filled: make(chan struct{})}
}

func (a *arrivals) record(slot int, n tailnet.Node) {
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if roundOf(n) != a.round {
		return
	}
	if _, ok := a.at[slot]; ok {
		return
	}
	a.at[slot] = now
	if len(a.at) == a.want {
		close(a.filled)
	}
}

func (a *arrivals) wait(b *testing.B, what string) {
	b.Helper()
	select {
	case <-a.filled:
	case <-time.After(scaleWait):
		a.mu.Lock()
		got := len(a.at)
		a.mu.Unlock()
		b.Fatalf("%s: %d of %d arrived within %s", what, got, a.want, scaleWait)
	}
}

// latencies returns, per slot, arrival minus sent[slot].
func (a *arrivals) latencies(sent func(slot int) time.Time) []time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]time.Duration, 0, len(a.at))
	for slot, t := range a.at {
		out = append(out, t.Sub(sent(slot)))
	}
	slices.Sort(out)
	return out
}

func percentileMS(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := min(len(sorted)-1, int(p*float64(len(sorted))))
	return float64(sorted[i].Microseconds()) / 1000
}

// scaleWorld is the state of one run: who is who and what has arrived
// where. Handlers look it up by peer name.
type scaleWorld struct {
	mu          sync.Mutex
	agentSlot   map[string]int // agent name -> index
	clientSlot  map[string]int // user name -> client index
	atClients   *arrivals      // slot: agent index; agents' nodes seen by their client
	atAgents    *arrivals      // slot: agent index; the client's node seen by the agent
	tunnelsOpen atomic.Int64
	tunnelsAll  chan struct{}
}

func (w *scaleWorld) current() (atClients, atAgents *arrivals) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.atClients, w.atAgents
}

// storm has every sender publish its round-2 node at once and returns,
// sorted, the time from each receiver's sender publishing to the receiver
// having the node. dst is the arrivals the receivers' handlers record into.
func (w *scaleWorld) storm(b *testing.B, what string, dst **arrivals, senders []*scalePeer, senderOf func(slot int) int) []time.Duration {
	fresh := newArrivals(len(w.agentSlot), 2)
	w.mu.Lock()
	*dst = fresh
	w.mu.Unlock()
	sent := make([]time.Time, len(senders))
	for i, p := range senders {
		sent[i] = time.Now()
		p.publish(2)
	}
	fresh.wait(b, what)
	return fresh.latencies(func(slot int) time.Time { return sent[senderOf(slot)] })
}

// scaleDeployment is the coordinators of one run and what they serve.
type scaleDeployment struct {
	children    []*scaleChild
	agentTokens []string
	userTokens  []string
}

// startScaleDeployment starts replicas coordinators (on pgURL, or one on
// bbolt when it is "") and provisions n agents, 100 per user.
func startScaleDeployment(b *testing.B, n, replicas int, pgURL string) (*scaleDeployment, *scaleWorld) {
	d := &scaleDeployment{}
	for range replicas {
		var env []string
		if pgURL != "" {
			env = append(env, scalePGEnv+"="+pgURL)
		}
		d.children = append(d.children, startScaleChild(b, "coordinator", b.TempDir(), env...))
	}
	w := provisionScale(b, d, n)
	return d, w
}

// provisionScale creates the users, agents and tokens through the first
// coordinator's admin socket, several at a time (not measured).
func provisionScale(b *testing.B, d *scaleDeployment, n int) *scaleWorld {
	adm, err := admin.DialSocket(context.Background(), admin.SocketPath(d.children[0].dir))
	if err != nil {
		b.Fatalf("admin socket: %v", err)
	}
	clients := n / scaleAgentsPerClient
	w := &scaleWorld{agentSlot: map[string]int{}, clientSlot: map[string]int{}, tunnelsAll: make(chan struct{})}
	d.agentTokens = make([]string, n)
	d.userTokens = make([]string, clients)
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	sem := make(chan struct{}, 8)
	for u := range clients {
		user := fmt.Sprintf("u%03d", u)
		w.clientSlot[user] = u
		for i := u * scaleAgentsPerClient; i < (u+1)*scaleAgentsPerClient; i++ {
			w.agentSlot[fmt.Sprintf("a%05d", i)] = i
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			err := func() error {
				if _, err := adm.CreateUser(b.Context(), user); err != nil {
					return err
				}
				t, err := adm.CreateToken(b.Context(), store.KindUser, user, time.Time{})
				if err != nil {
					return err
				}
				d.userTokens[u] = t.Secret
				for i := u * scaleAgentsPerClient; i < (u+1)*scaleAgentsPerClient; i++ {
					created, err := adm.CreateAgent(b.Context(), fmt.Sprintf("a%05d", i), user)
					if err != nil {
						return err
					}
					d.agentTokens[i] = created.Secret
				}
				return nil
			}()
			if err != nil {
				failed.Store(&err)
			}
		}()
	}
	wg.Wait()
	if e := failed.Load(); e != nil {
		b.Fatalf("provisioning: %v", *e)
	}
	return w
}

// memory is the coordinators' memory, summed.
func (d *scaleDeployment) memory(b *testing.B) memory {
	var m memory
	for _, c := range d.children {
		cm := c.memory(b)
		m.rss += cm.rss
		m.goMem += cm.goMem
	}
	return m
}

// runCoordinatorScale runs one deployment; pgCPU, when set, is the
// database server's CPU time so far.
func runCoordinatorScale(b *testing.B, n, replicas int, pgURL string, pgCPU func() time.Duration) {
	clients := n / scaleAgentsPerClient
	d, w := startScaleDeployment(b, n, replicas, pgURL)
	child := func(i int) *scaleChild { return d.children[i%len(d.children)] }
	before := d.memory(b)

	// Clients first, each with a tunnel to its agents (offline yet).
	w.atClients = newArrivals(n, 1)
	w.atAgents = newArrivals(n, 1)
	clientPeers := make([]*scalePeer, clients)
	for u := range clients {
		clientPeers[u] = startScalePeer(child(u), fmt.Sprintf("u%03d", u), d.userTokens[u], coordclient.HandlerFuncs{
			OnPeerUpdate: func(p protocol.Peer) {
				atClients, _ := w.current()
				atClients.record(w.agentSlot[p.Name], p.Node)
			},
			OnTunnelStatus: func(protocol.TunnelStatus) {
				if w.tunnelsOpen.Add(1) == int64(n) {
					close(w.tunnelsAll)
				}
			},
		})
	}
	b.Cleanup(func() { stopPeers(clientPeers) })
	for u, c := range clientPeers {
		select {
		case <-c.hello:
		case <-time.After(scaleWait):
			b.Fatalf("client %d got no hello", u)
		}
		for i := u * scaleAgentsPerClient; i < (u+1)*scaleAgentsPerClient; i++ {
			c.client.AddTunnel(fmt.Sprintf("a%05d", i))
		}
	}
	select {
	case <-w.tunnelsAll:
	case <-time.After(scaleWait):
		b.Fatalf("only %d of %d tunnels were granted", w.tunnelsOpen.Load(), n)
	}

	// Registration: all agents at once; done when every agent's node is at
	// its client.
	agentPeers := make([]*scalePeer, n)
	cpu := d.cpu(b, pgCPU)
	start := time.Now()
	for i := range n {
		agentPeers[i] = startScalePeer(child(i), fmt.Sprintf("a%05d", i), d.agentTokens[i], coordclient.HandlerFuncs{
			OnPeerUpdate: func(peer protocol.Peer) {
				_, atAgents := w.current()
				atAgents.record(i, peer.Node)
			},
		})
	}
	b.Cleanup(func() { stopPeers(agentPeers) })
	atClients, atAgents := w.current()
	atClients.wait(b, "agents' nodes at their clients")
	registration := time.Since(start)
	atAgents.wait(b, "clients' nodes at their agents")
	cpu = d.cpu(b, pgCPU).minus(cpu)
	after := d.memory(b)

	// Every agent publishes a new node at once, then every client does
	// (fan-out to its agents).
	agentLat := w.storm(b, "agents' updated nodes at their clients", &w.atClients, agentPeers,
		func(slot int) int { return slot })
	fanLat := w.storm(b, "clients' updated nodes at their agents", &w.atAgents, clientPeers,
		func(slot int) int { return slot / scaleAgentsPerClient })

	b.ReportMetric(registration.Seconds(), "reg-total-s")
	b.ReportMetric(float64(registration.Microseconds())/1000/float64(n), "reg-per-agent-ms")
	b.ReportMetric(percentileMS(agentLat, 0.50), "agent-update-p50-ms")
	b.ReportMetric(percentileMS(agentLat, 0.99), "agent-update-p99-ms")
	b.ReportMetric(percentileMS(fanLat, 0.50), "client-fanout-p50-ms")
	b.ReportMetric(percentileMS(fanLat, 0.99), "client-fanout-p99-ms")
	reportMemoryPerConn(b, before, after, n+clients)
	// CPU time is what a loaded machine does not blur, and it tells the
	// coordinators' and the database's cost apart from the simulated
	// agents' (which share the cores).
	perAgent := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }
	b.ReportMetric(perAgent(cpu.coord), "coord-cpu-ms/agent")
	b.ReportMetric(perAgent(cpu.db), "db-cpu-ms/agent")
	b.ReportMetric(perAgent(cpu.sim), "sim-cpu-ms/agent")
}

// cpuUse is CPU time spent so far by the coordinators (summed), the
// database server, and this process (the simulated peers).
type cpuUse struct{ coord, db, sim time.Duration }

func (u cpuUse) minus(v cpuUse) cpuUse {
	return cpuUse{coord: u.coord - v.coord, db: u.db - v.db, sim: u.sim - v.sim}
}

func (d *scaleDeployment) cpu(b *testing.B, pgCPU func() time.Duration) cpuUse {
	u := cpuUse{sim: processCPU(b)}
	for _, c := range d.children {
		u.coord += childCPU(b, c.cmd.Process.Pid)
	}
	if pgCPU != nil {
		u.db = pgCPU()
	}
	return u
}

// runCoordinatorRestart: n agents on one bbolt coordinator; it shuts down
// gracefully, stays down scaleOutage and comes back on the same address
// and store; each agent's delay is from the new process's ready line to
// the agent's next hello.
func runCoordinatorRestart(b *testing.B, n int) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := b.TempDir()
	first := startScaleChild(b, "coordinator", dir, scaleListenEnv+"="+addr)
	d := &scaleDeployment{children: []*scaleChild{first}}
	provisionScale(b, d, n)
	// The reference: the same agents' first registration, all dialing at
	// once (full TLS handshakes, nothing to resume).
	coldCPU := childCPU(b, first.cmd.Process.Pid)
	start := time.Now()
	peers := make([]*scalePeer, n)
	for i := range n {
		peers[i] = startScalePeer(first, fmt.Sprintf("a%05d", i), d.agentTokens[i], coordclient.HandlerFuncs{})
	}
	b.Cleanup(func() { stopPeers(peers) })
	deadline := time.Now().Add(restartWait)
	cold := make([]time.Duration, n)
	for i, p := range peers {
		select {
		case <-p.hello:
			cold[i] = time.Duration(p.lastHello.Load() - start.UnixNano())
		case <-time.After(time.Until(deadline)):
			b.Fatalf("agent %d got no hello", i)
		}
	}
	coldCPU = childCPU(b, first.cmd.Process.Pid) - coldCPU
	slices.Sort(cold)

	down := time.Now()
	first.stop()
	gone := time.Now().UnixNano()
	time.Sleep(scaleOutage - time.Since(down))
	second := startScaleChild(b, "coordinator", dir, scaleListenEnv+"="+addr)
	// The listener is bound a moment before the ready line: an agent
	// back by then counts as back at once.
	back := time.Now()
	agentsCPU := processCPU(b)
	var delays, tries []time.Duration
	for len(delays) < n {
		if time.Since(back) > restartWait {
			b.Fatalf("%d of %d agents were back within %s of the coordinator's return", len(delays), n, restartWait)
		}
		time.Sleep(50 * time.Millisecond)
		delays, tries = delays[:0], tries[:0]
		for _, p := range peers {
			if t := p.lastHello.Load(); t > gone {
				delays = append(delays, max(0, time.Duration(t-back.UnixNano())))
				// The attempt that succeeded began when its backoff ended.
				tries = append(tries, max(0, time.Duration(p.nextTry.Load()-back.UnixNano())))
			}
		}
	}
	// CPU time is the figure a loaded machine does not blur: what the
	// coordinator (startup included) and the agents spent on the return.
	agentsCPU = processCPU(b) - agentsCPU
	coordCPU := childCPU(b, second.cmd.Process.Pid)
	slices.Sort(delays)
	slices.Sort(tries)
	const bucket = 100 * time.Millisecond
	hist := make([]int, int(delays[len(delays)-1]/bucket)+1)
	for _, dl := range delays {
		hist[dl/bucket]++
	}
	counts := make([]string, len(hist))
	for i, c := range hist {
		counts[i] = strconv.Itoa(c)
	}
	b.Logf("agents back per 100 ms after the coordinator's return (%s down): %s", scaleOutage, strings.Join(counts, " "))
	b.ReportMetric(scaleOutage.Seconds(), "outage-s")
	b.ReportMetric(percentileMS(delays, 0.50), "return-p50-ms")
	b.ReportMetric(percentileMS(delays, 0.99), "return-p99-ms")
	b.ReportMetric(float64(delays[len(delays)-1].Microseconds())/1000, "return-max-ms")
	b.ReportMetric(float64(slices.Max(hist))*100/float64(n), "busiest-100ms-pct")
	b.ReportMetric(float64(coordCPU.Milliseconds()), "coord-cpu-ms")
	b.ReportMetric(float64(coordCPU.Microseconds())/float64(n), "coord-cpu-us/agent")
	b.ReportMetric(percentileMS(cold, 0.50), "cold-p50-ms")
	b.ReportMetric(percentileMS(cold, 0.99), "cold-p99-ms")
	b.ReportMetric(float64(cold[n-1].Microseconds())/1000, "cold-max-ms")
	b.ReportMetric(float64(coldCPU.Microseconds())/float64(n), "cold-coord-cpu-us/agent")
	b.ReportMetric(float64(agentsCPU.Milliseconds()), "agents-cpu-ms")
	b.ReportMetric(percentileMS(tries, 0.50), "try-p50-ms")
	b.ReportMetric(percentileMS(tries, 0.99), "try-p99-ms")
	b.ReportMetric(float64(tries[len(tries)-1].Microseconds())/1000, "try-max-ms")
}

// processCPU is this process's user+system CPU time so far.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// childCPU is a running child's user+system CPU time, from /proc.
func childCPU(b *testing.B, pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The fields after the command name (which may hold spaces):
	// utime and stime are the 14th and 15th of the line.
	_, rest, _ := strings.Cut(string(raw), ") ")
	f := strings.Fields(rest)
	if len(f) < 13 {
		b.Fatalf("/proc/%d/stat: too few fields", pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("/proc/%d/stat: utime %q stime %q", pid, f[11], f[12])
	}
	const clockTick = 10 * time.Millisecond // USER_HZ is 100 on Linux
	return time.Duration(utime+stime) * clockTick
}

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
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// Scale benchmarks: many simulated agents against one coordinator running
// in a child process (so that its memory is its own), over real TLS
// WebSockets on loopback, each peer a real coordclient.
//
//	go test -run '^$' -bench 'CoordinatorScale|WebSocketEchoScale' -benchtime 1x ./coordinator/
//
// COORD_BENCH_AGENTS sets N (default 2000). Every user owns
// scaleAgentsPerClient agents and has one client connection with a tunnel
// to each of them, so N agents bring N/100 clients.
//
// BenchmarkCoordinatorScale runs N=100 first, as the reference for N, and
// reports per run:
//
//	reg-total-s, reg-per-agent-ms   all N agents dial at once; done when
//	                                every agent's node reached its client
//	agent-update-p50/p99-ms         every agent publishes a new node at
//	                                once; time until its client has it
//	client-fanout-p50/p99-ms        every client publishes a new node at
//	                                once; time until each of its agents has it
//	rss-KiB/conn, heap-KiB/conn     the coordinator's RSS and Go heap+stacks
//	                                growth divided by the connections
//
// BenchmarkWebSocketEchoScale is the memory reference: a bare TLS WebSocket
// echo server holding the same number of connections.

const (
	scaleModeEnv         = "COORD_SCALE_CHILD"
	scaleDirEnv          = "COORD_SCALE_DIR"
	scaleAgentsPerClient = 100
	scaleWait            = 3 * time.Minute
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

func BenchmarkCoordinatorScale(b *testing.B) {
	if os.Getenv(scaleModeEnv) != "" {
		serveScaleChild(b)
		return
	}
	sizes := []int{scaleAgentsPerClient}
	if n := scaleAgents(b); n != scaleAgentsPerClient {
		sizes = append(sizes, n)
	}
	for _, n := range sizes {
		b.Run(fmt.Sprintf("agents=%d", n), func(b *testing.B) {
			for b.Loop() {
				runCoordinatorScale(b, n)
			}
		})
	}
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
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	url   string
	fp    string
}

func startScaleChild(b *testing.B, mode, dir string) *scaleChild {
	b.Helper()
	bench := "^BenchmarkCoordinatorScale$"
	if mode == "echo" {
		bench = "^BenchmarkWebSocketEchoScale$"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench="+bench, "-test.benchtime=1x")
	cmd.Env = append(os.Environ(), scaleModeEnv+"="+mode, scaleDirEnv+"="+dir)
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
	c := &scaleChild{cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout)}
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
		srv, err := coordinator.New(coordinator.Config{
			DataDir: os.Getenv(scaleDirEnv),
			Listen:  "127.0.0.1:0",
			Logger:  slog.New(slog.DiscardHandler),
			Limits:  coordinator.EdgeLimits{MaxSessionsPerAddress: 1 << 20, SessionRatePerAddress: 1 << 20, SessionBurstPerAddress: 1 << 20},
		})
		if err != nil {
			b.Fatal(err)
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
	p.client = coordclient.New(coordclient.Config{
		URL: child.url, Token: token, Fingerprint: child.fp, Software: "scale-bench",
		MinBackoff: 100 * time.Millisecond, MaxBackoff: 2 * time.Second,
	}, h)
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

func runCoordinatorScale(b *testing.B, n int) {
	clients := n / scaleAgentsPerClient
	dir := b.TempDir()
	child := startScaleChild(b, "coordinator", dir)
	adm, err := admin.DialSocket(context.Background(), admin.SocketPath(dir))
	if err != nil {
		b.Fatalf("admin socket: %v", err)
	}
	w := &scaleWorld{agentSlot: map[string]int{}, clientSlot: map[string]int{}, tunnelsAll: make(chan struct{})}
	agentTokens := make([]string, n)
	userTokens := make([]string, clients)
	for u := range clients {
		user := fmt.Sprintf("u%03d", u)
		if _, err := adm.CreateUser(user); err != nil {
			b.Fatal(err)
		}
		t, err := adm.CreateToken(store.KindUser, user, time.Time{})
		if err != nil {
			b.Fatal(err)
		}
		userTokens[u] = t.Secret
		w.clientSlot[user] = u
		for i := u * scaleAgentsPerClient; i < (u+1)*scaleAgentsPerClient; i++ {
			name := fmt.Sprintf("a%05d", i)
			created, err := adm.CreateAgent(name, user)
			if err != nil {
				b.Fatal(err)
			}
			agentTokens[i] = created.Secret
			w.agentSlot[name] = i
		}
	}
	before := child.memory(b)

	// Clients first, each with a tunnel to its agents (offline yet).
	w.atClients = newArrivals(n, 1)
	w.atAgents = newArrivals(n, 1)
	clientPeers := make([]*scalePeer, clients)
	for u := range clients {
		clientPeers[u] = startScalePeer(child, fmt.Sprintf("u%03d", u), userTokens[u], coordclient.HandlerFuncs{
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
	start := time.Now()
	for i := range n {
		agentPeers[i] = startScalePeer(child, fmt.Sprintf("a%05d", i), agentTokens[i], coordclient.HandlerFuncs{
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
	after := child.memory(b)

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
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/agentd/agent/internal/benchtable"
)

// The load-portforward step: many concurrent HTTP requests, each on a new
// connection, through a real `agent port-forward` to an HTTP server in the
// workspace (the deployment of deployment.go: coordinator, `agent run`, the
// laptop's client, each its own process), beside the same requests straight
// to the server in the same run.

const loadPFChildArg = "load-portforward-child"

// loadPFBursts are the burst sizes; each sends loadPFRequests requests.
var loadPFBursts = []int{100, 200}

// loadPFTimeout bounds one request; the forward client gives up its dial
// to the workspace after 15 s, so a lost connection shows as a failure.
const loadPFTimeout = 30 * time.Second

// loadPFPath is what one path (forwarded or direct) did in one burst size.
type loadPFPath struct {
	Failures  int       `json:"failures"`
	FirstErr  string    `json:"first_error,omitempty"`
	LatencyMS []float64 `json:"latency_ms"` // of the requests that succeeded
}

// loadPFResult is what the child measured.
type loadPFResult struct {
	Bursts []loadPFBurst `json:"bursts"`
	// FreedMS is how long the agent took to free loadPFHeld forwarded
	// flows after `agent port-forward` exited.
	FreedMS float64 `json:"freed_ms"`
}

// loadPFHeld is how many requests are left open when the client exits.
const loadPFHeld = 100

// loadPFFreeTarget is how soon the agent must free the flows of a client
// that exited.
const loadPFFreeTarget = time.Second

type loadPFBurst struct {
	Burst     int        `json:"burst"`
	Requests  int        `json:"requests"`
	Forwarded loadPFPath `json:"forwarded"`
	Direct    loadPFPath `json:"direct"`
}

func loadPFRowNames(requests int) []string {
	var names []string
	for _, b := range loadPFBursts {
		for _, what := range []string{"failures", "p50", "p99"} {
			names = append(names, fmt.Sprintf("agent port-forward, %d requests in bursts of %d: %s", requests, b, what))
		}
	}
	return append(names, loadPFFreedRow)
}

var loadPFFreedRow = fmt.Sprintf("agent port-forward exits with %d requests open: agent frees the flows", loadPFHeld)

func loadPFRequestsFromEnv() (int, error) {
	v := os.Getenv("LOAD_PF_REQUESTS")
	if v == "" {
		return 1000, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 200 || n%200 != 0 {
		return 0, fmt.Errorf("LOAD_PF_REQUESTS=%q: want a multiple of 200 (the largest burst), e.g. 1000", v)
	}
	return n, nil
}

// measureLoadPortForward runs loadPortForwardChild in a private network
// namespace, as measureDeployment does.
func measureLoadPortForward(ctx context.Context, log io.Writer, bin string) []benchtable.Row {
	requests, err := loadPFRequestsFromEnv()
	if err != nil {
		return failRows(loadPFRowNames(1000), err)
	}
	names := loadPFRowNames(requests)
	if os.Geteuid() != 0 {
		return skipRows(names, "needs root for a private network namespace with a veth pair")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		return skipRows(names, "needs unshare (util-linux) for a private network namespace")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	var res loadPFResult
	if err := runNamespaceChild(ctx, log, []string{"--net"}, nil, "port-forward load", &res, loadPFChildArg, bin, strconv.Itoa(requests)); err != nil {
		return failRows(names, err)
	}
	return loadPFRows(res)
}

func loadPFRows(res loadPFResult) []benchtable.Row {
	var rows []benchtable.Row
	for _, b := range res.Bursts {
		prefix := fmt.Sprintf("agent port-forward, %d requests in bursts of %d: ", b.Requests, b.Burst)
		direct := "straight to the server"
		note := func(p loadPFPath) string {
			if p.FirstErr == "" {
				return "new connection per request (HTTP GET, 1 KiB reply)"
			}
			return "first error: " + p.FirstErr
		}
		count := func(n int) benchtable.Value { return benchtable.Value{Value: float64(n), Unit: "failed"} }
		dc := count(b.Direct.Failures)
		failures := benchtable.Measured(prefix+"failures", count(b.Forwarded.Failures),
			benchtable.Reference{Name: direct, Value: &dc, Note: note(b.Direct)}, note(b.Forwarded))
		if b.Forwarded.Failures > 0 {
			failures.Status = benchtable.StatusFailed
		}
		rows = append(rows, failures)
		for _, q := range []struct {
			name string
			p    float64
		}{{"p50", 0.50}, {"p99", 0.99}} {
			fwd, dir := percentile(b.Forwarded.LatencyMS, q.p), percentile(b.Direct.LatencyMS, q.p)
			ms := func(v float64) benchtable.Value { return benchtable.Value{Value: v, Unit: "ms"} }
			dv := ms(dir)
			rows = append(rows, benchtable.Measured(prefix+q.name, ms(fwd), benchtable.Reference{Name: direct, Value: &dv},
				fmt.Sprintf("latency of one request from the start of its burst, %d and %d that succeeded", len(b.Forwarded.LatencyMS), len(b.Direct.LatencyMS))))
		}
	}
	target := benchtable.Value{Value: float64(loadPFFreeTarget.Milliseconds()), Unit: "ms"}
	freed := benchtable.Measured(loadPFFreedRow, benchtable.Value{Value: res.FreedMS, Unit: "ms"},
		benchtable.Reference{Name: "target", Value: &target},
		"from SIGINT to agent_connections_active{kind=\"port_forward_tcp\"} 0 on the agent's status socket")
	if res.FreedMS > target.Value {
		freed.Status = benchtable.StatusFailed
	}
	return append(rows, freed)
}

func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// loadPortForwardChild runs inside the new network namespace and prints
// the loadPFResult it measured as JSON.
func loadPortForwardChild(ctx context.Context, bin string, requests int) error {
	// The workspace's server, on the loopback the agent forwards to.
	srvLn, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	body := bytes.Repeat([]byte("x"), 1024)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/hold" {
				// A request that stays open, as a long poll does, until
				// its client goes away.
				w.WriteHeader(http.StatusOK)
				w.(http.Flusher).Flush()
				<-r.Context().Done()
				return
			}
			w.Write(body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(srvLn)
	defer srv.Close()
	srvPort := srvLn.Addr().(*net.TCPAddr).Port

	d, stop, err := upDeployment(ctx, bin, "bench0", "bench1") // returns once the agent has joined
	if err != nil {
		return err
	}
	defer stop()
	localPort, err := freePort()
	if err != nil {
		return err
	}
	pf := exec.CommandContext(ctx, bin, "port-forward", "ws", fmt.Sprintf("%d:%d", localPort, srvPort))
	pf.Env = d.clientEnv
	var pfOut bytes.Buffer
	pf.Stdout, pf.Stderr = &pfOut, &pfOut
	pf.Cancel = func() error { return pf.Process.Signal(os.Interrupt) }
	pf.WaitDelay = 5 * time.Second
	pf.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := pf.Start(); err != nil {
		return fmt.Errorf("start agent port-forward: %w", err)
	}
	pfDone := make(chan error, 1)
	go func() { pfDone <- pf.Wait() }()
	defer func() {
		pf.Process.Signal(os.Interrupt)
		<-pfDone
	}()
	fwdURL := fmt.Sprintf("http://127.0.0.1:%d/", localPort)
	directURL := fmt.Sprintf("http://127.0.0.1:%d/", srvPort)
	if err := waitHTTP(ctx, fwdURL, 30*time.Second); err != nil {
		return fmt.Errorf("agent port-forward did not carry a request within 30 s: %w: %s", err, lastLines(pfOut.String(), 3))
	}

	var out loadPFResult
	for _, burst := range loadPFBursts {
		res := loadPFBurst{Burst: burst, Requests: requests}
		for range requests / burst {
			// Alternate, so the load of the machine falls on both alike.
			runBurst(ctx, directURL, burst, &res.Direct)
			runBurst(ctx, fwdURL, burst, &res.Forwarded)
		}
		fmt.Fprintf(os.Stderr, "bursts of %d: forwarded %d failed, direct %d failed\n", burst, res.Forwarded.Failures, res.Direct.Failures)
		out.Bursts = append(out.Bursts, res)
	}
	freed, err := freedAfterExit(ctx, pf, fwdURL+"hold", filepath.Join(d.dir, "agent", "status.sock"))
	if err != nil {
		return err
	}
	out.FreedMS = float64(freed.Microseconds()) / 1000
	if msg := strings.TrimSpace(pfOut.String()); msg != "" {
		fmt.Fprintf(os.Stderr, "agent port-forward said:\n%s\n", lastLines(msg, 20))
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// waitHTTP gets url until it answers or within is over.
func waitHTTP(ctx context.Context, url string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		err := getOnce(ctx, url)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// runBurst starts n requests at once, each on a new connection, and adds
// their outcome to p.
func runBurst(ctx context.Context, url string, n int, p *loadPFPath) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for range n {
		wg.Go(func() {
			err := getOnce(ctx, url)
			ms := float64(time.Since(start).Microseconds()) / 1000
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				p.Failures++
				if p.FirstErr == "" {
					p.FirstErr = fmt.Sprintf("after %.0f ms: %v", ms, err)
				}
				return
			}
			p.LatencyMS = append(p.LatencyMS, ms)
		})
	}
	wg.Wait()
}

// getOnce makes one GET on a connection of its own and reads the reply.
func getOnce(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, loadPFTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	if resp.StatusCode != http.StatusOK || n != 1024 {
		return errors.New("reply was " + resp.Status + " with " + strconv.FormatInt(n, 10) + " bytes, want 200 OK with 1024")
	}
	return nil
}

// freedAfterExit opens loadPFHeld requests that stay open through the
// forward, interrupts `agent port-forward` as a person's Ctrl-C does, and
// returns how long the agent then took to free the forwarded flows, read
// from its metrics on the status socket.
func freedAfterExit(ctx context.Context, pf *exec.Cmd, holdURL, statusSock string) (time.Duration, error) {
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for range loadPFHeld {
		go func() {
			req, _ := http.NewRequestWithContext(hctx, http.MethodGet, holdURL, nil)
			tr := &http.Transport{DisableKeepAlives: true}
			defer tr.CloseIdleConnections()
			if resp, err := (&http.Client{Transport: tr}).Do(req); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	status := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", statusSock)
		},
	}}
	flows := func() (int, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/metrics", nil)
		resp, err := status.Do(req)
		if err != nil {
			return 0, fmt.Errorf("the agent's status socket: %w", err)
		}
		defer resp.Body.Close()
		text, err := io.ReadAll(resp.Body)
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(text), "\n") {
			if v, ok := strings.CutPrefix(line, `agent_connections_active{kind="port_forward_tcp"} `); ok {
				n, err := strconv.ParseFloat(v, 64)
				return int(n), err
			}
		}
		return 0, nil
	}
	waitFor := func(want int, within time.Duration) error {
		deadline := time.Now().Add(within)
		for {
			n, err := flows()
			if err != nil || n == want {
				return err
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("the agent still forwards %d TCP connections after %v, want %d", n, within, want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if err := waitFor(loadPFHeld, 30*time.Second); err != nil {
		return 0, err
	}
	start := time.Now()
	if err := pf.Process.Signal(os.Interrupt); err != nil {
		return 0, err
	}
	if err := waitFor(0, 10*time.Second); err != nil {
		return 0, fmt.Errorf("after agent port-forward exited: %w", err)
	}
	return time.Since(start), nil
}

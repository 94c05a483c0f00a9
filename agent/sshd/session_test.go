package sshd_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/client/sshclient"
	"github.com/agentd/agent/internal/testkit/sshtest"
	"github.com/agentd/agent/metrics"
)

// TestFastExecsNeverFail: many concurrent execs of a command that exits at
// once, with our client (sshclient.RunCommand, a connection each, as `agent
// ssh ws -- true`), with x/crypto's sessions sharing connections, and with
// OpenSSH's ssh. The server answers exec before the command can end, so
// none may fail. Before, the server started the command and then replied,
// and 1-2% of `agent ssh ws -- true` failed with "SSH session: EOF" when
// the close overtook the reply; on loopback the old server lost 1 of 1,300
// execs here in two runs of three.
func TestFastExecsNeverFail(t *testing.T) {
	sshtest.RequireTools(t, "ssh")
	// sh rather than the login shell: this is about the protocol, and a
	// shell that reads a profile only makes it slower.
	_, addr := startServer(t, sshd.Options{Logger: quietLogger(), Shell: "/bin/sh"})
	start := time.Now()

	const workers, perWorker = 24, 40
	var failures atomic.Int32
	var firstErr sync.Once
	fail := func(format string, args ...any) {
		failures.Add(1)
		firstErr.Do(func() { t.Errorf(format, args...) })
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if w%2 == 1 {
				// A new connection per exec through sshclient.RunCommand,
				// exactly what `agent ssh ws -- true` does.
				for i := 0; i < perWorker; i++ {
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					nc, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
					if err != nil {
						fail("dial: %v", err)
					} else if code, err := sshclient.RunCommand(ctx, nc, "true", nil, io.Discard, io.Discard); err != nil || code != 0 {
						fail("agent ssh -- true: exit %d, %v", code, err)
					}
					cancel()
				}
				return
			}
			// Many sessions on one shared connection.
			client, err := dialGoErr(addr)
			if err != nil {
				fail("dial: %v", err)
				return
			}
			defer client.Close()
			for i := 0; i < perWorker; i++ {
				sess, err := client.NewSession()
				if err != nil {
					fail("new session: %v", err)
					continue
				}
				if err := sess.Run("true"); err != nil {
					fail("exec true: %v", err)
				}
				sess.Close()
			}
		}()
	}

	// OpenSSH's client at the same time.
	tg := target(addr)
	const sshRuns, sshWorkers = 20, 4
	for w := 0; w < sshWorkers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < sshRuns/sshWorkers; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				out, err := exec.CommandContext(ctx, "ssh", append(tg.SSHArgs(), tg.Host, "true")...).CombinedOutput()
				cancel()
				if err != nil {
					fail("OpenSSH ssh true: %v: %s", err, out)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d execs in %v", workers*perWorker+sshRuns, time.Since(start).Round(time.Millisecond))
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d fast execs failed, want 0", n, workers*perWorker+sshRuns)
	}
}

// TestSessionEnvironment: the workspace's variables reach a session; the
// agent's internals never do.
func TestSessionEnvironment(t *testing.T) {
	internals := map[string]string{
		"AGENT_TOKEN":              "secret-token-value",
		"AGENT_COORDINATOR_URL":    "https://coord.example.com",
		"TS_DEBUG_MTU":             "1280",
		"TS_DEBUG_ALWAYS_USE_DERP": "true",
		"SHLVL":                    "7",
		"GOMEMLIMIT":               "96MiB",
	}
	workspace := map[string]string{
		"WORKSPACE_SETTING": "kept value",
		"LANG":              "C.UTF-8",
		"PATH":              "/opt/workspace/bin:" + os.Getenv("PATH"),
	}
	for k, v := range internals {
		t.Setenv(k, v)
	}
	for k, v := range workspace {
		t.Setenv(k, v)
	}
	// Options.Env is filtered the same way.
	_, addr := startServer(t, sshd.Options{Env: []string{"FROM_OPTIONS=yes", "TS_AUTHKEY=tskey-x"}})
	client := dialGo(t, addr)
	defer client.Close()
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	out, err := sess.Output("env")
	if err != nil {
		t.Fatalf("env: %v", err)
	}
	got := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			got[k] = v
		}
	}
	// A login profile or ~/.bashrc (bash reads it for commands run by an
	// SSH server) may add to PATH, so only ask that it was kept.
	if !strings.Contains(":"+got["PATH"]+":", ":/opt/workspace/bin:") {
		t.Errorf("PATH in the session is %q, want it to keep the workspace's /opt/workspace/bin", got["PATH"])
	}
	for k, v := range workspace {
		if k != "PATH" && got[k] != v {
			t.Errorf("workspace variable %s = %q in the session, want %q", k, got[k], v)
		}
	}
	if got["FROM_OPTIONS"] != "yes" {
		t.Errorf("Options.Env variable FROM_OPTIONS = %q, want yes", got["FROM_OPTIONS"])
	}
	for k := range got {
		if strings.HasPrefix(k, "AGENT_") || strings.HasPrefix(k, "TS_") || k == "GOMEMLIMIT" {
			t.Errorf("agent internal %s=%s reached the session", k, got[k])
		}
	}
	// The session's shell counts its own level from nothing (bash: 0 or 1).
	if v, ok := got["SHLVL"]; ok && v != "0" && v != "1" {
		t.Errorf("SHLVL=%s in the session: the agent's level leaked (want none, 0 or 1)", v)
	}
}

// TestRemoteForwardLoopbackOnly: ssh -R with a non-loopback bind address
// listens on loopback only, as OpenSSH's sshd does with GatewayPorts=no
// (issue 12): the forward works from the workspace itself, and nothing
// listens on the address the client named.
func TestRemoteForwardLoopbackOnly(t *testing.T) {
	sshtest.RequireTools(t, "ssh")
	_, addr := startServer(t, sshd.Options{})
	tg := target(addr)
	echo := sshtest.EchoServer(t, "tcp", "127.0.0.1:0")
	for _, bind := range []string{nonLoopbackIPv4(t), "0.0.0.0"} {
		t.Run(bind, func(t *testing.T) {
			port := sshtest.FreePort(t)
			tg.Background(t, "-R", fmt.Sprintf("%s:%d:%s", bind, port, echo.Addr()))
			loop := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
			if got := sshtest.RoundTrip(t, "tcp", loop, "via loopback"); got != "echo:via loopback" {
				t.Fatalf("-R %s:%d answered %q on %s", bind, port, got, loop)
			}
			for _, l := range tcpListeners(t, port) {
				if !l.IsLoopback() {
					t.Errorf("-R %s:%d listens on %s, want loopback only", bind, port, l)
				}
			}
			if bind != "0.0.0.0" {
				c, err := net.DialTimeout("tcp", net.JoinHostPort(bind, strconv.Itoa(port)), 5*time.Second)
				if err == nil {
					c.Close()
					t.Errorf("-R %s:%d: %s:%d accepts connections, want only loopback", bind, port, bind, port)
				}
			}
		})
	}
}

// nonLoopbackIPv4 is an address of this machine that other hosts could
// reach, or a documentation address when it has none (then binding it would
// fail, which the test would see too).
func nonLoopbackIPv4(t *testing.T) string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
			return ipn.IP.String()
		}
	}
	return "192.0.2.1"
}

// tcpListeners lists the local addresses listening on port, from
// /proc/net/tcp and tcp6.
func tcpListeners(t *testing.T, port int) []net.IP {
	var out []net.IP
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 4 || f[3] != "0A" { // 0A: LISTEN
				continue
			}
			hexIP, hexPort, _ := strings.Cut(f[1], ":")
			p, _ := strconv.ParseUint(hexPort, 16, 16)
			if int(p) != port {
				continue
			}
			out = append(out, procNetIP(hexIP))
		}
	}
	if len(out) == 0 {
		t.Fatalf("nothing listens on port %d", port)
	}
	return out
}

// procNetIP decodes /proc/net/tcp's address: 32-bit words in host (little
// endian) order.
func procNetIP(h string) net.IP {
	ip := make(net.IP, len(h)/2)
	for i := 0; i+8 <= len(h); i += 8 {
		for j := 0; j < 4; j++ {
			b, _ := strconv.ParseUint(h[i+6-2*j:i+8-2*j], 16, 8)
			ip[i/2+j] = byte(b)
		}
	}
	return ip
}

// TestClientCloseFreesSessions: a client that drops its connection (no SSH
// disconnect, just a closed socket) has its sessions hung up and the
// connection freed promptly: processes gone, gauges at zero, no goroutine
// left.
func TestClientCloseFreesSessions(t *testing.T) {
	reg := metrics.NewRegistry()
	_, addr := startServer(t, sshd.Options{Logger: quietLogger(), Metrics: metrics.NewAgent(reg)})
	// Warm up: the first connection starts goroutines that stay (the
	// metrics handler, gliderlabs' listener).
	c := dialGo(t, addr)
	if out, err := mustSession(t, c).Output("true"); err != nil {
		t.Fatalf("warm-up: %q %v", out, err)
	}
	c.Close()
	waitIdle(t, reg)
	before := runtime.NumGoroutine()

	const clients = 5
	marker := fmt.Sprintf("sleep 4244.%d", os.Getpid())
	var conns []net.Conn
	for i := 0; i < clients; i++ {
		nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, nc)
		cc, chans, reqs, err := gossh.NewClientConn(nc, addr, &gossh.ClientConfig{
			User:            "test",
			HostKeyCallback: gossh.InsecureIgnoreHostKey(), // a throwaway test server
			Timeout:         10 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		client := gossh.NewClient(cc, chans, reqs)
		for j := 0; j < 2; j++ {
			sess := mustSession(t, client)
			if j == 1 {
				if err := sess.RequestPty("xterm", 24, 80, gossh.TerminalModes{}); err != nil {
					t.Fatal(err)
				}
			}
			if err := sess.Start(marker); err != nil {
				t.Fatal(err)
			}
		}
		// A forwarded connection too.
		if _, err := client.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(time.Minute)
	for len(sshtest.ProcessesMatching(marker)) < 2*clients {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d sessions started", len(sshtest.ProcessesMatching(marker)), 2*clients)
		}
		time.Sleep(50 * time.Millisecond)
	}

	closed := time.Now()
	for _, nc := range conns {
		nc.Close()
	}
	sshtest.WaitNoProcess(t, marker, 10*time.Second)
	waitIdle(t, reg)
	took := time.Since(closed)
	t.Logf("sessions hung up and connections freed %v after the clients closed", took.Round(time.Millisecond))
	// Prompt means at once; the bound allows for a loaded 2-core CI machine.
	if took > 5*time.Second {
		t.Errorf("freeing %d dropped connections took %v, want about a second at most", clients, took)
	}
	waitGoroutines(t, before, 10*time.Second)
}

func mustSession(t *testing.T, c *gossh.Client) *gossh.Session {
	t.Helper()
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func waitGoroutines(t *testing.T, want int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		n := runtime.NumGoroutine()
		if n <= want {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines left, %d before the clients connected\n%s", n, want, buf)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func dialGoErr(addr string) (*gossh.Client, error) {
	c, err := gossh.Dial("tcp", addr, &gossh.ClientConfig{
		User:            "test",
		HostKeyCallback: gossh.InsecureIgnoreHostKey(), // a throwaway test server
		Timeout:         30 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return c, nil
}

// quietLogger drops logs: tests with hundreds of sessions would bury the
// test log.
func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// TestWindowChangeBeforeStart: a window change between pty-req and the
// command is applied to the new terminal and does not stall the session
// (gliderlabs alone would block its request loop on it); a refused
// subsystem leaves the session usable for a command.
func TestWindowChangeBeforeStart(t *testing.T) {
	_, addr := startServer(t, sshd.Options{Shell: "/bin/sh"})
	client := dialGo(t, addr)
	defer client.Close()

	sess := mustSession(t, client)
	if err := sess.RequestPty("xterm", 24, 80, gossh.TerminalModes{}); err != nil {
		t.Fatal(err)
	}
	if err := sess.WindowChange(41, 101); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var out []byte
	var err error
	go func() {
		defer close(done)
		out, err = sess.Output("stty size")
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("session with an early window change never finished")
	}
	if err != nil || strings.TrimSpace(string(out)) != "41 101" {
		t.Fatalf("stty size after an early window change: %q %v, want \"41 101\"", out, err)
	}

	// sftp on a session that asked for a terminal: window changes must
	// not block the session's requests either.
	sess = mustSession(t, client)
	if err := sess.RequestPty("xterm", 24, 80, gossh.TerminalModes{}); err != nil {
		t.Fatal(err)
	}
	if err := sess.RequestSubsystem("sftp"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := sess.WindowChange(30+i, 90); err != nil {
			t.Fatal(err)
		}
	}
	replied := make(chan error, 1)
	go func() {
		_, err := sess.SendRequest("x-ping@example.com", true, nil)
		replied <- err
	}()
	select {
	case err := <-replied:
		if err != nil {
			t.Fatalf("request after window changes on an sftp session: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("an sftp session with a terminal stopped answering after window changes")
	}
	sess.Close()

	sess = mustSession(t, client)
	if err := sess.RequestSubsystem("no-such-subsystem"); err == nil {
		t.Fatal("unknown subsystem accepted")
	}
	if out, err := sess.Output("echo after-refusal"); err != nil || string(out) != "after-refusal\n" {
		t.Fatalf("exec after a refused subsystem: %q %v", out, err)
	}
}

// TestHangupKillsAfterGrace: when the client goes away, a session's process
// that ignores SIGHUP gets a grace period and is then killed.
func TestHangupKillsAfterGrace(t *testing.T) {
	_, addr := startServer(t, sshd.Options{Logger: quietLogger(), Shell: "/bin/sh"})
	client := dialGo(t, addr)
	defer client.Close()
	marker := fmt.Sprintf("sleep 4245.%d", os.Getpid())
	sess := mustSession(t, client)
	// An ignored signal stays ignored across exec.
	if err := sess.Start("trap '' HUP; exec " + marker); err != nil {
		t.Fatal(err)
	}
	sshtest.WaitProcess(t, marker, time.Minute)
	hungUp := time.Now()
	client.Close()

	time.Sleep(time.Second)
	if len(sshtest.ProcessesMatching(marker)) == 0 {
		t.Fatal("a process that ignores SIGHUP was gone a second after the hangup: it got no grace")
	}
	sshtest.WaitNoProcess(t, marker, 30*time.Second)
	t.Logf("killed %v after the hangup", time.Since(hungUp).Round(100*time.Millisecond))
}

// TestPTYOutputUntouched: what a program writes to its terminal reaches the
// client byte for byte; only the terminal's own settings translate newlines
// (gliderlabs' Session.Write would add a \r to every \n).
func TestPTYOutputUntouched(t *testing.T) {
	_, addr := startServer(t, sshd.Options{Shell: "/bin/sh"})
	client := dialGo(t, addr)
	defer client.Close()
	sess := mustSession(t, client)
	if err := sess.RequestPty("xterm", 24, 80, gossh.TerminalModes{}); err != nil {
		t.Fatal(err)
	}
	out, err := sess.Output(`stty -onlcr; printf 'a\nb\r\r\nc\n'`)
	if err != nil {
		t.Fatalf("raw output over a PTY: %v", err)
	}
	if want := "a\nb\r\r\nc\n"; string(out) != want {
		t.Fatalf("PTY output %q, want %q", out, want)
	}
}

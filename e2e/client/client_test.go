// Package client_test runs the real agent binary's laptop-side commands
// against coordinators that cannot be reached: a closed port, an address
// whose packets vanish (in a network namespace), and a coordinator that
// comes up late. Every one-shot command must give up on time with one line
// saying what it waited for, where, and why; the ProxyCommand bridge must
// end with its OpenSSH client.
package client_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/syncbuf"
	"github.com/agentd/agent/internal/testkit/agentbin"
)

// agentBinary is the real binary these tests run, built once.
var agentBinary agentbin.Builder

func buildAgent(t *testing.T) string { return agentBinary.Path(t) }

func TestMain(m *testing.M) {
	// Sessions run /bin/sh, not root's login shell: bash reads ~/.bashrc
	// for commands run by an SSH server, and a machine whose .bashrc does
	// real work (pyenv init here: its rehash lock held concurrent sessions
	// for 60 s) would decide these tests' timing.
	os.Setenv("AGENT_SHELL", "/bin/sh")
	code := m.Run()
	agentBinary.Remove()
	os.Exit(code)
}

// closedPort is a loopback port nobody listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

func clientEnv(t *testing.T, url string) []string {
	return []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"), "AGENT_URL=" + url, "AGENT_TOKEN=usr_" + strings.Repeat("x", 43)}
}

// giveUpSlack is how much later than --timeout a command may end on a
// loaded 2-core machine.
const giveUpSlack = 8 * time.Second

// wantOneLineGiveUp runs one command with --timeout 2s and checks that it
// ends in time, exits 1, and says in one line what it waited for, where,
// and the last cause.
func wantOneLineGiveUp(t *testing.T, run func(args ...string) *exec.Cmd, url string, cause string, args ...string) {
	t.Helper()
	cmd := run(append(args, "--timeout", "2s")...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if strings.Contains(strings.Join(args, " "), "--stdio") {
		// An open stdin that says nothing: ssh --stdio must wait for the
		// timeout, not for EOF.
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pw.Close()
		defer pr.Close()
		cmd.Stdin = pr
	}
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	var ee *exec.ExitError
	if !errorsAs(err, &ee) || ee.ExitCode() != 1 {
		t.Errorf("agent %s: want exit status 1, got %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	if took < 2*time.Second || took > 2*time.Second+giveUpSlack {
		t.Errorf("agent %s: ended after %v, want about 2s", strings.Join(args, " "), took)
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if len(lines) != 1 {
		t.Errorf("agent %s: want one line on stderr, got %d:\n%s", strings.Join(args, " "), len(lines), stderr.String())
	}
	for _, want := range []string{"waiting for the coordinator at " + url, "gave up after 2s (--timeout)", cause} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("agent %s: stderr lacks %q:\n%s", strings.Join(args, " "), want, stderr.String())
		}
	}
	if stdout.Len() != 0 {
		t.Errorf("agent %s: wrote to stdout: %q", strings.Join(args, " "), stdout.String())
	}
}

func errorsAs(err error, target **exec.ExitError) bool {
	e, ok := err.(*exec.ExitError)
	if ok {
		*target = e
	}
	return ok
}

var oneShot = [][]string{
	{"ping", "ws1"},
	{"ports", "ws1"},
	{"ssh", "ws1"},
	{"ssh", "ws1", "--stdio"},
}

func TestOneShotCommandsGiveUpOnAClosedPort(t *testing.T) {
	bin := buildAgent(t)
	url := fmt.Sprintf("https://127.0.0.1:%d", closedPort(t))
	env := clientEnv(t, url)
	run := func(args ...string) *exec.Cmd {
		cmd := exec.Command(bin, args...)
		cmd.Env = env
		return cmd
	}
	everyOneShotGivesUp(t, run, url, "last error: dial tcp 127.0.0.1:")
}

func TestOneShotCommandsGiveUpOnABlackholedAddress(t *testing.T) {
	lab := netlab.New(t)
	bin := buildAgent(t)
	in := lab.Internet()
	laptop := in.Host("laptop", "203.0.113.10")
	// The coordinator's address is routed to the internet, which drops
	// its packets without a word: the TCP handshake never completes.
	in.NS.Nft(`table inet blackhole {
	chain pre {
		type filter hook prerouting priority 0;
		ip daddr 198.51.100.7 drop
	}
}`)
	url := "https://198.51.100.7:8443"
	env := clientEnv(t, url)
	run := func(args ...string) *exec.Cmd {
		cmd := laptop.Command(bin, args...)
		cmd.Env = env
		return cmd
	}
	everyOneShotGivesUp(t, run, url, "no answer yet")
}

// everyOneShotGivesUp runs each one-shot command at once and checks that
// each gives up with one line naming url and cause.
func everyOneShotGivesUp(t *testing.T, run func(args ...string) *exec.Cmd, url, cause string) {
	var wg sync.WaitGroup
	for _, args := range oneShot {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wantOneLineGiveUp(t, run, url, cause, args...)
		}()
	}
	wg.Wait()
}

// exited waits up to d for pid to be gone (or a zombie nobody reaps); d 0
// looks once.
func exited(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		// The state follows the command name in parentheses.
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && len(stat) > i+2 && (stat[i+2] == 'Z' || stat[i+2] == 'X') {
			return true
		}
		if !time.Now().Before(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// OpenSSH gives up (ConnectTimeout, Ctrl-C) and closes the ProxyCommand's
// standard input while the bridge is still connecting: the bridge ends
// with it, after reading what OpenSSH had sent.
func TestStdioEndsWhenStdinCloses(t *testing.T) {
	bin := buildAgent(t)
	url := fmt.Sprintf("https://127.0.0.1:%d", closedPort(t))
	cmd := exec.Command(bin, "ssh", "--stdio", "ws1", "--timeout", "0")
	cmd.Env = clientEnv(t, url)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr syncbuf.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	io.WriteString(stdin, "SSH-2.0-OpenSSH_9.2p1\r\n")
	time.Sleep(1500 * time.Millisecond) // a few failed dials
	closed := time.Now()
	stdin.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Logf("exited %v after stdin closed: %v: %s", time.Since(closed).Round(time.Millisecond), err, stderr.String())
		if !strings.Contains(stderr.String(), "OpenSSH closed standard input") {
			t.Errorf("want the reason on stderr, got %q", stderr.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("agent ssh --stdio still runs 5 s after its stdin closed:\n%s", stderr.String())
	}
}

// OpenSSH is killed (SIGKILL: no chance to close anything) while its
// ProxyCommand still holds an open stdin: the bridge ends with its parent
// instead of living on under init.
func TestStdioEndsWhenItsParentDies(t *testing.T) {
	bin := buildAgent(t)
	for _, phase := range []string{"connecting"} {
		t.Run(phase, func(t *testing.T) {
			url := fmt.Sprintf("https://127.0.0.1:%d", closedPort(t))
			// The shell plays OpenSSH: it starts the bridge with its own
			// stdin (a pipe this test keeps open; an asynchronous command's
			// stdin would be /dev/null without fd 3), prints its PID and
			// waits.
			parent := exec.Command("sh", "-c", `exec 3<&0; "$0" ssh --stdio ws1 --timeout 0 <&3 & echo $!; wait`, bin)
			parent.Env = clientEnv(t, url)
			// Not StdinPipe: Wait would close it, and the bridge would end on
			// EOF rather than on its parent's death.
			stdinR, stdin, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer stdin.Close()
			parent.Stdin = stdinR
			out, err := parent.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := parent.Start(); err != nil {
				t.Fatal(err)
			}
			stdinR.Close()
			var line [32]byte
			n, _ := out.Read(line[:])
			pid, err := strconv.Atoi(strings.TrimSpace(string(line[:n])))
			if err != nil {
				parent.Process.Kill()
				t.Fatalf("the shell did not print the bridge's PID: %q", line[:n])
			}
			defer syscall.Kill(pid, syscall.SIGKILL)
			time.Sleep(1500 * time.Millisecond)
			if exited(pid, 0) {
				t.Fatal("the bridge ended before its parent")
			}
			parent.Process.Kill()
			parent.Wait()
			killed := time.Now()
			if !exited(pid, 5*time.Second) {
				t.Fatalf("agent ssh --stdio (pid %d) still runs 5 s after its parent was killed", pid)
			}
			t.Logf("the bridge ended %v after its parent", time.Since(killed).Round(time.Millisecond))
		})
	}
}

// port-forward keeps trying a coordinator that is down, says so once, and
// says once when it answers.
func TestPortForwardSaysOnceWhileTheCoordinatorIsDown(t *testing.T) {
	bin := buildAgent(t)
	port := closedPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	url := "http://" + addr
	dataDir := t.TempDir()
	admin := func(args ...string) []byte {
		t.Helper()
		out, err := exec.Command(bin, append([]string{"admin", "--data-dir", dataDir}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("agent admin %v: %v\n%s", args, err, out)
		}
		return out
	}
	admin("user", "create", "alice")
	admin("agent", "create", "ws1", "--owner", "alice")
	var tok struct {
		Secret string `json:"secret"`
	}
	if err := json.Unmarshal(admin("--json", "token", "create", "--user", "alice"), &tok); err != nil {
		t.Fatal(err)
	}

	fwd := exec.Command(bin, "port-forward", "ws1", "0:8080")
	fwd.Env = append(clientEnv(t, url), "AGENT_TOKEN="+tok.Secret, "AGENT_INSECURE_HTTP=1")
	var stderr syncbuf.Buffer
	fwd.Stderr, fwd.Stdout = &stderr, &stderr
	if err := fwd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { fwd.Process.Kill(); fwd.Wait() }()
	time.Sleep(4 * time.Second) // several attempts (backoff from 0.5 s)
	if n := strings.Count(stderr.String(), "cannot reach the coordinator at "+url); n != 1 {
		t.Fatalf("want the outage said once, said %d times:\n%s", n, stderr.String())
	}

	coord := exec.Command(bin, "coordinator", "--data-dir", dataDir, "--listen", addr, "--insecure-http", "--stun-addr", "off", "--metrics-addr", "")
	var coordOut syncbuf.Buffer
	coord.Stdout, coord.Stderr = &coordOut, &coordOut
	if err := coord.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { coord.Process.Signal(os.Interrupt); coord.Wait() }()
	deadline := time.Now().Add(45 * time.Second)
	for !strings.Contains(stderr.String(), "reached the coordinator at "+url) {
		if time.Now().After(deadline) {
			t.Fatalf("port-forward did not say it reached the coordinator:\n%s\ncoordinator:\n%s", stderr.String(), coordOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if strings.Contains(stderr.String(), "level=") {
		t.Errorf("log records on stderr without --verbose:\n%s", stderr.String())
	}
	t.Logf("port-forward said:\n%s", stderr.String())
}

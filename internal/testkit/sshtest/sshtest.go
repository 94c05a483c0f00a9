// Package sshtest runs real OpenSSH clients (ssh, scp, sftp, rsync, git,
// ssh-agent, tmux for a terminal) against an SSH server and checks every
// feature the workspace's server promises. The target may be a plain
// host:port or anything reachable through a ProxyCommand, so the same set
// runs against the server on loopback and through `agent ssh --stdio`.
//
// The server must share the test's file system and process table (it runs
// on this machine), because results are checked on both sides directly.
package sshtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Target says how the OpenSSH clients reach the server under test.
type Target struct {
	// Host is the host argument for ssh, e.g. "127.0.0.1" or "ws1.agent".
	Host string
	// Options are extra ssh_config options, each "Key=Value", e.g.
	// "Port=2222" or "ProxyCommand=/path/agent ssh --stdio %h".
	Options []string
	// Dial, if set, opens a raw connection to the server for the checks that
	// need a protocol-level client (unknown channel types and requests).
	Dial func(ctx context.Context) (net.Conn, error)
	// BigFileSize is the size of the file copied by scp, sftp and rsync;
	// zero means 256 MiB.
	BigFileSize int64
	// MOTD, if set, is text the interactive login must show.
	MOTD string
	// WorkspaceListen and WorkspaceDial open sockets where the server runs,
	// for the forwarding checks, when that is another network namespace
	// than the test's. Default: this process's own (net.Listen, net.Dial).
	WorkspaceListen func(network, address string) (net.Listener, error)
	WorkspaceDial   func(ctx context.Context, network, address string) (net.Conn, error)
}

// RequireTools skips the test when an OpenSSH client tool is missing.
func RequireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (Debian: apt-get install openssh-client rsync tmux git)", tool)
		}
	}
}

// SSHArgs are the command-line options every client gets: no user config,
// no host key pinning (these servers are throwaway), batch mode.
func (tg Target) SSHArgs() []string {
	args := []string{
		"-F", "/dev/null",
		"-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR",
		"-o", "BatchMode=yes",
		"-o", "ConnectTimeout=20",
	}
	for _, o := range tg.Options {
		args = append(args, "-o", o)
	}
	return args
}

// SSHCommand is the ssh invocation as one shell-quoted string, for
// rsync -e and GIT_SSH_COMMAND.
func (tg Target) SSHCommand() string {
	parts := []string{"ssh"}
	for _, a := range tg.SSHArgs() {
		parts = append(parts, ShellQuote(a))
	}
	return strings.Join(parts, " ")
}

// ShellQuote quotes s for a POSIX shell.
func ShellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,%@+", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Result is one finished client run.
type Result struct {
	Stdout, Stderr string
	Code           int
}

// SSH runs ssh with extra client arguments (before the host) and a remote
// command, feeding stdin.
func (tg Target) SSH(t testing.TB, stdin io.Reader, clientArgs []string, command string) Result {
	t.Helper()
	args := append(tg.SSHArgs(), clientArgs...)
	args = append(args, tg.Host)
	if command != "" {
		args = append(args, command)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ssh", args...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	res := Result{Stdout: out.String(), Stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		res.Code = ee.ExitCode()
	default:
		t.Fatalf("run ssh: %v", err)
	}
	return res
}

// Run runs any local command and fails the test if it does not succeed.
func Run(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// RunAll runs the whole client matrix as subtests.
func RunAll(t *testing.T, tg Target) {
	RequireTools(t, "ssh")
	t.Run("Exec", func(t *testing.T) { Exec(t, tg) })
	t.Run("CommandNotFound", func(t *testing.T) { CommandNotFound(t, tg) })
	t.Run("StdinEOF", func(t *testing.T) { StdinEOF(t, tg) })
	t.Run("ExitSignal", func(t *testing.T) { ExitSignal(t, tg) })
	t.Run("Env", func(t *testing.T) { Env(t, tg) })
	t.Run("Terminal", func(t *testing.T) { Terminal(t, tg) })
	t.Run("LocalForward", func(t *testing.T) { LocalForward(t, tg) })
	t.Run("RemoteForward", func(t *testing.T) { RemoteForward(t, tg) })
	t.Run("StreamLocal", func(t *testing.T) { StreamLocal(t, tg) })
	t.Run("AgentForwarding", func(t *testing.T) { AgentForwarding(t, tg) })
	t.Run("Git", func(t *testing.T) { Git(t, tg) })
	t.Run("FileTransfer", func(t *testing.T) { FileTransfer(t, tg) })
	t.Run("ControlMaster", func(t *testing.T) { ControlMaster(t, tg) })
	t.Run("KilledClient", func(t *testing.T) { KilledClient(t, tg) })
	t.Run("DisconnectMidTransfer", func(t *testing.T) { DisconnectMidTransfer(t, tg) })
	t.Run("UnknownRequests", func(t *testing.T) { UnknownRequests(t, tg) })
}

// Exec: exit status passes through and stderr stays apart from stdout.
func Exec(t *testing.T, tg Target) {
	r := tg.SSH(t, nil, nil, "echo to-stdout; echo to-stderr >&2; exit 42")
	if r.Code != 42 || r.Stdout != "to-stdout\n" || r.Stderr != "to-stderr\n" {
		t.Fatalf("exec: code %d stdout %q stderr %q; want 42, \"to-stdout\\n\", \"to-stderr\\n\"", r.Code, r.Stdout, r.Stderr)
	}
	r = tg.SSH(t, nil, nil, "true")
	if r.Code != 0 {
		t.Fatalf("true exited %d: %s", r.Code, r.Stderr)
	}
}

// CommandNotFound: exit status 127 and a message on stderr.
func CommandNotFound(t *testing.T, tg Target) {
	r := tg.SSH(t, nil, nil, "no-such-command-xyzzy")
	if r.Code != 127 || !strings.Contains(r.Stderr, "no-such-command-xyzzy") || !strings.Contains(r.Stderr, "not found") {
		t.Fatalf("missing command: code %d stderr %q; want 127 and a \"not found\" message", r.Code, r.Stderr)
	}
}

// StdinEOF: the end of the client's stdin reaches the command as EOF.
func StdinEOF(t *testing.T, tg Target) {
	r := tg.SSH(t, strings.NewReader("line one\nline two\n"), nil, "wc -l; echo after-eof")
	if r.Code != 0 || strings.Fields(r.Stdout)[0] != "2" || !strings.Contains(r.Stdout, "after-eof") {
		t.Fatalf("stdin EOF: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
	}
}

// ExitSignal: a command killed by a signal is reported as such; OpenSSH's
// client exits 255 for that.
func ExitSignal(t *testing.T, tg Target) {
	r := tg.SSH(t, nil, []string{"-o", "LogLevel=INFO"}, "kill -TERM $$")
	if r.Code != 255 {
		t.Fatalf("killed command: ssh exited %d (stderr %q), want 255 for exit-signal", r.Code, r.Stderr)
	}
}

// Env: SetEnv and SendEnv reach the session; the agent's own settings do not.
func Env(t *testing.T, tg Target) {
	cmd := `printf '%s|%s|' "$SSHTEST_SET" "$LC_SSHTEST_SENT"; env | grep -c '^AGENT_' || true`
	args := []string{"-o", "SetEnv=SSHTEST_SET=set-value", "-o", "SendEnv=LC_SSHTEST_SENT"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	full := append(append(tg.SSHArgs(), args...), tg.Host, cmd)
	c := exec.CommandContext(ctx, "ssh", full...)
	c.Env = append(os.Environ(), "LC_SSHTEST_SENT=sent value")
	out, err := c.Output()
	if err != nil {
		t.Fatalf("ssh with env: %v", err)
	}
	if got, want := strings.TrimSpace(string(out)), "set-value|sent value|0"; got != want {
		t.Fatalf("environment: got %q, want %q (SetEnv|SendEnv|count of AGENT_* variables)", got, want)
	}
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// EchoServer serves network/address, answering each connection with
// "echo:" followed by what it read, until the peer half-closes.
func EchoServer(t testing.TB, network, address string) net.Listener {
	t.Helper()
	return echoServerOn(t, net.Listen, network, address)
}

func echoServerOn(t testing.TB, listen func(network, address string) (net.Listener, error), network, address string) net.Listener {
	t.Helper()
	ln, err := listen(network, address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				data, _ := io.ReadAll(c)
				_, _ = c.Write(append([]byte("echo:"), data...))
			}()
		}
	}()
	return ln
}

// RoundTrip connects to network/address (retrying while the forward comes
// up), sends msg, half-closes and returns the answer.
func RoundTrip(t testing.TB, network, address, msg string) string {
	t.Helper()
	return roundTripVia(t, nil, network, address, msg)
}

func roundTripVia(t testing.TB, dial func(ctx context.Context, network, address string) (net.Conn, error), network, address, msg string) string {
	t.Helper()
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := dial(ctx, network, address)
		cancel()
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			_, werr := c.Write([]byte(msg))
			if werr == nil {
				switch cc := c.(type) {
				case *net.TCPConn:
					_ = cc.CloseWrite()
				case *net.UnixConn:
					_ = cc.CloseWrite()
				}
				got, rerr := io.ReadAll(c)
				c.Close()
				if rerr == nil && len(got) > 0 {
					return string(got)
				}
			} else {
				c.Close()
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer through %s %s: last error %v", network, address, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Background starts a long-running ssh (a forward) and stops it at cleanup.
func (tg Target) Background(t testing.TB, clientArgs ...string) *exec.Cmd {
	t.Helper()
	args := append(append(tg.SSHArgs(), "-N", "-o", "ExitOnForwardFailure=yes"), clientArgs...)
	args = append(args, tg.Host)
	cmd := exec.Command("ssh", args...)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() && errb.Len() > 0 {
			t.Logf("ssh %v stderr: %s", clientArgs, errb.String())
		}
	})
	return cmd
}

// LocalForward: ssh -L carries data to a TCP service next to the server.
func LocalForward(t *testing.T, tg Target) {
	listen := tg.WorkspaceListen
	if listen == nil {
		listen = net.Listen
	}
	echo := echoServerOn(t, listen, "tcp", "127.0.0.1:0")
	lport := FreePort(t)
	tg.Background(t, "-L", fmt.Sprintf("127.0.0.1:%d:%s", lport, echo.Addr()))
	msg := strings.Repeat("local-forward ", 10000)
	if got := RoundTrip(t, "tcp", fmt.Sprintf("127.0.0.1:%d", lport), msg); got != "echo:"+msg {
		t.Fatalf("-L answer has %d bytes, want %d", len(got), len(msg)+5)
	}
}

// RemoteForward: ssh -R opens a port on the server side that reaches a
// service next to the client.
func RemoteForward(t *testing.T, tg Target) {
	echo := EchoServer(t, "tcp", "127.0.0.1:0")
	rport := FreePort(t)
	tg.Background(t, "-R", fmt.Sprintf("127.0.0.1:%d:%s", rport, echo.Addr()))
	msg := strings.Repeat("remote-forward ", 10000)
	if got := roundTripVia(t, tg.WorkspaceDial, "tcp", fmt.Sprintf("127.0.0.1:%d", rport), msg); got != "echo:"+msg {
		t.Fatalf("-R answer has %d bytes, want %d", len(got), len(msg)+5)
	}
}

// StreamLocal: Unix socket forwarding in both directions.
func StreamLocal(t *testing.T, tg Target) {
	dir := shortTempDir(t)
	remoteSock := filepath.Join(dir, "remote.sock")
	EchoServer(t, "unix", remoteSock)
	localSock := filepath.Join(dir, "local.sock")
	tg.Background(t, "-L", localSock+":"+remoteSock)
	if got := RoundTrip(t, "unix", localSock, "via -L socket"); got != "echo:via -L socket" {
		t.Fatalf("-L unix socket: got %q", got)
	}

	echo := EchoServer(t, "tcp", "127.0.0.1:0")
	fwdSock := filepath.Join(dir, "reverse.sock")
	tg.Background(t, "-R", fwdSock+":"+echo.Addr().String())
	if got := RoundTrip(t, "unix", fwdSock, "via -R socket"); got != "echo:via -R socket" {
		t.Fatalf("-R unix socket: got %q", got)
	}
}

// shortTempDir is a temporary directory with a short path: Unix socket
// paths are limited to 108 bytes and t.TempDir() names are long.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sshtest")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// AgentForwarding: ssh -A gives the session an SSH_AUTH_SOCK through which
// ssh-add lists the client's key.
func AgentForwarding(t *testing.T, tg Target) {
	RequireTools(t, "ssh-agent", "ssh-add", "ssh-keygen")
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "agent.sock")
	agent := exec.Command("ssh-agent", "-D", "-a", sock)
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = agent.Process.Kill(); _ = agent.Wait() })
	key := filepath.Join(dir, "id_ed25519")
	Run(t, nil, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshtest-key", "-f", key)
	env := []string{"SSH_AUTH_SOCK=" + sock}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	Run(t, env, "ssh-add", key)
	fp := strings.Fields(Run(t, nil, "ssh-keygen", "-l", "-f", key+".pub"))[1]

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := append(append(tg.SSHArgs(), "-A"), tg.Host, `echo "sock=$SSH_AUTH_SOCK"; ssh-add -l`)
	c := exec.CommandContext(ctx, "ssh", args...)
	c.Env = append(os.Environ(), env...)
	out, err := c.CombinedOutput()
	if err != nil || !strings.Contains(string(out), fp) {
		t.Fatalf("ssh -A ... ssh-add -l: %v\n%s\nwant fingerprint %s", err, out, fp)
	}
	// Without -A the session has no agent.
	r := tg.SSH(t, nil, []string{"-o", "ForwardAgent=no"}, `echo "sock=$SSH_AUTH_SOCK"`)
	if strings.TrimSpace(r.Stdout) != "sock=" {
		t.Fatalf("without -A the session still has an agent: %q", r.Stdout)
	}
}

// Git: clone and push over ssh:// (git-upload-pack / git-receive-pack over exec).
func Git(t *testing.T, tg Target) {
	RequireTools(t, "git")
	dir := t.TempDir()
	bare := filepath.Join(dir, "remote.git")
	gitEnv := []string{"GIT_SSH_COMMAND=" + tg.SSHCommand(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com",
		"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com", "GIT_CONFIG_NOSYSTEM=1", "HOME=" + dir}
	Run(t, gitEnv, "git", "init", "-q", "--bare", "-b", "main", bare)
	work := filepath.Join(dir, "work")
	Run(t, gitEnv, "git", "init", "-q", "-b", "main", work)
	if err := os.WriteFile(filepath.Join(work, "README"), []byte("hello over ssh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	Run(t, gitEnv, "git", "-C", work, "add", "README")
	Run(t, gitEnv, "git", "-C", work, "commit", "-q", "-m", "first")
	url := "ssh://" + tg.Host + bare
	Run(t, gitEnv, "git", "-C", work, "push", "-q", url, "main")
	clone := filepath.Join(dir, "clone")
	Run(t, gitEnv, "git", "clone", "-q", url, clone)
	got, err := os.ReadFile(filepath.Join(clone, "README"))
	if err != nil || string(got) != "hello over ssh\n" {
		t.Fatalf("cloned README: %q, %v", got, err)
	}
}

// MakeFile writes size pseudo-random bytes (incompressible, fast to make)
// and returns the path and SHA-256.
func MakeFile(t testing.TB, dir string, size int64) (string, string) {
	t.Helper()
	path := filepath.Join(dir, "big.bin")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	block := make([]byte, 1<<20)
	var x uint64 = 0x9E3779B97F4A7C15
	for written := int64(0); written < size; {
		for i := 0; i+8 <= len(block); i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			for j := 0; j < 8; j++ {
				block[i+j] = byte(x >> (8 * j))
			}
		}
		n := int64(len(block))
		if size-written < n {
			n = size - written
		}
		if _, err := f.Write(block[:n]); err != nil {
			t.Fatal(err)
		}
		h.Write(block[:n])
		written += n
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path, hex.EncodeToString(h.Sum(nil))
}

// FileSHA256 hashes a file.
func FileSHA256(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// FileTransfer: a large file goes up and comes back intact with scp (SFTP
// mode and legacy -O mode), sftp and rsync.
func FileTransfer(t *testing.T, tg Target) {
	RequireTools(t, "scp", "sftp", "rsync")
	size := tg.BigFileSize
	if size == 0 {
		size = 256 << 20
	}
	dir := t.TempDir()
	src, sum := MakeFile(t, dir, size)
	remote := filepath.Join(dir, "remote")
	if err := os.Mkdir(remote, 0o755); err != nil {
		t.Fatal(err)
	}
	check := func(tool, path string) {
		t.Helper()
		if got := FileSHA256(t, path); got != sum {
			t.Fatalf("%s: %s has SHA-256 %s, want %s", tool, path, got, sum)
		}
		os.Remove(path)
	}
	host := tg.Host
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	scpArgs := func(extra ...string) []string { return append(append(tg.SSHArgs(), "-q"), extra...) }

	for _, mode := range []struct{ name, flag string }{{"scp", "-s"}, {"scp -O", "-O"}} {
		up := filepath.Join(remote, "up.bin")
		Run(t, nil, "scp", scpArgs(mode.flag, src, host+":"+up)...)
		check(mode.name+" upload", up)
		Run(t, nil, "cp", src, up)
		down := filepath.Join(dir, "down.bin")
		Run(t, nil, "scp", scpArgs(mode.flag, host+":"+up, down)...)
		check(mode.name+" download", down)
		os.Remove(up)
	}

	batch := filepath.Join(dir, "batch")
	up := filepath.Join(remote, "sftp-up.bin")
	down := filepath.Join(dir, "sftp-down.bin")
	if err := os.WriteFile(batch, []byte(fmt.Sprintf("put %s %s\nget %s %s\n", src, up, up, down)), 0o644); err != nil {
		t.Fatal(err)
	}
	Run(t, nil, "sftp", append(tg.SSHArgs(), "-q", "-b", batch, tg.Host)...)
	check("sftp put", up)
	check("sftp get", down)

	rsh := tg.SSHCommand()
	up = filepath.Join(remote, "rsync-up.bin")
	Run(t, nil, "rsync", "-e", rsh, "--whole-file", src, host+":"+up)
	down = filepath.Join(dir, "rsync-down.bin")
	Run(t, nil, "rsync", "-e", rsh, "--whole-file", host+":"+up, down)
	check("rsync upload", up)
	check("rsync download", down)
}

// ProcessesMatching lists PIDs whose command line contains marker, leaving
// out OpenSSH clients: their command line carries the remote command, and
// only the processes the server started count.
func ProcessesMatching(marker string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if !bytes.Contains(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}), []byte(marker)) {
			continue
		}
		if comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm")); err == nil && strings.TrimSpace(string(comm)) == "ssh" {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// WaitNoProcess waits until no process (other than ssh clients) carries
// marker, failing after timeout. Give it a generous timeout: it returns as
// soon as the processes are gone.
func WaitNoProcess(t testing.TB, marker string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		pids := ProcessesMatching(marker)
		if len(pids) == 0 {
			return
		}
		if time.Now().After(deadline) {
			var desc []string
			for _, p := range pids {
				stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
				desc = append(desc, strings.TrimSpace(string(stat)))
			}
			t.Fatalf("processes still running %v after the client went away:\n%s", timeout, strings.Join(desc, "\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// WaitProcess waits until a process carrying marker exists.
func WaitProcess(t testing.TB, marker string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for len(ProcessesMatching(marker)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no process %q started within %v", marker, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// KilledClient: when the client dies, the session's processes go too, with
// and without a PTY, including a background job of the session.
func KilledClient(t *testing.T, tg Target) {
	for _, tc := range []struct {
		name string
		args []string
	}{{"exec", nil}, {"pty", []string{"-tt"}}} {
		t.Run(tc.name, func(t *testing.T) {
			marker := fmt.Sprintf("%d.%d", 100000+time.Now().UnixNano()%100000, os.Getpid())
			args := append(append(tg.SSHArgs(), tc.args...), tg.Host,
				fmt.Sprintf("sleep 3%s & sleep 2%s; echo never", marker, marker))
			cmd := exec.Command("ssh", args...)
			cmd.Stdin = nil
			// The client must not own the processes: give it its own group.
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			defer func() { _ = cmd.Process.Kill(); <-done }()
			WaitProcess(t, "sleep 2"+marker, time.Minute)
			WaitProcess(t, "sleep 3"+marker, time.Minute)
			_ = cmd.Process.Kill()
			<-done
			WaitNoProcess(t, marker, time.Minute)
		})
	}
}

// DisconnectMidTransfer: a client that goes away during an upload and a
// download leaves a healthy server and no process behind. The client is
// killed once the transfer has moved a mebibyte, so the remote command is
// certainly running and data is in flight both ways.
func DisconnectMidTransfer(t *testing.T, tg Target) {
	dir := t.TempDir()
	for _, dirn := range []string{"upload", "download"} {
		t.Run(dirn, func(t *testing.T) {
			marker := fmt.Sprintf("mid-%s-%d", dirn, time.Now().UnixNano())
			var remote string
			var stdin io.Reader
			var received countingWriter
			var moved func() int64
			if dirn == "upload" {
				path := filepath.Join(dir, marker)
				remote = "cat > " + path
				stdin = endless{}
				moved = func() int64 {
					fi, err := os.Stat(path)
					if err != nil {
						return 0
					}
					return fi.Size()
				}
			} else {
				// cat never gets to the second (missing) file; it only
				// puts the marker on the remote process's command line.
				remote = "cat /dev/zero " + filepath.Join(dir, marker)
				moved = received.Load
			}
			cmd := exec.Command("ssh", append(tg.SSHArgs(), tg.Host, remote)...)
			cmd.Stdin = stdin
			cmd.Stdout = &received
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			defer func() { _ = cmd.Process.Kill(); <-done }()
			WaitProcess(t, marker, time.Minute)
			deadline := time.Now().Add(time.Minute)
			for moved() < 1<<20 {
				if time.Now().After(deadline) {
					t.Fatalf("the %s moved only %d bytes in a minute", dirn, moved())
				}
				time.Sleep(20 * time.Millisecond)
			}
			_ = cmd.Process.Kill()
			<-done
			WaitNoProcess(t, marker, time.Minute)
			if r := tg.SSH(t, nil, nil, "echo still-serving"); r.Stdout != "still-serving\n" {
				t.Fatalf("after a dropped transfer: %+v", r)
			}
		})
	}
}

// countingWriter drops what it gets and counts it.
type countingWriter struct{ n atomic.Int64 }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	return len(p), nil
}

func (w *countingWriter) Load() int64 { return w.n.Load() }

// endless is an infinite stdin.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'x'
	}
	return len(p), nil
}

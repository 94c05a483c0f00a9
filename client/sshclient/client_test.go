package sshclient_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/client/sshclient"
	"github.com/agentd/agent/internal/syncbuf"
	"github.com/agentd/agent/internal/testkit/sshtest"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

// TestMain doubles as a ProxyCommand: "sshclient.test proxy-helper ADDR"
// dials ADDR and runs ProxyStdio on stdin/stdout, the way
// `agent ssh --stdio` does over the tailnet. The connection is passed on as
// the tailnet's are: without the kernel socket's ReadFrom/WriteTo, so
// copies to stdout are plain writes (no splice), as in the real command.
func TestMain(m *testing.M) {
	if len(os.Args) == 3 && os.Args[1] == "proxy-helper" {
		conn, err := net.Dial("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, "proxy-helper:", err)
			os.Exit(1)
		}
		tcp := conn.(*net.TCPConn)
		// A small receive buffer, so that the kernel cannot absorb what
		// the server sends on the proxy's behalf.
		_ = tcp.SetReadBuffer(64 << 10)
		// Interrupted like the agent command: SIGINT cancels the context.
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
		defer stop()
		if err := sshclient.ProxyStdio(ctx, userspaceConn{tcp}, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "proxy-helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if len(os.Args) == 3 && os.Args[1] == "interactive-helper" {
		// An interactive session on this process's terminal, as
		// `agent ssh WS` runs it.
		conn, err := net.Dial("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, "interactive-helper:", err)
			os.Exit(1)
		}
		code, err := sshclient.RunInteractive(context.Background(), conn, sshclient.InteractiveOptions{})
		fmt.Printf("helper done: code %d, err %v\n", code, err)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// userspaceConn has the method set of a tailnet (gVisor) TCP connection:
// net.Conn plus CloseWrite.
type userspaceConn struct{ tcp *net.TCPConn }

func (c userspaceConn) Read(p []byte) (int, error)         { return c.tcp.Read(p) }
func (c userspaceConn) Write(p []byte) (int, error)        { return c.tcp.Write(p) }
func (c userspaceConn) Close() error                       { return c.tcp.Close() }
func (c userspaceConn) CloseWrite() error                  { return c.tcp.CloseWrite() }
func (c userspaceConn) LocalAddr() net.Addr                { return c.tcp.LocalAddr() }
func (c userspaceConn) RemoteAddr() net.Addr               { return c.tcp.RemoteAddr() }
func (c userspaceConn) SetDeadline(t time.Time) error      { return c.tcp.SetDeadline(t) }
func (c userspaceConn) SetReadDeadline(t time.Time) error  { return c.tcp.SetReadDeadline(t) }
func (c userspaceConn) SetWriteDeadline(t time.Time) error { return c.tcp.SetWriteDeadline(t) }

func startServer(t testing.TB) string {
	t.Helper()
	_, addr := startSSHD(t)
	return addr
}

// startSSHD runs the agent's SSH server on loopback until the test ends.
func startSSHD(t testing.TB) (*sshd.Server, string) {
	t.Helper()
	srv, err := sshd.New(sshd.Options{
		Logger:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		HostKeyPath: filepath.Join(t.TempDir(), "host_key"),
		Shell:       "/bin/sh", // not root's bash: its ~/.bashrc here runs pyenv init
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(context.Background(), ln) }()
	t.Cleanup(func() { srv.Close() })
	return srv, ln.Addr().String()
}

func dial(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRunCommand(t *testing.T) {
	addr := startServer(t)
	var out, errb bytes.Buffer
	code, err := sshclient.RunCommand(context.Background(), dial(t, addr), "cat; echo oops >&2; exit 9",
		strings.NewReader("from stdin\n"), &out, &errb)
	if err != nil || code != 9 || out.String() != "from stdin\n" || errb.String() != "oops\n" {
		t.Fatalf("RunCommand: code %d err %v stdout %q stderr %q", code, err, out.String(), errb.String())
	}
	code, err = sshclient.RunCommand(context.Background(), dial(t, addr), "kill -KILL $$", nil, io.Discard, io.Discard)
	if err != nil || code != 128+9 {
		t.Fatalf("killed remote command: code %d err %v, want 137", code, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	code, err = sshclient.RunCommand(ctx, dial(t, addr), "sleep 30", nil, io.Discard, io.Discard)
	if err == nil || code != 255 {
		t.Fatalf("cancelled command: code %d err %v, want 255 and an error", code, err)
	}
}

// TestRunInteractive drives RunInteractive through a local PTY: the remote
// shell sees the local size, a SIGWINCH after a resize reaches it, and the
// exit status comes back.
func TestRunInteractive(t *testing.T) {
	addr := startServer(t)
	master, tty, err := pty.Open()
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	defer master.Close()
	defer tty.Close()
	if err := pty.Setsize(tty, &pty.Winsize{Rows: 33, Cols: 111}); err != nil {
		t.Fatal(err)
	}
	var screen syncbuf.Buffer
	go func() { _, _ = io.Copy(&screen, master) }()

	type result struct {
		code int
		err  error
	}
	done := make(chan result, 1)
	go func() {
		code, err := sshclient.RunInteractive(context.Background(), dial(t, addr), sshclient.InteractiveOptions{
			Stdin: tty, Stdout: tty, Stderr: tty, Term: "xterm-test", Env: []string{"LC_FROM_CLIENT=yes"},
		})
		done <- result{code, err}
	}()
	waitScreen := func(want string) {
		t.Helper()
		deadline := time.Now().Add(45 * time.Second)
		for !strings.Contains(screen.String(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("screen never showed %q:\n%s", want, screen.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	fmt.Fprintf(master, "echo \"A:$(stty size):$TERM:$LC_FROM_CLIENT\"\r")
	waitScreen("A:33 111:xterm-test:yes")
	if err := pty.Setsize(tty, &pty.Winsize{Rows: 40, Cols: 120}); err != nil {
		t.Fatal(err)
	}
	_ = unix.Kill(os.Getpid(), unix.SIGWINCH)
	// The resize travels asynchronously as a window-change; ask until seen.
	for i := 0; i < 30 && !strings.Contains(screen.String(), "B:40 120"); i++ {
		fmt.Fprintf(master, "echo \"B:$(stty size)\"\r")
		time.Sleep(500 * time.Millisecond)
	}
	waitScreen("B:40 120")
	fmt.Fprintf(master, "exit 5\r")
	select {
	case r := <-done:
		if r.err != nil || r.code != 5 {
			t.Fatalf("RunInteractive: code %d err %v, want 5", r.code, r.err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("RunInteractive did not return after exit")
	}
}

// TestAgentForwarding: RunInteractive with ForwardAgent gives the remote
// command the local ssh-agent.
func TestAgentForwarding(t *testing.T) {
	sshtest.RequireTools(t, "ssh-agent", "ssh-add", "ssh-keygen")
	addr := startServer(t)
	dir, err := os.MkdirTemp("", "sshclient")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "agent.sock")
	agent := exec.Command("ssh-agent", "-D", "-a", sock)
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = agent.Process.Kill(); _ = agent.Wait() }()
	key := filepath.Join(dir, "id")
	sshtest.Run(t, nil, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fwd-key", "-f", key)
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	sshtest.Run(t, []string{"SSH_AUTH_SOCK=" + sock}, "ssh-add", key)

	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	devnull, _ := os.Open(os.DevNull)
	defer devnull.Close()
	code, err := sshclient.RunInteractive(context.Background(), dial(t, addr), sshclient.InteractiveOptions{
		Command: "ssh-add -l", Stdin: devnull, Stdout: outW, Stderr: outW, ForwardAgent: true, AgentSocket: sock,
	})
	outW.Close()
	out, _ := io.ReadAll(outR)
	if err != nil || code != 0 || !strings.Contains(string(out), "fwd-key") {
		t.Fatalf("ssh-add -l through forwarded agent: code %d err %v output %q", code, err, out)
	}
}

// TestProxyStdioWithOpenSSH runs the OpenSSH client matrix through
// ProxyStdio as the ProxyCommand.
func TestProxyStdioWithOpenSSH(t *testing.T) {
	sshtest.RequireTools(t, "ssh")
	addr := startServer(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tg := sshtest.Target{
		Host:        "ws1.agent",
		Options:     []string{"ProxyCommand=" + sshtest.ShellQuote(exe) + " proxy-helper " + addr},
		BigFileSize: 32 << 20,
		Dial: func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
	}
	sshtest.RunAll(t, tg)
}

// TestProxyStdioClientGone: when the OpenSSH client goes away while the
// server still sends, the ProxyCommand must pass the end of the stream on to
// the server and exit cleanly only after the server closed. The client goes
// either by being killed (its ends of both pipes close: the next write to
// stdout would raise SIGPIPE) or by exiting (ssh sends its ProxyCommand
// SIGHUP). Over the tailnet the connection lives in the process's own
// network stack, so dying of either signal first would leave the server's
// session running.
func TestProxyStdioClientGone(t *testing.T) {
	for _, tc := range []struct {
		name string
		gone func(t *testing.T, cmd *exec.Cmd, stdin, stdout io.Closer)
	}{
		{"killed", func(t *testing.T, _ *exec.Cmd, stdin, stdout io.Closer) {
			stdout.Close()
			stdin.Close()
		}},
		{"hangup", func(t *testing.T, cmd *exec.Cmd, _, _ io.Closer) {
			if err := cmd.Process.Signal(unix.SIGHUP); err != nil {
				t.Fatal(err)
			}
		}},
		// Ctrl-C reaches ssh and its ProxyCommand together.
		{"interrupted", func(t *testing.T, cmd *exec.Cmd, _, _ io.Closer) {
			if err := cmd.Process.Signal(os.Interrupt); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { checkProxyClientGone(t, tc.name == "interrupted", tc.gone) })
	}
}

// checkProxyClientGone runs the proxy helper against a server of its own,
// lets gone end the client, and checks that the proxy exits cleanly (with an
// error exit when it was interrupted) and only after the server saw EOF.
func checkProxyClientGone(t *testing.T, interrupted bool, gone func(t *testing.T, cmd *exec.Cmd, stdin, stdout io.Closer)) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	upload := bytes.Repeat([]byte("u"), 32<<10)
	// More than the kernel buffers between the server and the proxy hold
	// (both are kept small), so the proxy must read, and write to its
	// stdout, before the server gets all of it out.
	const afterGone = 4 << 20
	clientGone := make(chan struct{})
	type serverResult struct {
		err      error
		received int64
	}
	result := make(chan serverResult, 1)
	go func() {
		var res serverResult
		c, err := ln.Accept()
		if err != nil {
			res.err = err
			result <- res
			return
		}
		// The result is in before the close: the proxy may exit as soon as
		// it reads the server's EOF, and the test then looks for it.
		defer c.Close()
		defer func() { result <- res }()
		_ = c.(*net.TCPConn).SetWriteBuffer(64 << 10)
		// The upload arrives, then a greeting tells the test the proxy
		// is copying (and has its signal handling in place).
		if _, res.err = io.ReadFull(c, make([]byte, len(upload))); res.err != nil {
			return
		}
		res.received = int64(len(upload))
		if _, res.err = c.Write([]byte("hello")); res.err != nil {
			return
		}
		<-clientGone
		chunk := make([]byte, 32<<10)
		for sent := 0; sent < afterGone && res.err == nil; sent += len(chunk) {
			_, res.err = c.Write(chunk)
		}
		n, _ := io.Copy(io.Discard, c)
		res.received += n
	}()

	cmd := exec.Command(exe, "proxy-helper", ln.Addr().String())
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr syncbuf.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var waitErr error
	exited := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	if _, err := stdin.Write(upload); err != nil {
		t.Fatal(err)
	}
	hello := make([]byte, 5)
	if _, err := io.ReadFull(stdout, hello); err != nil || string(hello) != "hello" {
		t.Fatalf("greeting through the proxy: %q, %v (stderr %q)", hello, err, stderr.String())
	}
	gone(t, cmd, stdin, stdout)
	close(clientGone)

	select {
	case <-exited:
	case <-time.After(2 * time.Minute):
		t.Fatalf("the proxy still runs two minutes after its client went away (stderr %q)", stderr.String())
	}
	switch ee, _ := waitErr.(*exec.ExitError); {
	case interrupted && (ee == nil || ee.ExitCode() != 1 || !strings.Contains(stderr.String(), "context canceled")):
		t.Fatalf("the interrupted proxy exited with %v (stderr %q), want exit status 1 and the cancellation", waitErr, stderr.String())
	case !interrupted && waitErr != nil:
		t.Fatalf("the proxy exited with %v after its client went away, want a clean exit (stderr %q)", waitErr, stderr.String())
	}
	select {
	case res := <-result:
		if res.err != nil {
			t.Fatalf("server side: %v", res.err)
		}
		if res.received != int64(len(upload)) {
			t.Fatalf("the server received %d bytes and EOF, want the %d the client wrote", res.received, len(upload))
		}
	default:
		t.Fatal("the proxy exited before the server saw the end of the stream")
	}
}

package sshd_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/internal/testkit/sshtest"
	gossh "golang.org/x/crypto/ssh"
)

// testLogger writes the server's logs into the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// startServer runs a server on a loopback port until the test ends.
func startServer(t testing.TB, opts sshd.Options) (*sshd.Server, string) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	if opts.HostKeyPath == "" {
		opts.HostKeyPath = filepath.Join(t.TempDir(), "ssh_host_ed25519_key")
	}
	if opts.Shell == "" {
		// Not the test user's login shell: bash reads ~/.bashrc for
		// commands run by an SSH server, and this machine's root runs
		// `pyenv init` there, whose rehash lock held concurrent sessions
		// for 60 s. Tests must not depend on the machine's dotfiles.
		opts.Shell = "/bin/sh"
	}
	srv, err := sshd.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv, ln.Addr().String()
}

func target(addr string) sshtest.Target {
	host, port, _ := net.SplitHostPort(addr)
	return sshtest.Target{
		Host:    host,
		Options: []string{"Port=" + port},
		Dial: func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
	}
}

// TestOpenSSHClients runs the whole OpenSSH client matrix against the server.
func TestOpenSSHClients(t *testing.T) {
	sshtest.RequireTools(t, "ssh", "scp", "sftp", "rsync", "tmux", "git")
	// The agent's own settings must never reach a session.
	t.Setenv("AGENT_TOKEN", "secret-token-value")
	t.Setenv("AGENT_TOKEN_FILE", "/nonexistent")
	motd := filepath.Join(t.TempDir(), "motd")
	if err := os.WriteFile(motd, []byte("Welcome to the sshtest workspace\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var peersMu sync.Mutex
	peers := map[string]bool{}
	_, addr := startServer(t, sshd.Options{
		MOTDPath: motd,
		PeerIdentity: func(a net.Addr) string {
			peersMu.Lock()
			defer peersMu.Unlock()
			peers[a.String()] = true
			return "tester@example.com"
		},
	})
	tg := target(addr)
	tg.MOTD = "Welcome to the sshtest workspace"
	if testing.Short() {
		tg.BigFileSize = 16 << 20
	}
	sshtest.RunAll(t, tg)
	peersMu.Lock()
	defer peersMu.Unlock()
	if len(peers) == 0 {
		t.Error("PeerIdentity was never asked who a connection belongs to")
	}
}

// TestHostKeyStable: the host key is made once, kept 0600, and clients see
// the same key after a restart.
func TestHostKeyStable(t *testing.T) {
	sshtest.RequireTools(t, "ssh-keyscan")
	keyPath := filepath.Join(t.TempDir(), "data", "ssh_host_ed25519_key")
	scan := func() string {
		t.Helper()
		_, addr := startServer(t, sshd.Options{HostKeyPath: keyPath})
		host, port, _ := net.SplitHostPort(addr)
		out := sshtest.Run(t, nil, "ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", port, host)
		for _, line := range strings.Split(out, "\n") {
			fields := strings.Fields(line)
			if len(fields) >= 3 && fields[1] == "ssh-ed25519" {
				return fields[2]
			}
		}
		t.Fatalf("ssh-keyscan found no ed25519 key: %q", out)
		return ""
	}
	first := scan()
	fi, err := os.Stat(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("host key mode %v, want 0600", fi.Mode().Perm())
	}
	if second := scan(); second != first {
		t.Fatalf("host key changed across restarts: %s then %s", first, second)
	}
}

// TestNoLeaks: after sessions of every kind and a Close, no goroutine, file
// descriptor or child process of the server is left.
func TestNoLeaks(t *testing.T) {
	fdsBefore := countFDs(t)
	goroutinesBefore := runtime.NumGoroutine()
	func() {
		srv, err := sshd.New(sshd.Options{Logger: testLogger(t), HostKeyPath: filepath.Join(t.TempDir(), "k")})
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- srv.Serve(context.Background(), ln) }()

		client := dialGo(t, ln.Addr().String())
		for i := 0; i < 3; i++ {
			sess, err := client.NewSession()
			if err != nil {
				t.Fatal(err)
			}
			if i == 1 {
				if err := sess.RequestPty("xterm", 24, 80, gossh.TerminalModes{}); err != nil {
					t.Fatal(err)
				}
			}
			out, err := sess.Output("echo hi; echo err >&2")
			if err != nil || !strings.Contains(string(out), "hi") {
				t.Fatalf("session %d: %q %v", i, out, err)
			}
		}
		// A session still running when the server closes.
		sess, err := client.NewSession()
		if err != nil {
			t.Fatal(err)
		}
		if err := sess.Start("sleep 4242.5"); err != nil {
			t.Fatal(err)
		}
		sshtest.WaitProcess(t, "sleep 4242.5", 10*time.Second)
		// A remote forward listener, to be closed with the connection.
		ln2, err := client.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		_ = ln2
		srv.Close()
		if err := <-done; err != nil {
			t.Fatalf("Serve: %v", err)
		}
		client.Close()
		sshtest.WaitNoProcess(t, "sleep 4242.5", 10*time.Second)
	}()

	deadline := time.Now().Add(10 * time.Second)
	for {
		g, fds := runtime.NumGoroutine(), countFDs(t)
		if g <= goroutinesBefore && fds <= fdsBefore {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("leak: goroutines %d (before %d), fds %d (before %d)\n%s", g, goroutinesBefore, fds, fdsBefore, buf[:n])
		}
		time.Sleep(100 * time.Millisecond)
	}
	// No zombies among our children.
	if z := zombieChildren(t); len(z) > 0 {
		t.Fatalf("zombie children left: %v", z)
	}
}

func dialGo(t testing.TB, addr string) *gossh.Client {
	t.Helper()
	client, err := gossh.Dial("tcp", addr, &gossh.ClientConfig{
		User:            "test",
		HostKeyCallback: gossh.InsecureIgnoreHostKey(), // a throwaway test server
		Timeout:         10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	return client
}

func countFDs(t testing.TB) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(entries)
}

func zombieChildren(t testing.TB) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	me := strconv.Itoa(os.Getpid())
	for _, e := range entries {
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) > 1 && f[0] == "Z" && f[1] == me {
			pid, _ := strconv.Atoi(e.Name())
			out = append(out, pid)
		}
	}
	return out
}

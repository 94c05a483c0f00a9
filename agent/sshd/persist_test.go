package sshd_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/client/sshclient"
	"github.com/agentd/agent/internal/syncbuf"
	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
)

// freezer is a TCP proxy to the server whose traffic can be frozen, as a
// network outage does: nothing moves, nothing is closed, new connections
// hang.
type freezer struct {
	t      *testing.T
	target string
	ln     net.Listener

	mu     sync.Mutex
	frozen bool
	thaw   chan struct{}
	conns  []net.Conn
}

func newFreezer(t *testing.T, target string) *freezer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{t: t, target: target, ln: ln, thaw: make(chan struct{})}
	close(f.thaw)
	go f.serve()
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for _, c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
	})
	return f
}

func (f *freezer) serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", f.target)
		if err != nil {
			c.Close()
			continue
		}
		f.mu.Lock()
		f.conns = append(f.conns, c, s)
		f.mu.Unlock()
		go f.pipe(c, s)
		go f.pipe(s, c)
	}
}

// pipe copies src to dst, holding every chunk while frozen.
func (f *freezer) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		f.mu.Lock()
		thaw := f.thaw
		f.mu.Unlock()
		<-thaw
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (f *freezer) freeze(on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if on && !f.frozen {
		f.thaw = make(chan struct{})
	} else if !on && f.frozen {
		close(f.thaw)
	}
	f.frozen = on
}

func (f *freezer) dial(ctx context.Context, _ bool) (net.Conn, error) {
	return (&net.Dialer{}).DialContext(ctx, "tcp", f.ln.Addr().String())
}

// terminal is a client's stdin (a pipe we type into) and everything it
// showed on stdout and stderr.
type terminal struct {
	t     *testing.T
	in    *os.File
	out   syncbuf.Buffer
	code  int
	err   error
	ended chan struct{}
}

func runSession(t *testing.T, ctx context.Context, name string, dial func(context.Context, bool) (net.Conn, error)) *terminal {
	t.Helper()
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	term := &terminal{t: t, in: inW, ended: make(chan struct{})}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		_, _ = io.Copy(&term.out, outR)
	}()
	go func() {
		defer close(term.ended)
		term.code, term.err = sshclient.RunSession(ctx, sshclient.SessionOptions{
			InteractiveOptions: sshclient.InteractiveOptions{Stdin: inR, Stdout: outW, Stderr: &term.out},
			Name:               name,
			Workspace:          "test",
			Dial:               dial,
			KeepaliveInterval:  200 * time.Millisecond,
			DeadAfter:          time.Second,
			ReconnectTimeout:   time.Second,
		})
		outW.Close()
		<-copied
		inR.Close()
	}()
	t.Cleanup(func() { inW.Close() })
	return term
}

func (m *terminal) typeLine(s string) {
	m.t.Helper()
	if _, err := m.in.WriteString(s + "\n"); err != nil {
		m.t.Fatal(err)
	}
}

func (m *terminal) waitFor(re *regexp.Regexp, within time.Duration) []string {
	m.t.Helper()
	deadline := time.Now().Add(within)
	for {
		if sm := re.FindStringSubmatch(m.out.String()); sm != nil {
			return sm
		}
		if time.Now().After(deadline) {
			select {
			case <-m.ended:
				m.t.Fatalf("the terminal never showed %s; the session ended (exit %d, %v) after showing:\n%s", re, m.code, m.err, m.out.String())
			default:
			}
			m.t.Fatalf("the terminal never showed %s; it showed:\n%s", re, m.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (m *terminal) wait(within time.Duration) (int, error) {
	m.t.Helper()
	select {
	case <-m.ended:
		return m.code, m.err
	case <-time.After(within):
		m.t.Fatalf("the session did not end within %s; the terminal showed:\n%s", within, m.out.String())
		return 0, nil
	}
}

// countedLines checks that the terminal shows the counter's lines 1..n,
// each once and in order.
func countedLines(t *testing.T, out string, n int) {
	t.Helper()
	var got []int
	for _, sm := range regexp.MustCompile(`(?m)^line(\d+)\r?$`).FindAllStringSubmatch(out, -1) {
		i, _ := strconv.Atoi(sm[1])
		got = append(got, i)
	}
	if len(got) != n {
		t.Fatalf("the terminal shows %d counter lines, want %d (lost or repeated output):\n%v", len(got), n, got)
	}
	for i, v := range got {
		if v != i+1 {
			t.Fatalf("counter line %d is line%d: output lost, repeated or out of order:\n%v", i+1, v, got)
		}
	}
}

// frozenServer starts a server behind a freezer, with a minute for the
// test.
func frozenServer(t *testing.T) (addr string, fr *freezer, ctx context.Context) {
	_, addr = startServer(t, sshd.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return addr, newFreezer(t, addr), ctx
}

// TestSessionSurvivesOutage: a reconnecting session whose network freezes
// (keepalives go unanswered, the connection is given up) reconnects when
// it thaws, to the same shell, and shows every line printed meanwhile
// once, in order. A second client attaches by name and sees the output
// too; the shell's exit reaches both.
func TestSessionSurvivesOutage(t *testing.T) {
	addr, fr, ctx := frozenServer(t)
	a := runSession(t, ctx, "outage", fr.dial)
	a.typeLine(`echo "PID:$$"`)
	pid := a.waitFor(regexp.MustCompile(`PID:(\d+)`), 10*time.Second)[1]

	a.typeLine(`i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo line$i; sleep 0.01; done; echo "COUNTED:$$"`)
	a.waitFor(regexp.MustCompile(`(?m)^line20\r?$`), 10*time.Second)
	fr.freeze(true)
	a.waitFor(regexp.MustCompile(`connection to workspace "test" lost; reconnecting`), 10*time.Second)
	time.Sleep(2 * time.Second) // reconnects time out while frozen
	fr.freeze(false)
	if got := a.waitFor(regexp.MustCompile(`COUNTED:(\d+)`), 20*time.Second)[1]; got != pid {
		t.Fatalf("after the reconnect the shell is PID %s, before it was %s", got, pid)
	}
	countedLines(t, a.out.String(), 300)

	// A second terminal attaches by name: it is shown the scrollback.
	b := runSession(t, ctx, "outage", fr.dial)
	b.waitFor(regexp.MustCompile(`COUNTED:`+pid), 10*time.Second)
	b.typeLine("exit 3")
	for name, m := range map[string]*terminal{"first": a, "second": b} {
		if code, err := m.wait(10 * time.Second); err != nil || code != 3 {
			t.Errorf("%s client: exit %d, %v; want 3 after `exit 3`", name, code, err)
		}
	}
	// The session is gone: coming back to it is refused, saying why.
	wantRefused(t, addr, "outage", "no longer exists")
}

// wantRefused reattaches to a session as a reconnecting client does
// (Create false) and requires a refusal containing why.
func wantRefused(t *testing.T, addr, name, why string) {
	t.Helper()
	c := dialGo(t, addr)
	defer c.Close()
	_, _, err := c.OpenChannel(protocol.SessionAttachChannel, gossh.Marshal(&protocol.SessionAttach{Name: name, Cols: 80, Rows: 24}))
	var oce *gossh.OpenChannelError
	if !errors.As(err, &oce) || !strings.Contains(oce.Message, why) {
		t.Fatalf("reattaching to session %q: %v; want a refusal saying %q", name, err, why)
	}
}

// TestSessionReportsLostOutput: a client that was away while more than
// the scrollback was printed is told how much it missed, and shows the
// rest.
func TestSessionReportsLostOutput(t *testing.T) {
	addr, fr, ctx := frozenServer(t)
	a := runSession(t, ctx, "flood", fr.dial)
	a.typeLine(`echo READY`)
	a.waitFor(regexp.MustCompile(`(?m)^(?:[$#] )?READY`), 10*time.Second)
	fr.freeze(true)
	a.waitFor(regexp.MustCompile(`lost; reconnecting`), 10*time.Second)
	// Typed while away is dropped, so the flood is typed by a second
	// client on the server directly.
	b := runSession(t, ctx, "flood", func(ctx context.Context, _ bool) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	})
	b.typeLine(`i=0; while [ $i -lt 3000 ]; do echo "flood-$i-................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................"; i=$((i+1)); done; echo FLOODED`)
	b.waitFor(regexp.MustCompile(`(?m)^FLOODED`), 30*time.Second)
	fr.freeze(false)
	sm := a.waitFor(regexp.MustCompile(`agent: (\d+) bytes of output were lost while disconnected`), 20*time.Second)
	a.waitFor(regexp.MustCompile(`(?m)^FLOODED`), 20*time.Second)
	// About 2 MB of flood, of which the 1 MiB scrollback is replayed.
	if n, _ := strconv.Atoi(sm[1]); n < 512<<10 || n > 2<<20 {
		t.Errorf("reported %d bytes lost; the flood was about 2 MB and the scrollback keeps 1 MiB", n)
	}
	if !strings.Contains(a.out.String(), "flood-2999-") {
		t.Error("the last of the flood, inside the scrollback, was not shown")
	}
}

// TestSessionIdleExpiry: a session nobody is attached to ends after the
// idle timeout; one that is attached again before stays.
func TestSessionIdleExpiry(t *testing.T) {
	reg := metrics.NewRegistry()
	_, addr := startServer(t, sshd.Options{SessionIdleTimeout: 1500 * time.Millisecond, Metrics: metrics.NewAgent(reg)})
	const attached = `agent_ssh_sessions_active{type="shell"}`
	dial := func(ctx context.Context, _ bool) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := runSession(t, ctx, "idle", dial)
	a.typeLine(`echo "PID:$$"`)
	pid, _ := strconv.Atoi(a.waitFor(regexp.MustCompile(`PID:(\d+)`), 10*time.Second)[1])
	if n := sample(t, series(t, reg), attached); n != 1 {
		t.Errorf("%s = %v with a client attached, want 1", attached, n)
	}
	cancel() // the client goes away; the shell stays
	a.wait(5 * time.Second)
	time.Sleep(500 * time.Millisecond)
	if n := sample(t, series(t, reg), attached); n != 0 {
		t.Errorf("%s = %v after the client left, want 0", attached, n)
	}
	if !alive(pid) {
		t.Fatalf("shell %d ended when its client left, before the idle timeout", pid)
	}
	deadline := time.Now().Add(10 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("shell %d still runs 10 s after the 1.5 s idle timeout", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	wantRefused(t, addr, "idle", "no client was attached for longer than 1.5s")
}

func alive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(data), ')')
	return i > 0 && len(data) > i+2 && data[i+2] != 'Z'
}

// Package sshclient is the laptop side of `agent ssh`: an SSH client that
// runs over a connection the caller already dialed to a workspace's SSH
// port through the tailnet, plus the byte pipe OpenSSH's ProxyCommand needs.
//
// Host keys: the client accepts the workspace's host key without checking
// it. The connection was dialed over the tailnet, where WireGuard already
// proved the peer holds the node key the coordinator registered for that
// workspace, so the SSH host key adds no authentication of its own; pinning
// it would only break logins when a workspace is rebuilt with a new key.
package sshclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"os/user"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
	"golang.org/x/sys/unix"
	"golang.org/x/term"
)

// InteractiveOptions configure RunInteractive.
type InteractiveOptions struct {
	// Command runs instead of the login shell when set.
	Command string
	// Stdin, Stdout and Stderr default to the process's own. A PTY is
	// requested when Stdin is a terminal (as ssh does without -t/-T).
	Stdin  *os.File
	Stdout *os.File
	Stderr io.Writer
	// Term is the terminal type; default $TERM, else xterm-256color.
	Term string
	// Env is sent to the session (KEY=VALUE), like ssh's SetEnv.
	Env []string
	// ForwardAgent forwards the local ssh-agent (AgentSocket, default
	// $SSH_AUTH_SOCK) so `ssh-add -l` and git in the workspace can use it.
	ForwardAgent bool
	AgentSocket  string
	// User is the SSH user name; the workspace ignores it for authorization
	// (sessions run as the agent's user). Default: the local user's name.
	User string
	// NoEscapes turns off the ~. and ~? escapes that a terminal session
	// otherwise reads at the start of a line, as ssh -e none does.
	NoEscapes bool
}

// ExpectHostKey marks conn so that RunCommand and RunInteractive accept
// only the SSH host key hostKey (authorized_keys format): the key the
// coordinator vouches for. Without it no host key is checked.
func ExpectHostKey(conn net.Conn, hostKey string) (net.Conn, error) {
	pub, _, _, _, err := gossh.ParseAuthorizedKey([]byte(hostKey))
	if err != nil {
		return nil, fmt.Errorf("the vouched host key is not an SSH public key: %w", err)
	}
	return &expectConn{Conn: conn, key: pub}, nil
}

type expectConn struct {
	net.Conn
	key gossh.PublicKey
}

// CloseWrite keeps half-closing available through the wrapper.
func (c *expectConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// ErrEscapeDisconnect is returned by RunInteractive when the user typed ~.
var ErrEscapeDisconnect = errors.New("connection closed by the ~. escape")

// dial runs the SSH handshake over conn. Cancelling ctx closes conn, which
// ends everything running on it. A deadline set on conn bounds the
// handshake and is cleared once it is done.
func dial(ctx context.Context, conn net.Conn, userName string) (*gossh.Client, func(), error) {
	if userName == "" {
		userName = localUser()
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	cfg := &gossh.ClientConfig{
		User:          userName,
		ClientVersion: "SSH-2.0-agentd-client",
	}
	if ec, ok := conn.(*expectConn); ok {
		want := ec.key
		cfg.HostKeyCallback = func(_ string, _ net.Addr, got gossh.PublicKey) error {
			if bytes.Equal(got.Marshal(), want.Marshal()) {
				return nil
			}
			return fmt.Errorf("the workspace presented SSH host key %s, not %s that the coordinator vouches for: this is not the workspace's agent; refusing to connect",
				gossh.FingerprintSHA256(got), gossh.FingerprintSHA256(want))
		}
	} else {
		// No vouched key to compare with: the tailnet authenticated the
		// workspace's node (see the package comment).
		cfg.HostKeyCallback = gossh.InsecureIgnoreHostKey()
	}
	sconn, chans, reqs, err := gossh.NewClientConn(conn, conn.RemoteAddr().String(), cfg)
	if err != nil {
		stop()
		conn.Close()
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		return nil, nil, fmt.Errorf("SSH handshake with the workspace: %w", err)
	}
	// A deadline the caller set bounded the handshake; the session that
	// follows runs as long as it likes.
	_ = conn.SetDeadline(time.Time{})
	client := gossh.NewClient(sconn, chans, reqs)
	return client, func() { stop(); client.Close() }, nil
}

func localUser() string {
	if u, err := user.Current(); err == nil && u.Username != "" {
		return u.Username
	}
	if n := os.Getenv("USER"); n != "" {
		return n
	}
	return "agent"
}

// exitCode turns the end of a session into the code ssh would exit with:
// the remote status, 128+N for a remote process killed by signal N, and an
// error (with code 255) when the session ended without any status.
func exitCode(ctx context.Context, err error) (int, error) {
	if err == nil {
		return 0, nil
	}
	var ee *gossh.ExitError
	if errors.As(err, &ee) {
		return ee.ExitStatus(), nil
	}
	if ctx.Err() != nil {
		return 255, ctx.Err()
	}
	var missing *gossh.ExitMissingError
	if errors.As(err, &missing) {
		return 255, errors.New("the workspace closed the session without an exit status (connection lost?)")
	}
	return 255, fmt.Errorf("SSH session: %w", err)
}

// RunCommand runs command in the workspace without a PTY, with stdin,
// stdout and stderr kept apart, and returns its exit status.
func RunCommand(ctx context.Context, conn net.Conn, command string, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	client, closeClient, err := dial(ctx, conn, "")
	if err != nil {
		return 255, err
	}
	defer closeClient()
	sess, err := client.NewSession()
	if err != nil {
		return 255, fmt.Errorf("open an SSH session: %w", err)
	}
	defer sess.Close()
	defer catchSIGPIPE()()
	out := &outputWriter{w: stdout, close: sess.Close}
	sess.Stdout, sess.Stderr = out, stderr
	if stdin != nil {
		w, err := sess.StdinPipe()
		if err != nil {
			return 255, err
		}
		go func() {
			_, _ = io.Copy(w, stdin)
			w.Close() // EOF for the remote command
		}()
	}
	return out.result(exitCode(ctx, sess.Run(command)))
}

// RunInteractive opens a shell (or runs opts.Command) like ssh: with a PTY
// when stdin is a terminal, the local terminal in raw mode, window size
// changes (SIGWINCH) passed on, and the remote exit status returned.
func RunInteractive(ctx context.Context, conn net.Conn, opts InteractiveOptions) (int, error) {
	opts.setDefaults()
	client, closeClient, err := dial(ctx, conn, opts.User)
	if err != nil {
		return 255, err
	}
	defer closeClient()
	sess, err := client.NewSession()
	if err != nil {
		return 255, fmt.Errorf("open an SSH session: %w", err)
	}
	defer sess.Close()

	if opts.ForwardAgent {
		sock := opts.AgentSocket
		if sock == "" {
			sock = os.Getenv("SSH_AUTH_SOCK")
		}
		if sock == "" {
			fmt.Fprintln(opts.Stderr, "agent: no ssh-agent to forward (SSH_AUTH_SOCK is not set); continuing without it")
		} else if err := agent.ForwardToRemote(client, sock); err != nil {
			return 255, fmt.Errorf("forward ssh-agent %s: %w", sock, err)
		} else if err := agent.RequestAgentForwarding(sess); err != nil {
			return 255, fmt.Errorf("the workspace refused agent forwarding: %w", err)
		}
	}
	for _, kv := range opts.Env {
		if k, v, ok := cutEnv(kv); ok {
			_ = sess.Setenv(k, v) // a refused variable is not fatal, as with ssh
		}
	}

	var stdin io.Reader = opts.Stdin
	escaped := make(chan struct{})
	inFd := int(opts.Stdin.Fd())
	if term.IsTerminal(inFd) {
		if !opts.NoEscapes {
			stdin = newEscapeReader(opts.Stdin, opts.Stderr, func() {
				close(escaped)
				client.Close()
			})
		}
		cols, rows := terminalSize(opts.Stdout, opts.Stdin)
		if err := sess.RequestPty(opts.Term, rows, cols, terminalModes); err != nil {
			return 255, fmt.Errorf("the workspace refused a terminal: %w", err)
		}
		state, err := term.MakeRaw(inFd)
		if err != nil {
			return 255, fmt.Errorf("put the local terminal in raw mode: %w", err)
		}
		defer func() { _ = term.Restore(inFd, state) }()

		winch := make(chan os.Signal, 1)
		signal.Notify(winch, unix.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				c, r := terminalSize(opts.Stdout, opts.Stdin)
				_ = sess.WindowChange(r, c)
			}
		}()
	}

	defer catchSIGPIPE()()
	out := &outputWriter{w: opts.Stdout, close: sess.Close}
	sess.Stdin, sess.Stdout, sess.Stderr = stdin, out, opts.Stderr
	if opts.Command == "" {
		err = sess.Shell()
	} else {
		err = sess.Start(opts.Command)
	}
	if err != nil {
		return 255, fmt.Errorf("start the remote shell: %w", err)
	}
	err = sess.Wait()
	select {
	case <-escaped:
		return 255, ErrEscapeDisconnect
	default:
	}
	return out.result(exitCode(ctx, err))
}

// setDefaults fills in the process's own stdin, stdout, stderr and
// terminal type.
func (o *InteractiveOptions) setDefaults() {
	if o.Stdin == nil {
		o.Stdin = os.Stdin
	}
	if o.Stdout == nil {
		o.Stdout = os.Stdout
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
	}
	if o.Term == "" {
		o.Term = os.Getenv("TERM")
	}
	if o.Term == "" {
		o.Term = "xterm-256color"
	}
}

// terminalModes are the modes a requested PTY starts with.
var terminalModes = gossh.TerminalModes{gossh.ECHO: 1, gossh.IUTF8: 1, gossh.TTY_OP_ISPEED: 38400, gossh.TTY_OP_OSPEED: 38400}

func terminalSize(files ...*os.File) (cols, rows int) {
	for _, f := range files {
		if c, r, err := term.GetSize(int(f.Fd())); err == nil && c > 0 && r > 0 {
			return c, r
		}
	}
	return 80, 24
}

func cutEnv(kv string) (string, string, bool) {
	for i := 0; i < len(kv); i++ {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], i > 0
		}
	}
	return "", "", false
}

// serverCloseGrace bounds how long ProxyStdio waits for the server to close
// the connection once the OpenSSH client is gone, so a server that never
// answers cannot keep the process alive.
const serverCloseGrace = 10 * time.Second

// ProxyStdio copies raw SSH bytes between stdin/stdout and conn, for
// OpenSSH's ProxyCommand. When stdin ends, conn's write side is closed
// (half-close), so the server sees EOF and can finish cleanly while its last
// bytes still flow back; ProxyStdio returns when the server closes its side.
//
// It does not return before the server has closed the connection, or
// serverCloseGrace after the client left: conn usually runs on a userspace
// network stack inside this process, so a FIN still queued when the process
// exits is never sent, and the server would keep the session (say a remote
// `cat > file`) running until its keepalive gives up. A cancelled ctx ends
// the stream the same way (ProxyStdio then returns ctx's error). While it
// runs, ProxyStdio takes over two signals that would otherwise end the
// process at once:
//   - SIGHUP, which ssh sends its ProxyCommand when it exits: the stream is
//     half-closed and ProxyStdio waits for the server to close;
//   - SIGPIPE on a closed stdout (the ssh client was killed): writes fail with
//     EPIPE instead, and what the server still sends is read and dropped.
//
// The stdin reader may still be blocked in Read after the return; in a
// ProxyCommand process that exits, that does not matter.
func ProxyStdio(ctx context.Context, conn net.Conn, stdin io.Reader, stdout io.Writer) error {
	defer catchSIGPIPE()()
	hangup := make(chan os.Signal, 1)
	signal.Notify(hangup, unix.SIGHUP)
	defer signal.Stop(hangup)

	defer conn.Close()
	if f, ok := stdout.(*os.File); ok {
		GrowPipe(f)
	}

	var closeWriteOnce sync.Once
	closeWrite := func() {
		closeWriteOnce.Do(func() {
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			} else {
				conn.Close()
			}
		})
	}
	stdinDone := make(chan struct{})
	go func() {
		defer close(stdinDone)
		_, _ = io.Copy(conn, stdin)
		closeWrite()
	}()

	outputFailed := make(chan struct{})
	clientGone := make(chan struct{})
	copied := make(chan struct{})
	defer close(copied)
	go func() {
		// The client is gone once it hung us up, or once both its pipes
		// ended (stdin at EOF, stdout closed); a cancelled ctx ends the
		// stream the same way.
		failed, eof := (<-chan struct{})(outputFailed), (<-chan struct{})(stdinDone)
		for failed != nil || eof != nil {
			select {
			case <-failed:
				failed = nil
			case <-eof:
				eof = nil
			case <-hangup:
				failed, eof = nil, nil
			case <-ctx.Done():
				failed, eof = nil, nil
			case <-copied:
				return
			}
		}
		close(clientGone)
		closeWrite()
		t := time.NewTimer(serverCloseGrace)
		defer t.Stop()
		select {
		case <-t.C:
			conn.Close()
		case <-copied:
		}
	}()
	err := copyToClient(conn, stdout, clientGone, outputFailed)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("SSH connection to the workspace: %w", err)
	}
	return nil
}

// copyToClient copies what the server sends to the OpenSSH client until the
// server closes. Once a write to the client fails (outputFailed is closed
// then) or the client is gone, the rest is read and dropped. The writes run
// on a goroutine of their own, so a write blocked on a client that is gone
// cannot keep us from reading on to the server's close; up to two chunks
// wait with that goroutine while the next is read, so reading from the
// tailnet and writing to the client overlap.
func copyToClient(conn net.Conn, stdout io.Writer, clientGone <-chan struct{}, outputFailed chan<- struct{}) error {
	var bufs [3][]byte // one being read into, up to two with the writer
	for i := range bufs {
		bufs[i] = make([]byte, StdioChunk)
	}
	chunks := make(chan []byte, len(bufs)-1)
	defer close(chunks)
	written := make(chan error, len(bufs)-1)
	go func() {
		for p := range chunks {
			_, err := stdout.Write(p)
			written <- err
		}
	}()
	var drop []byte // reads once nothing is written any more
	writing, pending, next := true, 0, 0
	done := func(err error) {
		pending--
		if err != nil && writing {
			writing = false
			close(outputFailed)
		}
	}
	// wait takes finished writes; with all set it waits for every pending
	// one, otherwise until a buffer is free.
	wait := func(all bool) {
		for writing && (pending == len(bufs)-1 || all && pending > 0) {
			select {
			case err := <-written:
				done(err)
			case <-clientGone:
				writing = false
			}
		}
	}
	for {
		wait(false)
		buf := bufs[next]
		if !writing {
			if drop == nil {
				drop = make([]byte, StdioChunk) // the writer may still hold the others
			}
			buf = drop
		}
		n, err := conn.Read(buf)
		if n > 0 && writing {
			select {
			case chunks <- buf[:n]:
				pending++
				next = (next + 1) % len(bufs)
			case <-clientGone:
				writing = false
			}
		}
		if err != nil {
			wait(true) // what was read reaches the client before we return
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

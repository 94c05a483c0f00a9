package sshclient

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/agentd/agent/protocol"
)

// SessionOptions configure RunSession.
type SessionOptions struct {
	// Stdin, Stdout, Stderr, Term, User and NoEscapes are as for
	// RunInteractive; Command, Env and ForwardAgent do not apply.
	InteractiveOptions
	// Name is the session's name in the workspace (protocol.SessionNameRE).
	Name string
	// Workspace names the workspace in messages.
	Workspace string
	// Dial connects to the workspace's SSH server; first is true for the
	// first attach, whose ctx carries the caller's own time limit. Later
	// attempts (reconnects) get a ctx bounded by ReconnectTimeout.
	Dial func(ctx context.Context, first bool) (net.Conn, error)
	// KeepaliveInterval is how often an idle connection is probed; when no
	// answer came for DeadAfter, the connection is given up and the client
	// reconnects. Defaults: 5 s and 15 s.
	KeepaliveInterval time.Duration
	DeadAfter         time.Duration
	// ReconnectTimeout bounds one reconnect attempt; default 15 s.
	ReconnectTimeout time.Duration
}

// ErrSessionsUnsupported says the workspace's agent predates reconnecting
// sessions; a plain session (RunInteractive) still works.
var ErrSessionsUnsupported = errors.New("the workspace's agent does not offer reconnecting sessions (it is older than this client)")

// RefusedError is the workspace's refusal of an attach: the session ended
// or its name is wrong. Trying again does not help.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "the workspace refused the session: " + e.Reason }

// Reconnect backoff: the first retry comes quickly (a blip), later ones
// at most every maxBackoff.
const (
	minBackoff = 250 * time.Millisecond
	maxBackoff = 4 * time.Second
)

// RunSession runs a reconnecting terminal session: the shell runs in the
// workspace under opts.Name and outlives this connection. When the
// connection is lost (no answer to keepalives for DeadAfter, or it broke),
// RunSession prints one line, keeps reconnecting with backoff, and on
// success reattaches: the workspace replays what was printed meanwhile,
// from the byte offset this client has shown, and the foreground program
// is told to redraw. It returns the shell's exit status when it ends, or
// ErrEscapeDisconnect after ~.; ctx's cancellation ends it too.
func RunSession(ctx context.Context, opts SessionOptions) (int, error) {
	if err := protocol.ValidSessionName(opts.Name); err != nil {
		return 255, err
	}
	opts.setDefaults()
	if opts.KeepaliveInterval <= 0 {
		opts.KeepaliveInterval = 5 * time.Second
	}
	if opts.DeadAfter <= 0 {
		opts.DeadAfter = 15 * time.Second
	}
	if opts.ReconnectTimeout <= 0 {
		opts.ReconnectTimeout = 15 * time.Second
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	r := &reattacher{opts: opts, escaped: make(chan struct{})}

	att, err := r.attach(ctx, true)
	if err != nil {
		return 255, err
	}
	inFd := int(opts.Stdin.Fd())
	var stdin io.Reader = opts.Stdin
	if term.IsTerminal(inFd) {
		state, err := term.MakeRaw(inFd)
		if err != nil {
			att.close()
			return 255, fmt.Errorf("put the local terminal in raw mode: %w", err)
		}
		defer func() { _ = term.Restore(inFd, state) }()
		if !opts.NoEscapes {
			stdin = newEscapeReader(opts.Stdin, opts.Stderr, func() {
				close(r.escaped)
				cancel()
			})
		}
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, unix.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				r.windowChanged()
			}
		}()
	}
	go r.pumpInput(stdin)

	for {
		code, ended := r.stream(att)
		if ended {
			return code, nil
		}
		select {
		case <-r.escaped:
			return 255, ErrEscapeDisconnect
		default:
		}
		if ctx.Err() != nil {
			return 255, ctx.Err()
		}
		fmt.Fprintf(opts.Stderr, "\r\nagent: connection to workspace %q lost; reconnecting... (~. to quit; session %q keeps running there)\r\n", opts.Workspace, opts.Name)
		if att, err = r.reconnect(ctx); err != nil {
			select {
			case <-r.escaped:
				return 255, ErrEscapeDisconnect
			default:
			}
			return 255, err
		}
	}
}

// reattacher is one RunSession: the output offset it has shown and the
// attachment its keystrokes go to.
type reattacher struct {
	opts    SessionOptions
	escaped chan struct{}
	offset  uint64 // bytes of the session's output written to Stdout

	mu  sync.Mutex
	cur *attachment // nil while disconnected
}

// attachment is one connection attached to the session.
type attachment struct {
	ch       gossh.Channel
	close    func()
	reqsDone chan struct{}
	exit     chan int // the exit status, if the session ended
}

// attach connects, asks for the session at r.offset and reads the
// server's header, reporting output that fell out of its scrollback.
func (r *reattacher) attach(ctx context.Context, first bool) (*attachment, error) {
	dctx, cancel := ctx, context.CancelFunc(func() {})
	if !first {
		dctx, cancel = context.WithTimeout(ctx, r.opts.ReconnectTimeout)
	}
	defer cancel()
	conn, err := r.opts.Dial(dctx, first)
	if err != nil {
		return nil, err
	}
	if d, ok := dctx.Deadline(); ok {
		_ = conn.SetDeadline(d) // bounds the handshake; dial clears it
	}
	client, closeClient, err := dial(ctx, conn, r.opts.User)
	if err != nil {
		return nil, err
	}
	// The rest of the attach is bounded the same way.
	stop := context.AfterFunc(dctx, closeClient)
	defer stop()
	cols, rows := terminalSize(r.opts.Stdout, r.opts.Stdin)
	req := protocol.SessionAttach{
		Name:   r.opts.Name,
		Offset: r.offset,
		Create: first,
		Term:   r.opts.Term,
		Cols:   uint32(cols),
		Rows:   uint32(rows),
		Modes:  encodeModes(terminalModes),
	}
	ch, reqs, err := client.OpenChannel(protocol.SessionAttachChannel, gossh.Marshal(&req))
	if err != nil {
		closeClient()
		var oce *gossh.OpenChannelError
		if errors.As(err, &oce) {
			if oce.Reason == gossh.UnknownChannelType {
				return nil, ErrSessionsUnsupported
			}
			return nil, &RefusedError{Reason: oce.Message}
		}
		if dctx.Err() != nil {
			return nil, fmt.Errorf("attach to session %q: %w", r.opts.Name, context.Cause(dctx))
		}
		return nil, fmt.Errorf("attach to session %q: %w", r.opts.Name, err)
	}
	att := &attachment{ch: ch, close: closeClient, reqsDone: make(chan struct{}), exit: make(chan int, 1)}
	go att.serveRequests(reqs)
	var hdr [protocol.SessionAttachHeaderLen]byte
	if _, err := io.ReadFull(ch, hdr[:]); err != nil {
		closeClient()
		return nil, fmt.Errorf("attach to session %q: the workspace closed the channel (%w)", r.opts.Name, err)
	}
	if start := binary.BigEndian.Uint64(hdr[:]); start > r.offset {
		fmt.Fprintf(r.opts.Stderr, "\r\nagent: %d bytes of output were lost while disconnected (more than the workspace keeps)\r\n", start-r.offset)
		r.offset = start
	}
	// Keystrokes go here from now on, typed-ahead ones included.
	r.mu.Lock()
	r.cur = att
	r.mu.Unlock()
	return att, nil
}

// serveRequests notes the exit status among the server's requests.
func (a *attachment) serveRequests(reqs <-chan *gossh.Request) {
	defer close(a.reqsDone)
	for req := range reqs {
		switch req.Type {
		case "exit-status":
			var st struct{ Status uint32 }
			if gossh.Unmarshal(req.Payload, &st) == nil {
				a.setExit(int(st.Status))
			}
		case "exit-signal":
			var sig struct {
				Signal     string
				CoreDumped bool
				Message    string
				Lang       string
			}
			if gossh.Unmarshal(req.Payload, &sig) == nil {
				code := 255
				if n := unix.SignalNum("SIG" + sig.Signal); n != 0 {
					code = 128 + int(n)
				}
				a.setExit(code)
			}
		}
		if req.WantReply {
			_ = req.Reply(false, nil)
		}
	}
}

func (a *attachment) setExit(code int) {
	select {
	case a.exit <- code:
	default:
	}
}

// stream shows the session's output until the attachment ends; ended says
// the session itself ended, with its exit status.
func (r *reattacher) stream(att *attachment) (code int, ended bool) {
	stopKeepalive := keepalive(att, r.opts.KeepaliveInterval, r.opts.DeadAfter)
	buf := make([]byte, 32<<10)
	for {
		n, err := att.ch.Read(buf)
		if n > 0 {
			if _, werr := r.opts.Stdout.Write(buf[:n]); werr == nil {
				r.offset += uint64(n)
			}
		}
		if err != nil {
			break
		}
	}
	stopKeepalive()
	r.mu.Lock()
	r.cur = nil
	r.mu.Unlock()
	// The exit status precedes the close; its request may still be on
	// its way through the connection's dispatcher.
	select {
	case <-att.reqsDone:
	case <-time.After(time.Second):
	}
	att.close()
	select {
	case code := <-att.exit:
		return code, true
	default:
		return 0, false
	}
}

// keepalive asks the server to answer every interval and gives the
// connection up (closing it) when nothing came back for deadAfter: over a
// tailnet whose path is gone, TCP alone would wait many minutes.
func keepalive(att *attachment, interval, deadAfter time.Duration) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		answered := make(chan struct{}, 1)
		last := time.Now()
		for {
			select {
			case <-done:
				return
			case <-answered:
				last = time.Now()
			case <-t.C:
				if time.Since(last) > deadAfter {
					att.close()
					return
				}
				go func() {
					// Any answer, even "unknown request", proves the
					// connection alive.
					if _, err := att.ch.SendRequest("keepalive@openssh.com", true, nil); err == nil {
						select {
						case answered <- struct{}{}:
						default:
						}
					}
				}()
			}
		}
	}()
	return func() { close(done) }
}

// reconnect attaches again, with backoff, until it works, the session is
// refused (it ended meanwhile), or ctx ends.
func (r *reattacher) reconnect(ctx context.Context) (*attachment, error) {
	backoff := minBackoff
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(backoff):
		}
		att, err := r.attach(ctx, false)
		if err == nil {
			return att, nil
		}
		var refused *RefusedError
		if errors.As(err, &refused) || errors.Is(err, ErrSessionsUnsupported) {
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

// pumpInput sends keystrokes to the attached session; while disconnected
// they are dropped (but ~. is still read).
func (r *reattacher) pumpInput(in io.Reader) {
	buf := make([]byte, 4096)
	for {
		n, err := in.Read(buf)
		if n > 0 {
			r.mu.Lock()
			if r.cur != nil {
				_, _ = r.cur.ch.Write(buf[:n])
			}
			r.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// windowChanged passes the local terminal's new size on.
func (r *reattacher) windowChanged() {
	cols, rows := terminalSize(r.opts.Stdout, r.opts.Stdin)
	r.mu.Lock()
	att := r.cur
	r.mu.Unlock()
	if att != nil {
		_, _ = att.ch.SendRequest("window-change", false, gossh.Marshal(struct{ Cols, Rows, W, H uint32 }{uint32(cols), uint32(rows), 0, 0}))
	}
}

// encodeModes writes terminal modes as a pty-req carries them (RFC 4254
// section 8): opcode byte, uint32 value, ending with TTY_OP_END.
func encodeModes(modes gossh.TerminalModes) string {
	var b []byte
	for k, v := range modes {
		b = append(b, k)
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return string(append(b, 0))
}

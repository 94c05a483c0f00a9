package sshd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/agentd/agent/metrics"
	"github.com/agentd/agent/protocol"
)

// DefaultSessionIdleTimeout is how long a reconnecting terminal session
// with no client attached keeps running before it is hung up: long enough
// for a laptop's lunch break or a train tunnel, short enough that
// forgotten shells do not pile up.
const DefaultSessionIdleTimeout = time.Hour

// scrollbackSize is how much of a reconnecting session's output the server
// keeps for replay: a client that was away while more was printed is told
// how much it missed.
const scrollbackSize = 1 << 20

// sessionRegistry holds the reconnecting terminal sessions by name. They
// belong to the server, not to a connection: a connection that dies
// detaches its client and the shell keeps running.
type sessionRegistry struct {
	logger *slog.Logger
	idle   time.Duration

	mu     sync.Mutex
	closed bool
	byName map[string]*persistentSession
	wg     sync.WaitGroup // one per session until its process was reaped
}

func newSessionRegistry(logger *slog.Logger, idle time.Duration) *sessionRegistry {
	if idle <= 0 {
		idle = DefaultSessionIdleTimeout
	}
	return &sessionRegistry{logger: logger, idle: idle, byName: map[string]*persistentSession{}}
}

// persistentSession is one reconnecting terminal: a shell on a PTY whose
// output goes into a scrollback ring that attached clients read from, each
// at its own offset.
type persistentSession struct {
	reg    *sessionRegistry
	name   string
	logger *slog.Logger
	cmd    *exec.Cmd
	master *os.File

	mu       sync.Mutex
	changed  *sync.Cond // output arrived, the process ended or a client left
	out      ring
	done     bool // all output is in the ring and the process was reaped
	code     int
	signal   string
	attached int
	idle     *time.Timer // runs while no client is attached
	reaped   chan struct{}
}

// handleSessionAttach serves a session-attach@agentd channel: it attaches
// the client to the named session (starting it if asked), replays what
// the client has not seen and then streams output live until the channel
// or the session ends.
func (c *serverConn) handleSessionAttach(_ *gossh.ServerConn, nch gossh.NewChannel) {
	var req protocol.SessionAttach
	if err := gossh.Unmarshal(nch.ExtraData(), &req); err != nil {
		_ = nch.Reject(gossh.Prohibited, "malformed "+protocol.SessionAttachChannel+" request: "+err.Error())
		return
	}
	if err := protocol.ValidSessionName(req.Name); err != nil {
		_ = nch.Reject(gossh.Prohibited, err.Error())
		return
	}
	ps, err := c.srv.sessions.attach(c, req)
	if err != nil {
		_ = nch.Reject(gossh.ConnectionFailed, err.Error())
		return
	}
	defer ps.detach()
	// Counted as a shell while a client is attached: a detached session
	// holds no connection and is not an SSH session any more.
	defer c.srv.opts.Metrics.SSHSessionStarted(metrics.SSHShell)()
	ch, reqs, err := nch.Accept()
	if err != nil {
		return
	}
	defer ch.Close()
	start := ps.replayStart(req.Offset)
	var hdr [protocol.SessionAttachHeaderLen]byte
	binary.BigEndian.PutUint64(hdr[:], start)
	if _, err := ch.Write(hdr[:]); err != nil {
		return
	}
	logger := ps.logger.With("peer", c.peer)
	logger.Info("terminal session attached", "offset", req.Offset, "replay_from", start)
	// The client's window may differ from the last one; and a program
	// that drew a full screen must draw it again for the new client.
	ps.resize(windowChange{Cols: req.Cols, Rows: req.Rows}, true)

	gone := make(chan struct{})
	go func() {
		for r := range reqs {
			ok := false
			if r.Type == "window-change" {
				var w windowChange
				if ok = gossh.Unmarshal(r.Payload, &w) == nil; ok {
					ps.resize(w, false)
				}
			}
			if r.WantReply {
				_ = r.Reply(ok, nil)
			}
		}
		close(gone)
		ps.wake()
	}()
	go func() {
		// Keystrokes go to the terminal; EOF from the client only means it
		// has nothing more to type.
		_, _ = io.Copy(ps.master, ch)
	}()
	if ps.stream(ch, start, gone) {
		code, signal := ps.exit()
		sendExit(ch, code, signal)
		_ = ch.CloseWrite()
		c.srv.sessions.remove(ps)
		logger.Info("terminal session ended", "exit", code, "signal", signal)
		return
	}
	logger.Info("terminal session detached; it keeps running", "idle_timeout", c.srv.sessions.idle.String())
}

// attach finds the named session or starts it, and counts the client.
func (r *sessionRegistry) attach(c *serverConn, req protocol.SessionAttach) (*persistentSession, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, errors.New("the workspace's agent is shutting down")
	}
	ps := r.byName[req.Name]
	if ps == nil {
		if !req.Create {
			return nil, fmt.Errorf("session %q no longer exists in this workspace: its shell ended, or no client was attached for longer than %s (agent run --session-idle-timeout)", req.Name, r.idle)
		}
		var err error
		if ps, err = r.start(c, req); err != nil {
			return nil, err
		}
		r.byName[req.Name] = ps
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if req.Offset > ps.out.end {
		return nil, fmt.Errorf("session %q has printed %d bytes, fewer than the %d this client saw: it is a new session of the same name", req.Name, ps.out.end, req.Offset)
	}
	ps.attached++
	if ps.idle != nil {
		ps.idle.Stop()
		ps.idle = nil
	}
	return ps, nil
}

// start runs the login shell on a new PTY; r.mu is held.
func (r *sessionRegistry) start(c *serverConn, req protocol.SessionAttach) (*persistentSession, error) {
	// The environment and working directory are those of a plain PTY
	// session from the same client.
	shim := &session{c: c, isPty: true, pty: ssh.Pty{Term: req.Term}}
	acct := c.srv.account
	cmd := &exec.Cmd{
		Path: acct.Shell,
		Args: []string{"-" + filepath.Base(acct.Shell)},
		Dir:  shim.workDir(),
		Env:  shim.environment(nil),
	}
	master, tty, err := pty.Open()
	if err != nil {
		return nil, fmt.Errorf("open a pseudo-terminal: %w", err)
	}
	if err := setWinsize(tty, windowChange{Cols: req.Cols, Rows: req.Rows}); err != nil {
		c.logger.Debug("set PTY size", "err", err)
	}
	if err := applyTerminalModes(tty, []byte(req.Modes)); err != nil {
		c.logger.Debug("apply terminal modes", "err", err)
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	err = cmd.Start()
	tty.Close()
	if err != nil {
		master.Close()
		return nil, fmt.Errorf("start %s: %w", acct.Shell, err)
	}
	ps := &persistentSession{
		reg:    r,
		name:   req.Name,
		logger: r.logger.With("session_name", req.Name, "pid", cmd.Process.Pid),
		cmd:    cmd,
		master: master,
		out:    ring{size: scrollbackSize},
		reaped: make(chan struct{}),
	}
	ps.changed = sync.NewCond(&ps.mu)
	if motd := c.srv.motd(); len(motd) > 0 {
		ps.out.write(motd)
	}
	ps.logger.Info("terminal session started", "peer", c.peer)
	r.wg.Add(1)
	go ps.run()
	return ps, nil
}

// run copies the terminal's output into the ring until the shell has
// ended, then records how it ended.
func (ps *persistentSession) run() {
	defer ps.reg.wg.Done()
	defer close(ps.reaped)
	output := make(chan struct{})
	go func() {
		defer close(output)
		buf := make([]byte, 32<<10)
		for {
			n, err := ps.master.Read(buf)
			if n > 0 {
				ps.mu.Lock()
				ps.out.write(buf[:n])
				ps.changed.Broadcast()
				ps.mu.Unlock()
			}
			if err != nil {
				return
			}
		}
	}()
	state, _ := waitState(ps.cmd)
	select {
	case <-output:
	case <-time.After(drainAfterExit):
		// A background job still holds the terminal open.
		ps.master.Close()
		<-output
	}
	ps.master.Close()
	code, signal := exitOf(state)
	ps.mu.Lock()
	ps.done, ps.code, ps.signal = true, code, signal
	ps.changed.Broadcast()
	ps.mu.Unlock()
}

// replayStart is where a client that has seen offset bytes resumes: there,
// or at the oldest byte still kept.
func (ps *persistentSession) replayStart(offset uint64) uint64 {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return max(offset, ps.out.start())
}

// stream writes the session's output from off to w until the session
// ended (true: all output was written) or the client went away or fell
// more than the scrollback behind (false: it may come back with its offset
// and is told what it missed).
func (ps *persistentSession) stream(w io.Writer, off uint64, gone <-chan struct{}) bool {
	buf := make([]byte, 32<<10)
	for {
		ps.mu.Lock()
		for off == ps.out.end && !ps.done && !closed(gone) {
			ps.changed.Wait()
		}
		if closed(gone) || off < ps.out.start() {
			ps.mu.Unlock()
			return false
		}
		if off == ps.out.end {
			ps.mu.Unlock()
			return true
		}
		n := ps.out.read(off, buf)
		ps.mu.Unlock()
		if _, err := w.Write(buf[:n]); err != nil {
			return false
		}
		off += uint64(n)
	}
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (ps *persistentSession) wake() {
	ps.mu.Lock()
	ps.changed.Broadcast()
	ps.mu.Unlock()
}

func (ps *persistentSession) exit() (int, string) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.code, ps.signal
}

// resize sets the terminal's size; with redraw, the foreground job gets
// SIGWINCH even when the size did not change (the kernel only signals a
// change), so full-screen programs draw their screen again.
func (ps *persistentSession) resize(w windowChange, redraw bool) {
	if w.Cols == 0 || w.Rows == 0 {
		return
	}
	if err := setWinsize(ps.master, w); err != nil || !redraw {
		return
	}
	rc, err := ps.master.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		if pgrp, err := unix.IoctlGetInt(int(fd), unix.TIOCGPGRP); err == nil && pgrp > 0 {
			_ = unix.Kill(-pgrp, unix.SIGWINCH)
		}
	})
}

// detach uncounts a client; the last one to leave starts the idle timer.
func (ps *persistentSession) detach() {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.attached--
	if ps.attached == 0 {
		ps.idle = time.AfterFunc(ps.reg.idle, func() { ps.reg.expire(ps) })
	}
}

// expire ends a session that stayed without a client for the idle time.
func (r *sessionRegistry) expire(ps *persistentSession) {
	r.mu.Lock()
	ps.mu.Lock()
	idle := ps.attached == 0 && r.byName[ps.name] == ps
	ps.mu.Unlock()
	if idle {
		delete(r.byName, ps.name)
	}
	r.mu.Unlock()
	if idle {
		ps.logger.Info("terminal session expired: no client attached", "idle_timeout", r.idle.String())
		ps.hangup()
	}
}

// remove forgets a session whose end was delivered to a client.
func (r *sessionRegistry) remove(ps *persistentSession) {
	r.mu.Lock()
	if r.byName[ps.name] == ps {
		delete(r.byName, ps.name)
	}
	r.mu.Unlock()
}

// hangup ends the session's processes as a closed terminal would: SIGHUP
// and SIGCONT to its process group, and SIGKILL after killGrace for what
// ignored them.
func (ps *persistentSession) hangup() {
	pgid := ps.cmd.Process.Pid
	if !closed(ps.reaped) {
		_ = unix.Kill(-pgid, unix.SIGHUP)
		_ = unix.Kill(-pgid, unix.SIGCONT)
	}
	ps.master.Close()
	go func() {
		select {
		case <-ps.reaped:
		case <-time.After(killGrace):
			_ = unix.Kill(-pgid, unix.SIGKILL)
		}
	}()
}

// close hangs up every session and waits until their shells are gone.
func (r *sessionRegistry) close() {
	r.mu.Lock()
	r.closed = true
	all := make([]*persistentSession, 0, len(r.byName))
	for _, ps := range r.byName {
		all = append(all, ps)
	}
	clear(r.byName)
	r.mu.Unlock()
	for _, ps := range all {
		ps.mu.Lock()
		if ps.idle != nil {
			ps.idle.Stop()
		}
		ps.mu.Unlock()
		ps.hangup()
	}
	r.wg.Wait()
}

// ring is a session's scrollback: the last size bytes of its output, with
// end counting every byte ever written.
type ring struct {
	buf  []byte
	size int
	end  uint64
}

func (r *ring) start() uint64 { return r.end - uint64(len(r.buf)) }

func (r *ring) write(p []byte) {
	for len(p) > 0 {
		var n int
		if len(r.buf) < r.size {
			n = min(len(p), r.size-len(r.buf))
			r.buf = append(r.buf, p[:n]...)
		} else {
			n = copy(r.buf[r.end%uint64(r.size):], p)
		}
		r.end += uint64(n)
		p = p[n:]
	}
}

// read copies bytes from offset off (start() <= off < end) into p.
func (r *ring) read(off uint64, p []byte) int {
	pos := int(off % uint64(r.size))
	n := min(len(p), int(r.end-off), len(r.buf)-pos)
	return copy(p, r.buf[pos:pos+n])
}

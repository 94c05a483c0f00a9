package sshd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/gliderlabs/ssh"
	"github.com/pkg/sftp"
	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/agentd/agent/metrics"
)

// killGrace is how long a session's processes get after SIGHUP (client
// gone) before the process group is killed outright.
const killGrace = 5 * time.Second

// drainAfterExit bounds how long a PTY session keeps reading output after
// its shell exited while something else still holds the terminal open
// (a background job), as OpenSSH does not wait for those either.
const drainAfterExit = time.Second

type session struct {
	c      *serverConn
	logger *slog.Logger
	// ch is the session's channel itself. Output goes to it directly:
	// gliderlabs' Session.Write turns every \n into \r\n once a PTY was
	// requested, which would corrupt raw-mode terminal output, and the exit
	// status must precede EOF.
	ch gossh.Channel

	// Written by watch, before gliderlabs sees the request, and read after
	// the session started.
	modes      string        // the pty-req's terminal modes
	sawPty     bool          // a pty-req was seen
	pendingWin *windowChange // the latest window-change before the start
	wantAgent  bool

	// Written by allow in gliderlabs' request loop before the handler
	// starts; decided is closed once the first shell, exec or subsystem
	// request was accepted or refused.
	decided     chan struct{}
	decidedOnce sync.Once
	accepted    atomic.Bool
	kind        string // shell, exec or subsystem
	pty         ssh.Pty
	isPty       bool
	winch       <-chan ssh.Window

	// Set by the handler; read by handleSession after handlerDone.
	handlerDone chan struct{}
	start       time.Time
	ended       func() // ends the session in the metrics
	agent       *agentForward

	// Set once the process has started; read by the request loop and hangup.
	mu       sync.Mutex
	gone     bool          // the channel closed: nothing may start any more
	lastWin  *windowChange // the latest window change after the start
	cmd      *exec.Cmd
	master   *os.File    // PTY master, nil without a PTY
	outputs  []*os.File  // pipe read ends without a PTY
	exited   atomic.Bool // the session's leader has been reaped
	drained  atomic.Bool // all output was copied to the client
	finished chan struct{}
}

// handleSession serves one "session" channel with gliderlabs' session
// handler, giving it handlers bound to this session.
func (c *serverConn) handleSession(sconn *gossh.ServerConn, nch gossh.NewChannel) {
	if c.noMoreSessions.Load() {
		_ = nch.Reject(gossh.Prohibited, "no-more-sessions was requested on this connection")
		return
	}
	s := &session{
		c:           c,
		logger:      c.logger,
		decided:     make(chan struct{}),
		handlerDone: make(chan struct{}),
		finished:    make(chan struct{}),
	}
	// A Server value per session, carrying only what DefaultSessionHandler
	// reads (its handlers), so that they know their session.
	per := &ssh.Server{
		Handler:                s.run,
		SubsystemHandlers:      map[string]ssh.SubsystemHandler{"sftp": s.runSFTP},
		SessionRequestCallback: s.allow,
	}
	// It returns when the channel is closed: by us after the process
	// finished, or because the client went away.
	ssh.DefaultSessionHandler(per, sconn, watchedChannel{NewChannel: nch, s: s}, c.ctx)
	// In the second case the processes must go too.
	s.hangup()
	if s.accepted.Load() {
		<-s.handlerDone
		s.ended()
	}
	if s.agent != nil {
		s.agent.close()
	}
}

// watchedChannel hands gliderlabs the session's channel and its requests,
// passed through watch.
type watchedChannel struct {
	gossh.NewChannel
	s *session
}

func (w watchedChannel) Accept() (gossh.Channel, <-chan *gossh.Request, error) {
	ch, in, err := w.NewChannel.Accept()
	if err != nil {
		return nil, nil, err
	}
	w.s.ch = ch
	out := make(chan *gossh.Request)
	go w.s.watch(in, out)
	return ch, out, nil
}

// watch passes the session's requests on to gliderlabs, noting what it
// does not keep: the terminal modes of a pty-req and whether this session
// (not just the connection) asked for agent forwarding. Window changes
// before the start are answered here: gliderlabs queues them for a handler
// that does not run yet, which would block its request loop.
func (s *session) watch(in <-chan *gossh.Request, out chan<- *gossh.Request) {
	defer close(out)
	started := false
	for req := range in {
		switch req.Type {
		case "pty-req":
			var p ptyRequest
			if !started && !s.sawPty && gossh.Unmarshal(req.Payload, &p) == nil {
				s.sawPty, s.modes = true, p.Modes
			}
		case "auth-agent-req@openssh.com":
			if !started {
				s.wantAgent = true
			}
		case "window-change":
			var w windowChange
			if !started {
				ok := s.sawPty && gossh.Unmarshal(req.Payload, &w) == nil
				if ok {
					s.pendingWin = &w
				}
				_ = req.Reply(ok, nil)
				continue
			}
			<-s.decided
			if !s.accepted.Load() {
				_ = req.Reply(false, nil)
				continue
			}
		case "shell", "exec", "subsystem":
			started = true
		}
		out <- req
	}
}

// allow runs in gliderlabs' request loop for a shell, exec or subsystem
// request, before the reply and the handler.
func (s *session) allow(sess ssh.Session, reqType string) bool {
	defer s.decidedOnce.Do(func() { close(s.decided) })
	if reqType == "subsystem" && sess.Subsystem() != "sftp" {
		s.logger.Debug("refused subsystem", "name", sess.Subsystem())
		return false
	}
	s.kind = reqType
	s.pty, s.winch, s.isPty = sess.Pty()
	if s.isPty {
		// Whatever runs (sftp too), window changes must be taken off
		// gliderlabs' queue or its request loop blocks.
		go s.followWindow()
	}
	s.accepted.Store(true)
	return true
}

// run is the gliderlabs handler of a shell or exec session. The request was
// answered before it runs, so the reply always precedes the exit status.
func (s *session) run(sess ssh.Session) {
	defer close(s.handlerDone)
	kind := metrics.SSHExec
	if s.kind == "shell" {
		kind = metrics.SSHShell
	}
	s.ended = s.c.srv.opts.Metrics.SSHSessionStarted(kind)
	stopSignals := s.forwardSignals(sess)
	defer stopSignals()
	started, err := s.begin(sess.RawCommand(), sess.Environ())
	if err != nil {
		shell := s.c.srv.account.Shell
		s.logger.Warn("ssh session could not start", "shell", shell, "err", err)
		fmt.Fprintf(s.ch.Stderr(), "agent: cannot start %s: %v\r\n", shell, err)
		s.finish(127, "")
		return
	}
	if started {
		<-s.finished
	}
}

// followWindow resizes the terminal on every window change until the
// channel closes.
func (s *session) followWindow() {
	<-s.winch // the pty-req's own size, which the terminal starts with
	for w := range s.winch {
		s.resize(windowChange{Cols: uint32(w.Width), Rows: uint32(w.Height)})
	}
}

// forwardSignals delivers the client's "signal" requests to the process.
func (s *session) forwardSignals(sess ssh.Session) (stop func()) {
	sigs := make(chan ssh.Signal, 8)
	done := make(chan struct{})
	sess.Signals(sigs)
	go func() {
		for {
			select {
			case sig := <-sigs:
				s.signal(string(sig))
			case <-done:
				return
			}
		}
	}()
	return func() {
		// Unregister first: gliderlabs sends while holding the session's
		// lock, so the loop must keep receiving until then.
		sess.Signals(nil)
		close(done)
	}
}

func (s *session) resize(w windowChange) {
	s.mu.Lock()
	s.lastWin = &w // for a terminal still being opened
	master := s.master
	s.mu.Unlock()
	if master != nil {
		_ = setWinsize(master, w)
	}
}

// setWinsize resizes the terminal; the kernel sends SIGWINCH to its
// foreground job. It goes through SyscallConn rather than Fd, which would
// switch the master to blocking mode and race with Close.
func setWinsize(f *os.File, w windowChange) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	ws := &unix.Winsize{Row: uint16(w.Rows), Col: uint16(w.Cols), Xpixel: uint16(w.WidthPx), Ypixel: uint16(w.HeightPx)}
	var ioErr error
	if err := rc.Control(func(fd uintptr) { ioErr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, ws) }); err != nil {
		return err
	}
	return ioErr
}

// signal delivers a client's "signal" request to the session's process, as
// OpenSSH does (the leader only; a PTY's line discipline handles ^C itself).
func (s *session) signal(name string) bool {
	sig := unix.SignalNum("SIG" + name)
	if sig == 0 {
		return false
	}
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd == nil || s.exited.Load() {
		return false
	}
	return cmd.Process.Signal(sig) == nil
}

// hangup runs when the channel is gone. Nothing starts after it. If the
// session's processes are still running (the client disconnected), their
// process group gets SIGHUP and SIGCONT (stopped jobs must wake up to die),
// the PTY and pipes are closed, and after killGrace whatever ignored SIGHUP
// is killed.
func (s *session) hangup() {
	s.mu.Lock()
	s.gone = true
	cmd, master, outputs := s.cmd, s.master, s.outputs
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	if s.exited.Load() && s.drained.Load() {
		return
	}
	// Either the leader still runs, or it exited and members of its group
	// still hold the output open; the group ID cannot have been reused
	// while they exist.
	pgid := cmd.Process.Pid
	_ = unix.Kill(-pgid, unix.SIGHUP)
	_ = unix.Kill(-pgid, unix.SIGCONT)
	if master != nil {
		master.Close()
	}
	for _, f := range outputs {
		f.Close()
	}
	s.logger.Info("ssh client went away; hung up the session", "pgid", pgid)
	go func() {
		select {
		case <-s.finished:
		case <-time.After(killGrace):
			if !s.exited.Load() {
				_ = unix.Kill(-pgid, unix.SIGKILL)
			}
		}
	}()
}

func (s *session) environment(clientEnv []string) []string {
	acct := s.c.srv.account
	env := newEnvList()
	env.AddAll(s.c.srv.baseEnv, func(k string) bool { return k == "TERM" || k == "SSH_AUTH_SOCK" })
	env.Set("HOME", acct.Home)
	env.Set("USER", acct.Name)
	env.Set("LOGNAME", acct.Name)
	env.Set("SHELL", acct.Shell)
	env.SetDefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	env.AddAll(clientEnv, nil)
	rh, rp := splitAddr(s.c.nc.RemoteAddr())
	lh, lp := splitAddr(s.c.nc.LocalAddr())
	env.Set("SSH_CLIENT", fmt.Sprintf("%s %d %d", rh, rp, lp))
	env.Set("SSH_CONNECTION", fmt.Sprintf("%s %d %s %d", rh, rp, lh, lp))
	if s.isPty {
		term := s.pty.Term
		if term == "" {
			term = "xterm-256color"
		}
		env.Set("TERM", term)
	}
	if s.agent != nil {
		env.Set("SSH_AUTH_SOCK", s.agent.path)
	}
	return env.Environ()
}

func (s *session) workDir() string {
	home := s.c.srv.account.Home
	if fi, err := os.Stat(home); err == nil && fi.IsDir() {
		return home
	}
	return "/"
}

// begin starts the shell or command and a goroutine that runs it to the
// end, closing finished. It starts nothing, and returns false, once the
// client has gone.
func (s *session) begin(command string, clientEnv []string) (bool, error) {
	s.start = time.Now()
	shell := s.c.srv.account.Shell
	s.logger = s.logger.With("session", s.kind, "pty", s.isPty)
	if s.wantAgent {
		af, err := s.c.startAgentForward()
		if err != nil {
			s.logger.Warn("agent forwarding unavailable", "err", err)
		} else {
			s.agent = af
		}
	}

	cmd := &exec.Cmd{Path: shell, Dir: s.workDir(), Env: s.environment(clientEnv)}
	if s.kind == "shell" {
		// A leading dash makes it a login shell, which reads the profile.
		cmd.Args = []string{"-" + filepath.Base(shell)}
	} else {
		cmd.Args = []string{filepath.Base(shell), "-c", command}
		s.logger.Debug("ssh exec", "command", command)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return false, nil
	}
	var err error
	if s.isPty {
		err = s.startPTY(cmd, s.kind == "shell")
	} else {
		err = s.startPipes(cmd)
	}
	if err != nil {
		return false, err
	}
	s.logger.Info("ssh session started", "pid", cmd.Process.Pid)
	return true, nil
}

// startPTY runs cmd on a new terminal; s.mu is held.
func (s *session) startPTY(cmd *exec.Cmd, login bool) error {
	master, tty, err := pty.Open()
	if err != nil {
		return fmt.Errorf("open a pseudo-terminal: %w", err)
	}
	size := windowChange{Cols: uint32(s.pty.Window.Width), Rows: uint32(s.pty.Window.Height)}
	if s.lastWin != nil {
		size = *s.lastWin
	} else if s.pendingWin != nil {
		size = *s.pendingWin
	}
	if err := setWinsize(tty, size); err != nil {
		s.logger.Debug("set PTY size", "err", err)
	}
	if err := applyTerminalModes(tty, []byte(s.modes)); err != nil {
		s.logger.Debug("apply terminal modes", "err", err)
	}
	if login {
		s.showMOTD()
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	// A new session with the PTY as its controlling terminal: job control
	// works, and closing the PTY hangs up exactly this session.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	err = cmd.Start()
	tty.Close()
	if err != nil {
		master.Close()
		return err
	}
	s.cmd, s.master = cmd, master

	output := make(chan struct{})
	go func() {
		defer close(output)
		_, _ = io.Copy(s.ch, master)
	}()
	go func() {
		_, _ = io.Copy(master, s.ch)
	}()
	go func() {
		defer close(s.finished)
		state, _ := waitState(cmd)
		s.exited.Store(true)
		select {
		case <-output:
		case <-time.After(drainAfterExit):
			master.Close()
			<-output
		}
		master.Close()
		s.drained.Store(true)
		s.finishState(state)
	}()
	return nil
}

// startPipes runs cmd with pipes for stdin, stdout and stderr; s.mu is held.
func (s *session) startPipes(cmd *exec.Cmd) error {
	inR, inW, err := os.Pipe()
	if err != nil {
		return err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		outR.Close()
		outW.Close()
		return err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	inR.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		errR.Close()
		return err
	}
	s.cmd, s.outputs = cmd, []*os.File{outR, errR}

	go func() {
		// EOF from the client reaches the command as EOF on its stdin.
		_, _ = io.Copy(inW, s.ch)
		inW.Close()
	}()
	// Bulk output (ssh host 'tar c .' > x) moves in large pieces: a 1 MiB
	// pipe and a 256 KiB copy buffer mean far fewer wake-ups per byte than
	// the 64 KiB default pipe.
	growPipe(outR)
	var copies sync.WaitGroup
	copies.Add(2)
	go func() {
		defer copies.Done()
		_, _ = io.CopyBuffer(s.ch, onlyReader{outR}, make([]byte, 256<<10))
	}()
	go func() {
		defer copies.Done()
		_, _ = io.Copy(s.ch.Stderr(), errR)
	}()
	go func() {
		defer close(s.finished)
		state, _ := waitState(cmd)
		s.exited.Store(true)
		// Like OpenSSH, wait until everything holding stdout/stderr closed
		// them; hangup closes the pipes if the client leaves first.
		copies.Wait()
		outR.Close()
		errR.Close()
		s.drained.Store(true)
		s.finishState(state)
	}()
	return nil
}

func waitState(cmd *exec.Cmd) (*os.ProcessState, error) {
	err := cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return cmd.ProcessState, err
	}
	return cmd.ProcessState, nil
}

// finishState reports how the process ended: exit-status, or exit-signal
// for a process killed by a signal (OpenSSH's client then prints
// "killed by signal" and exits 255).
func (s *session) finishState(state *os.ProcessState) {
	s.finish(exitOf(state))
}

// exitOf is the exit code of a process and, if a signal killed it, the
// signal's name.
func exitOf(state *os.ProcessState) (int, string) {
	if state == nil {
		return 255, ""
	}
	ws, ok := state.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		name := strings.TrimPrefix(unix.SignalName(ws.Signal()), "SIG")
		if name == "" {
			name = strconv.Itoa(int(ws.Signal()))
		}
		return 128 + int(ws.Signal()), name
	}
	return state.ExitCode(), ""
}

// The status goes out before EOF, as with OpenSSH's sshd: a client that
// closes on EOF (scp's sftp mode) would otherwise miss it.
func (s *session) finish(code int, signal string) {
	sendExit(s.ch, code, signal)
	_ = s.ch.CloseWrite()
	s.ch.Close()
	s.logger.Info("ssh session ended", "exit", code, "signal", signal,
		"duration", time.Since(s.start).Round(time.Millisecond).String())
}

// sendExit sends exit-status, or exit-signal for a process killed by a
// signal.
func sendExit(ch gossh.Channel, code int, signal string) {
	if signal != "" {
		coreDumped := false
		_, _ = ch.SendRequest("exit-signal", false, gossh.Marshal(struct {
			Signal     string
			CoreDumped bool
			Message    string
			Lang       string
		}{signal, coreDumped, "", ""}))
		return
	}
	_, _ = ch.SendRequest("exit-status", false, gossh.Marshal(struct{ Status uint32 }{uint32(code)}))
}

// showMOTD writes the message of the day for an interactive login, unless
// the user asked for quiet with ~/.hushlogin, as login(1) does.
func (s *session) showMOTD() {
	if motd := s.c.srv.motd(); len(motd) > 0 {
		_, _ = s.ch.Write(motd)
	}
}

// motd is the message of the day with \r\n line ends, or nothing.
func (srv *Server) motd() []byte {
	if _, err := os.Stat(filepath.Join(srv.account.Home, ".hushlogin")); err == nil {
		return nil
	}
	motd, err := os.ReadFile(srv.opts.MOTDPath)
	if err != nil || len(motd) == 0 {
		return nil
	}
	// The PTY's output processing does not apply to what we write directly.
	return bytes.ReplaceAll(bytes.ReplaceAll(motd, []byte("\r\n"), []byte("\n")), []byte("\n"), []byte("\r\n"))
}

// runSFTP is the gliderlabs handler of the sftp subsystem: pkg/sftp's
// server in process, on the channel itself.
func (s *session) runSFTP(ssh.Session) {
	defer close(s.handlerDone)
	s.ended = s.c.srv.opts.Metrics.SSHSessionStarted(metrics.SSHSFTP)
	s.start = time.Now()
	s.logger = s.logger.With("session", "sftp")
	s.logger.Info("ssh session started")
	// WithAllocator: each request's 256 KiB buffer is reused once its
	// answer is out instead of being left to the collector, which an
	// upload kept busy (about a byte of garbage per byte uploaded here).
	srv, err := sftp.NewServer(keepOpen{newSFTPLimits(s.ch)}, sftp.WithServerWorkingDirectory(s.workDir()),
		sftp.WithMaxTxPacket(sftpMaxTransfer), sftp.WithAllocator())
	if err != nil {
		s.finish(1, "")
		return
	}
	err = srv.Serve()
	srv.Close()
	code := 0
	if err != nil && !errors.Is(err, io.EOF) {
		s.logger.Debug("sftp ended", "err", err)
		code = 1
	}
	s.finish(code, "")
}

// keepOpen hides Close from the sftp server, which closes its stream when
// done; the session still has to send the exit status on the channel.
type keepOpen struct{ io.ReadWriter }

func (keepOpen) Close() error { return nil }

// growPipe raises a pipe's capacity to 1 MiB where the kernel allows it
// (an unprivileged process is limited by /proc/sys/fs/pipe-max-size).
func growPipe(f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, 1<<20)
	})
}

// onlyReader hides WriterTo/ReaderFrom so io.CopyBuffer uses our buffer.
type onlyReader struct{ io.Reader }

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
	c         *serverConn
	ch        gossh.Channel
	logger    *slog.Logger
	clientEnv []string
	pty       *ptyRequest
	wantAgent bool
	started   bool
	start     time.Time
	ended     func() // ends the session in the metrics; set when it starts

	// Set once the process has started; read by the request loop and hangup.
	mu       sync.Mutex
	cmd      *exec.Cmd
	master   *os.File   // PTY master, nil without a PTY
	outputs  []*os.File // pipe read ends without a PTY
	agent    *agentForward
	exited   atomic.Bool // the session's leader has been reaped
	drained  atomic.Bool // all output was copied to the client
	finished chan struct{}
}

func (c *serverConn) handleSession(nch gossh.NewChannel) {
	ch, reqs, err := nch.Accept()
	if err != nil {
		return
	}
	s := &session{c: c, ch: ch, logger: c.logger, finished: make(chan struct{})}
	s.serveRequests(reqs)
	// The channel is closed: by us after the process finished, or because
	// the client went away. In the second case the processes must go too.
	s.hangup()
	if s.started {
		<-s.finished
		s.ended()
	}
	if s.agent != nil {
		s.agent.close()
	}
}

func (s *session) serveRequests(reqs <-chan *gossh.Request) {
	for req := range reqs {
		ok := false
		switch req.Type {
		case "env":
			var kv struct{ Name, Value string }
			if gossh.Unmarshal(req.Payload, &kv) == nil && !s.started {
				s.clientEnv = append(s.clientEnv, kv.Name+"="+kv.Value)
				ok = true
			}
		case "pty-req":
			var p ptyRequest
			if gossh.Unmarshal(req.Payload, &p) == nil && !s.started && s.pty == nil {
				s.pty = &p
				ok = true
			}
		case "window-change":
			var w windowChange
			if gossh.Unmarshal(req.Payload, &w) == nil && s.pty != nil {
				s.resize(w)
				ok = true
			}
		case "auth-agent-req@openssh.com":
			if !s.started {
				s.wantAgent = true
				ok = true
			}
		case "signal":
			var sig struct{ Name string }
			if gossh.Unmarshal(req.Payload, &sig) == nil {
				ok = s.signal(sig.Name)
			}
		case "shell", "exec":
			var cmd struct{ Command string }
			if req.Type == "exec" && gossh.Unmarshal(req.Payload, &cmd) != nil {
				break
			}
			if !s.started {
				s.started = true
				kind := metrics.SSHExec
				if req.Type == "shell" {
					kind = metrics.SSHShell
				}
				s.ended = s.c.srv.opts.Metrics.SSHSessionStarted(kind)
				s.begin(req.Type, cmd.Command)
				ok = true
			}
		case "subsystem":
			var sub struct{ Name string }
			if gossh.Unmarshal(req.Payload, &sub) == nil && !s.started && sub.Name == "sftp" {
				s.started = true
				s.ended = s.c.srv.opts.Metrics.SSHSessionStarted(metrics.SSHSFTP)
				go s.runSFTP()
				ok = true
			}
		default:
			// x11-req, break and anything unknown: refused, the session goes on.
			s.logger.Debug("refused session request", "type", req.Type)
		}
		if req.WantReply {
			_ = req.Reply(ok, nil)
		}
	}
}

func (s *session) resize(w windowChange) {
	s.pty.Cols, s.pty.Rows, s.pty.WidthPx, s.pty.HeightPx = w.Cols, w.Rows, w.WidthPx, w.HeightPx
	s.mu.Lock()
	master := s.master
	s.mu.Unlock()
	if master != nil {
		_ = setWinsize(master, s.pty)
	}
}

// setWinsize resizes the terminal; the kernel sends SIGWINCH to its
// foreground job. It goes through SyscallConn rather than Fd, which would
// switch the master to blocking mode and race with Close.
func setWinsize(f *os.File, p *ptyRequest) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	ws := &unix.Winsize{Row: uint16(p.Rows), Col: uint16(p.Cols), Xpixel: uint16(p.WidthPx), Ypixel: uint16(p.HeightPx)}
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

// hangup runs when the channel is gone. If the session's processes are still
// running (the client disconnected), their process group gets SIGHUP and
// SIGCONT (stopped jobs must wake up to die), the PTY and pipes are closed,
// and after killGrace whatever ignored SIGHUP is killed.
func (s *session) hangup() {
	s.mu.Lock()
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

func (s *session) environment() []string {
	acct := s.c.srv.account
	env := newEnvList()
	env.AddAll(s.c.srv.baseEnv, func(k string) bool { return k == "TERM" || k == "SSH_AUTH_SOCK" })
	env.Set("HOME", acct.Home)
	env.Set("USER", acct.Name)
	env.Set("LOGNAME", acct.Name)
	env.Set("SHELL", acct.Shell)
	env.SetDefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	env.AddAll(s.clientEnv, nil)
	rh, rp := splitAddr(s.c.sconn.RemoteAddr())
	lh, lp := splitAddr(s.c.sconn.LocalAddr())
	env.Set("SSH_CLIENT", fmt.Sprintf("%s %d %d", rh, rp, lp))
	env.Set("SSH_CONNECTION", fmt.Sprintf("%s %d %s %d", rh, rp, lh, lp))
	if s.pty != nil {
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

// begin starts the shell or command and a goroutine that runs it to the end.
func (s *session) begin(kind, command string) {
	s.start = time.Now()
	shell := s.c.srv.account.Shell
	s.logger = s.logger.With("session", kind, "pty", s.pty != nil)
	if s.wantAgent {
		af, err := s.c.startAgentForward()
		if err != nil {
			s.logger.Warn("agent forwarding unavailable", "err", err)
		} else {
			s.agent = af
		}
	}

	cmd := &exec.Cmd{Path: shell, Dir: s.workDir(), Env: s.environment()}
	if kind == "shell" {
		// A leading dash makes it a login shell, which reads the profile.
		cmd.Args = []string{"-" + filepath.Base(shell)}
	} else {
		cmd.Args = []string{filepath.Base(shell), "-c", command}
		s.logger.Debug("ssh exec", "command", command)
	}

	var err error
	if s.pty != nil {
		err = s.startPTY(cmd, kind == "shell")
	} else {
		err = s.startPipes(cmd)
	}
	if err != nil {
		s.logger.Warn("ssh session could not start", "shell", shell, "err", err)
		fmt.Fprintf(s.ch.Stderr(), "agent: cannot start %s: %v\r\n", shell, err)
		go func() {
			defer close(s.finished)
			s.finish(127, "")
		}()
		return
	}
	s.logger.Info("ssh session started", "pid", cmd.Process.Pid)
}

func (s *session) startPTY(cmd *exec.Cmd, login bool) error {
	master, tty, err := pty.Open()
	if err != nil {
		return fmt.Errorf("open a pseudo-terminal: %w", err)
	}
	if err := setWinsize(tty, s.pty); err != nil {
		s.logger.Debug("set PTY size", "err", err)
	}
	if err := applyTerminalModes(tty, []byte(s.pty.Modes)); err != nil {
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
	s.mu.Lock()
	s.cmd, s.master = cmd, master
	s.mu.Unlock()

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
	s.mu.Lock()
	s.cmd, s.outputs = cmd, []*os.File{outR, errR}
	s.mu.Unlock()

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
	if state == nil {
		s.finish(255, "")
		return
	}
	ws, ok := state.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		name := strings.TrimPrefix(unix.SignalName(ws.Signal()), "SIG")
		if name == "" {
			name = strconv.Itoa(int(ws.Signal()))
		}
		s.finish(128+int(ws.Signal()), name)
		return
	}
	s.finish(state.ExitCode(), "")
}

// The status goes out before EOF, as with OpenSSH's sshd: a client that
// closes on EOF (scp's sftp mode) would otherwise miss it.
func (s *session) finish(code int, signal string) {
	if signal != "" {
		coreDumped := false
		_, _ = s.ch.SendRequest("exit-signal", false, gossh.Marshal(struct {
			Signal     string
			CoreDumped bool
			Message    string
			Lang       string
		}{signal, coreDumped, "", ""}))
	} else {
		_, _ = s.ch.SendRequest("exit-status", false, gossh.Marshal(struct{ Status uint32 }{uint32(code)}))
	}
	_ = s.ch.CloseWrite()
	s.ch.Close()
	s.logger.Info("ssh session ended", "exit", code, "signal", signal,
		"duration", time.Since(s.start).Round(time.Millisecond).String())
}

// showMOTD writes the message of the day for an interactive login, unless
// the user asked for quiet with ~/.hushlogin, as login(1) does.
func (s *session) showMOTD() {
	if _, err := os.Stat(filepath.Join(s.c.srv.account.Home, ".hushlogin")); err == nil {
		return
	}
	motd, err := os.ReadFile(s.c.srv.opts.MOTDPath)
	if err != nil || len(motd) == 0 {
		return
	}
	// The PTY's output processing does not apply to what we write directly.
	motd = bytes.ReplaceAll(bytes.ReplaceAll(motd, []byte("\r\n"), []byte("\n")), []byte("\n"), []byte("\r\n"))
	_, _ = s.ch.Write(motd)
}

func (s *session) runSFTP() {
	s.start = time.Now()
	s.logger = s.logger.With("session", "sftp")
	s.logger.Info("ssh session started")
	defer close(s.finished)
	srv, err := sftp.NewServer(keepOpen{s.ch}, sftp.WithServerWorkingDirectory(s.workDir()))
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

// Package reaper makes the agent a proper init process when a container
// starts it as PID 1.
//
// Orphaned processes (a session's daemonized grandchildren, double-forked
// helpers) are re-parented to PID 1 and stay zombies until PID 1 waits for
// them. Reaping them inside the agent itself would race with every
// exec.Cmd.Wait in the agent: a wait4(-1) loop can collect a child's exit
// status before its Wait does, and Wait then fails with "no child processes"
// and loses the status. So PID 1 does nothing but reap: it starts the agent
// again as its only direct child, forwards signals to it, reaps everything
// that dies, and exits with the agent's status. The agent process (PID 2)
// keeps exact exit statuses for its sessions.
package reaper

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// forwarded are the signals PID 1 passes on to the agent. SIGKILL and
// SIGSTOP cannot be caught; SIGCHLD is PID 1's own business.
var forwarded = []os.Signal{
	unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT,
	unix.SIGUSR1, unix.SIGUSR2, unix.SIGWINCH,
}

// ReapOrphansIfPID1 returns nil at once unless this process is PID 1. As
// PID 1 it re-executes the same binary with the same arguments and
// environment as its child, reaps orphans until that child exits, and then
// exits with the child's status (128+signal if it was killed); it returns
// only if the child cannot be started. Call it first thing in `agent run`,
// before opening listeners or files.
func ReapOrphansIfPID1(logger *slog.Logger) error {
	return ReapOrphansIfPID1With(logger, Child{})
}

// Child is what the agent child starts with, when it differs from this
// process: a secret handed over on a descriptor instead of the
// environment, for instance.
type Child struct {
	Args []string // default os.Args
	Env  []string // default os.Environ()
	// Files become the child's descriptors 3, 4, ...
	Files []*os.File
}

// ReapOrphansIfPID1With is ReapOrphansIfPID1 starting the agent child as
// c says.
func ReapOrphansIfPID1With(logger *slog.Logger, c Child) error {
	if os.Getpid() != 1 {
		return nil
	}
	if c.Args == nil {
		c.Args = os.Args
	}
	if c.Env == nil {
		c.Env = os.Environ()
	}
	// Catch signals before the child exists, so none is lost in between.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, forwarded...)

	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	proc, err := os.StartProcess(exe, c.Args, &os.ProcAttr{
		Env:   c.Env,
		Files: append([]*os.File{os.Stdin, os.Stdout, os.Stderr}, c.Files...),
	})
	for _, f := range c.Files {
		f.Close() // the child has its copy
	}
	if err != nil {
		signal.Stop(sigs)
		return fmt.Errorf("running as PID 1: start the agent under a reaping init: %w", err)
	}
	child := proc.Pid
	logger.Info("running as PID 1: reaping orphaned processes; the agent runs as a child", "agent_pid", child)

	go func() {
		for sig := range sigs {
			_ = unix.Kill(child, sig.(syscall.Signal))
		}
	}()
	os.Exit(reapUntil(child, logger))
	return nil
}

// reapUntil waits for every child (the agent and any orphan) and returns
// the exit code to use once the agent itself has ended. PID 1 has no other
// children it waits for by other means, so wait4(-1) steals nothing here.
func reapUntil(child int, logger *slog.Logger) int {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			logger.Error("PID 1 lost track of the agent", "err", err)
			return 1
		}
		if pid != child {
			logger.Debug("reaped orphaned process", "pid", pid)
			continue
		}
		switch {
		case ws.Exited():
			return ws.ExitStatus()
		case ws.Signaled():
			return 128 + int(ws.Signal())
		}
	}
}

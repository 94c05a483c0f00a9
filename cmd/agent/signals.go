package main

import (
	"os"
	"os/signal"
	"syscall"
)

// setUpSignals keeps signals that this process was started
// with ignored from being ignored in the processes it starts: SSH
// sessions, above all.
//
// A parent's "ignore" outlives exec: `nohup agent run` ignores SIGHUP, and
// a startup script's `agent run &` ignores SIGINT and SIGQUIT. Go resets to
// the default in a child only the signals it handles, so every session's
// processes inherited those: a hung-up session lived on until the agent's
// SIGKILL 5 s later, and Ctrl-C would not interrupt a program. OpenSSH's
// sshd gives its sessions the default dispositions; so do we. The agent
// itself keeps ignoring them: they are handled, and dropped.
//
// It returns the signals that end this process gracefully: interrupt and
// termination, and a hangup unless the process was started ignoring it
// (nohup: surviving hangups is what was asked for). Ending gracefully on a
// hangup matters most to clients: OpenSSH sends its ProxyCommand SIGHUP as
// it exits, often just after the SSH connection closed and while `agent
// ssh --stdio` says goodbye to the coordinator. Killed there by the
// default action, the client counted as lost, and its workspace kept the
// peer (two WireGuard goroutines, its buffers) for the 15-minute grace a
// client in a network blip gets: 1-3 of every 300 ProxyCommand runs.
func setUpSignals() (stopOn []os.Signal) {
	stopOn = []os.Signal{os.Interrupt, syscall.SIGTERM}
	if !signal.Ignored(syscall.SIGHUP) {
		stopOn = append(stopOn, syscall.SIGHUP)
	}
	var ignored []os.Signal
	for _, s := range []syscall.Signal{
		syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGPIPE,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGALRM,
		syscall.SIGTSTP, syscall.SIGTTIN, syscall.SIGTTOU,
	} {
		if signal.Ignored(s) {
			ignored = append(ignored, s)
		}
	}
	if len(ignored) == 0 {
		return stopOn
	}
	drop := make(chan os.Signal, 16)
	signal.Notify(drop, ignored...)
	go func() {
		for range drop {
		}
	}()
	return stopOn
}

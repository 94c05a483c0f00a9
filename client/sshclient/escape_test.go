package sshclient_test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// tmux drives a real terminal: a session in a detached tmux pane runs an
// interactive shell through RunInteractive, and keys are typed into it.
type tmux struct {
	t      *testing.T
	socket string
}

func (m *tmux) run(args ...string) string {
	m.t.Helper()
	out, err := exec.Command("tmux", append([]string{"-L", m.socket}, args...)...).CombinedOutput()
	if err != nil {
		m.t.Fatalf("tmux %v: %v\n%s", args, err, out)
	}
	return string(out)
}

func (m *tmux) screen() string { return m.run("capture-pane", "-p", "-t", "s") }

// waitFor waits until the pane shows want (count times).
func (m *tmux) waitFor(want string, count int) string {
	m.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		s := m.screen()
		if strings.Count(s, want) >= count {
			return s
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("the terminal never showed %q (%d times):\n%s", want, count, s)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestEscapesInATerminal(t *testing.T) {
	if _, err := exec.LookPath("tmux"); err != nil {
		t.Skip("tmux is not installed (apt-get install tmux; CI has it)")
	}
	addr := startServer(t)
	m := &tmux{t: t, socket: fmt.Sprintf("agent-escape-%d", os.Getpid())}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	m.run("-f", "/dev/null", "new-session", "-d", "-s", "s", "-x", "120", "-y", "40",
		fmt.Sprintf("env PS1='$ ' %s interactive-helper %s; echo HELPER-EXITED; sleep 60", exe, addr))
	t.Cleanup(func() { exec.Command("tmux", "-L", m.socket, "kill-server").Run() })

	m.run("send-keys", "-t", "s", "echo hello-$((6*7))", "Enter")
	m.waitFor("hello-42", 1)
	// A ~ inside a line is an ordinary character.
	m.run("send-keys", "-t", "s", "-l", "echo a~b")
	m.run("send-keys", "-t", "s", "Enter")
	m.waitFor("\na~b", 1)
	// ~~ at line start sends one ~.
	m.run("send-keys", "-t", "s", "-l", "~~")
	m.run("send-keys", "-t", "s", "-l", "Zq")
	m.run("send-keys", "-t", "s", "Enter")
	if s := m.waitFor("~Zq", 2); strings.Contains(s, "~~Zq") {
		t.Errorf("~~ sent two tildes:\n%s", s)
	}
	// ~? lists the escapes; the shell gets nothing.
	m.run("send-keys", "-t", "s", "-l", "~?")
	m.waitFor("Supported escape sequences", 1)
	// ~. ends the connection although the shell still runs.
	m.run("send-keys", "-t", "s", "Enter")
	m.run("send-keys", "-t", "s", "-l", "~.")
	s := m.waitFor("HELPER-EXITED", 1)
	if !strings.Contains(s, "connection closed by the ~. escape") {
		t.Errorf("~. did not end the session with its reason:\n%s", s)
	}
}

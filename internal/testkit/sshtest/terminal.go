package sshtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// tmux drives a real terminal: ssh runs inside a tmux pane, keys are typed
// with send-keys and the screen is read with capture-pane.
type tmux struct {
	t    testing.TB
	sock string
}

func (m tmux) run(args ...string) string {
	m.t.Helper()
	return Tmux(m.t, m.sock, args...)
}

// Tmux runs one tmux command against the tmux server at socket sock and
// returns its output; a failure (or 30 s without an answer) ends the test.
func Tmux(t testing.TB, sock string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "tmux", append([]string{"-S", sock}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("tmux %v: %v\n%s", args, err, out)
	}
	return string(out)
}

func (m tmux) screen() string {
	return m.run("capture-pane", "-p", "-J", "-S", "-200", "-t", "sshtest")
}

// waitFor waits until the screen matches re and returns the submatches.
func (m tmux) waitFor(re *regexp.Regexp, what string) []string {
	m.t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for {
		scr := m.screen()
		if sm := re.FindStringSubmatch(scr); sm != nil {
			return sm
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("terminal never showed %s (%s); screen:\n%s", what, re, scr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (m tmux) typeLine(line string) {
	m.t.Helper()
	m.run("send-keys", "-t", "sshtest", "-l", line)
	m.run("send-keys", "-t", "sshtest", "Enter")
}

// Terminal: an interactive login shell on a PTY with TERM, the window size
// and its changes (seen by stty size), job control (^Z, fg, ^C), the MOTD,
// and the shell's exit status coming back to the client.
func Terminal(t *testing.T, tg Target) {
	RequireTools(t, "tmux")
	dir := shortTempDir(t)
	m := tmux{t: t, sock: filepath.Join(dir, "tmux.sock")}
	exitFile := filepath.Join(dir, "exit")
	sshLine := "ssh -tt"
	for _, a := range tg.SSHArgs() {
		sshLine += " " + ShellQuote(a)
	}
	sshLine += " " + ShellQuote(tg.Host)
	script := fmt.Sprintf("%s; echo $? > %s; sleep 30", sshLine, exitFile)
	m.run("-f", "/dev/null", "new-session", "-d", "-s", "sshtest", "-x", "80", "-y", "24", "sh", "-c", script)
	t.Cleanup(func() {
		_ = exec.Command("tmux", "-S", m.sock, "kill-server").Run()
	})

	if tg.MOTD != "" {
		m.waitFor(regexp.MustCompile(regexp.QuoteMeta(tg.MOTD)), "the MOTD")
	}
	// Lines typed ahead of the prompt come back after it on the same line
	// under dash ("# S:-sh ..."); bash starts its output on a new line.
	m.typeLine(`echo "S:$0 T:$TERM"`)
	sm := m.waitFor(regexp.MustCompile(`(?m)^(?:[$#] )?S:(\S+) T:(\S+)`), "shell and TERM")
	if !strings.HasPrefix(sm[1], "-") {
		t.Errorf("shell %q is not a login shell (argv[0] should start with '-')", sm[1])
	}
	if sm[2] == "dumb" {
		t.Errorf("TERM is %q; the client's terminal type was not passed", sm[2])
	}

	m.typeLine(`echo "SZ1:$(stty size)"`)
	m.waitFor(regexp.MustCompile(`(?m)^(?:[$#] )?SZ1:24 80`), "the first window size 24 80")
	m.run("resize-window", "-t", "sshtest", "-x", "101", "-y", "31")
	// The resize travels as a window-change request; ask until it arrived.
	sizeRe := regexp.MustCompile(`(?m)^(?:[$#] )?SZ2:31 101`)
	for i := 0; ; i++ {
		m.typeLine(`echo "SZ2:$(stty size)"`)
		time.Sleep(500 * time.Millisecond)
		if sizeRe.MatchString(m.screen()) || i == 20 {
			break
		}
	}
	m.waitFor(sizeRe, "the changed window size 31 101")

	// Job control: ^Z stops the foreground job, fg resumes it, ^C ends it.
	sleeper := fmt.Sprintf("sleep 3%d.5", os.Getpid())
	m.typeLine(sleeper)
	waitProcessState(t, sleeper, func(st byte) bool { return st == 'S' || st == 'R' })
	m.run("send-keys", "-t", "sshtest", "C-z")
	m.waitFor(regexp.MustCompile(`(?i)stopped`), "the job stopped by ^Z")
	waitProcessState(t, sleeper, func(st byte) bool { return st == 'T' })
	m.typeLine("fg")
	waitProcessState(t, sleeper, func(st byte) bool { return st == 'S' || st == 'R' })
	m.run("send-keys", "-t", "sshtest", "C-c")
	m.typeLine(`echo "JC:$?"`)
	m.waitFor(regexp.MustCompile(`(?m)^(?:[$#] )?JC:130`), "exit status 130 after ^C")

	m.typeLine("exit 7")
	deadline := time.Now().Add(20 * time.Second)
	for {
		data, err := os.ReadFile(exitFile)
		if err == nil && strings.TrimSpace(string(data)) != "" {
			if got := strings.TrimSpace(string(data)); got != "7" {
				t.Fatalf("ssh exited %s after `exit 7`, want 7", got)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ssh did not exit after `exit 7`; screen:\n%s", m.screen())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitProcessState waits until the process carrying marker is in a state
// that ok accepts (the letter in /proc/PID/stat: S, R, T, ...).
func waitProcessState(t testing.TB, marker string, ok func(byte) bool) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for {
		for _, pid := range ProcessesMatching(marker) {
			stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if i := strings.LastIndexByte(string(stat), ')'); err == nil && i > 0 && len(stat) > i+2 && ok(stat[i+2]) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %q never reached the expected state", marker)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

package client_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

// An agent started the way startup scripts start it, with signals ignored
// (nohup ignores SIGHUP; a script's background job, SIGINT and SIGQUIT),
// must not hand that on: a session's processes get the default
// dispositions, as under OpenSSH's sshd, so a hangup ends them and Ctrl-C
// interrupts them.
func TestSessionsGetDefaultSignals(t *testing.T) {
	lab := netlab.New(t)
	bin := buildAgent(t)
	ns := lab.Namespace("sig")
	env, out := startDev(t, ns.Command("sh", "-c", `trap "" HUP INT QUIT TERM PIPE; exec "$0" dev --data-dir "$1"`, bin, t.TempDir()))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// What the agent was started with, seen by a process started the same
	// way: the test sets up what it means to.
	trapped, err := ns.Command("sh", "-c", `trap "" HUP INT QUIT TERM PIPE; exec grep "^SigIgn:" /proc/self/status`).Output()
	if err != nil {
		t.Fatal(err)
	}
	if mask := parseSigIgn(t, string(trapped)); mask&sigBit(1) == 0 || mask&sigBit(2) == 0 {
		t.Fatalf("a process started as agent dev was does not ignore SIGHUP and SIGINT (%q)", trapped)
	}
	ssh := ns.CommandContext(ctx, bin, "ssh", "dev", "--", "grep", "^SigIgn:", "/proc/self/status")
	ssh.Env = env
	got, err := ssh.CombinedOutput()
	if err != nil {
		t.Fatalf("agent ssh dev: %v\n%s\nagent dev:\n%s", err, got, out.String())
	}
	mask := parseSigIgn(t, lastLine(string(got)))
	for _, s := range []struct {
		num  int
		name string
	}{{1, "SIGHUP"}, {2, "SIGINT"}, {3, "SIGQUIT"}, {13, "SIGPIPE"}, {15, "SIGTERM"}} {
		if mask&sigBit(s.num) != 0 {
			t.Errorf("a session's process ignores %s (SigIgn %#x): it inherited the agent's start-up", s.name, mask)
		}
	}
}

func sigBit(n int) uint64 { return 1 << (n - 1) }

// parseSigIgn reads the mask of a /proc status SigIgn line.
func parseSigIgn(t *testing.T, line string) uint64 {
	t.Helper()
	f := strings.Fields(strings.TrimSpace(line))
	if len(f) != 2 || f[0] != "SigIgn:" {
		t.Fatalf("want a SigIgn line, got %q", line)
	}
	m, err := strconv.ParseUint(f[1], 16, 64)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

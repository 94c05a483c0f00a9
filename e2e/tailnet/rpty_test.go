package tailnet_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/testkit/sshtest"
)

// defaultOutage is how long the laptop's link stays down;
// AGENT_TEST_OUTAGE (a Go duration, e.g. 10m) makes it longer.
const defaultOutage = 60 * time.Second

func outageLength(t *testing.T) time.Duration {
	v := os.Getenv("AGENT_TEST_OUTAGE")
	if v == "" {
		return defaultOutage
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < defaultOutage {
		t.Fatalf("AGENT_TEST_OUTAGE=%q: want a Go duration of at least %s, e.g. 10m", v, defaultOutage)
	}
	return d
}

// laptopTerminals is a tmux server on the laptop (Host2): every pane runs
// in the laptop's network namespace with the client's environment, and
// everything a pane receives is also appended to a file of its own.
type laptopTerminals struct {
	t    *testing.T
	sock string
	dir  string
}

func newLaptopTerminals(t *testing.T, d *deployment) *laptopTerminals {
	t.Helper()
	// A short directory: tmux's socket path must fit a sockaddr_un.
	dir, err := os.MkdirTemp("/tmp", "rpty")
	if err != nil {
		t.Fatal(err)
	}
	m := &laptopTerminals{t: t, sock: filepath.Join(dir, "tmux.sock"), dir: dir}
	// Registered after the lab, so it runs before the namespaces go.
	t.Cleanup(func() {
		_ = exec.Command("tmux", "-S", m.sock, "kill-server").Run()
		os.RemoveAll(dir)
	})
	cmd := d.sites.Host2.Command("tmux", "-S", m.sock, "-f", "/dev/null", "new-session", "-d", "-s", "lab", "-x", "100", "-y", "30", "sleep 600")
	cmd.Env = append(d.clientEnv(d.userToken), "TERM=xterm-256color")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("start tmux on the laptop: %v\n%s", err, out)
	}
	return m
}

func (m *laptopTerminals) tmux(args ...string) string {
	m.t.Helper()
	return sshtest.Tmux(m.t, m.sock, args...)
}

// open starts shellLine in a new window, recording its output.
func (m *laptopTerminals) open(name, shellLine string) {
	m.t.Helper()
	m.tmux("new-window", "-d", "-n", name, shellLine)
	m.tmux("pipe-pane", "-o", "-t", "lab:"+name, "cat >> "+m.logPath(name))
}

func (m *laptopTerminals) logPath(name string) string { return filepath.Join(m.dir, name+".out") }

// received is everything the window was sent so far.
func (m *laptopTerminals) received(name string) string {
	data, _ := os.ReadFile(m.logPath(name))
	return string(data)
}

func (m *laptopTerminals) typeLine(name, line string) {
	m.t.Helper()
	m.tmux("send-keys", "-t", "lab:"+name, "-l", line)
	m.tmux("send-keys", "-t", "lab:"+name, "Enter")
}

// waitFor waits until what the window received since from matches re.
func (m *laptopTerminals) waitFor(name string, from int, re *regexp.Regexp, within time.Duration, what string) []string {
	m.t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := m.received(name)
		if len(got) >= from {
			if sm := re.FindStringSubmatch(got[from:]); sm != nil {
				return sm
			}
		}
		if time.Now().After(deadline) {
			screen, _ := exec.Command("tmux", "-S", m.sock, "capture-pane", "-p", "-t", "lab:"+name).CombinedOutput()
			m.t.Fatalf("terminal %s never showed %s (%s) within %s; screen:\n%s", name, what, re, within, screen)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestTerminalSurvivesLaptopOutage: two interactive `agent ssh` sessions
// on the laptop, one running top and one a counting loop; the laptop's
// link goes down for a minute (AGENT_TEST_OUTAGE: longer). Each client says once that it lost the
// connection and reconnects on its own when the link is back: top is the
// same process and draws its screen again, and every line the counter
// printed meanwhile arrives, once and in order; the window size changed
// while away reaches the shell. A third terminal attaches
// to the counter's session by name and ends it; the exit status reaches
// both clients attached to it.
func TestTerminalSurvivesLaptopOutage(t *testing.T) {
	sshtest.RequireTools(t, "tmux", "top")
	outage := outageLength(t)
	begin := time.Now()
	d := newDeployment(t, netlab.NATEndpointIndependent)
	t.Logf("deployment up after %s", time.Since(begin).Round(100*time.Millisecond))
	m := newLaptopTerminals(t, d)
	stop := filepath.Join(m.dir, "stop-counting")
	agentSSH := func(name, session string) string {
		return fmt.Sprintf("%s ssh ws1 --session %s; echo EXIT:$? > %s", d.bin, session, filepath.Join(m.dir, name+".exit"))
	}
	m.open("top", agentSSH("top", "top"))
	m.open("count", agentSSH("count", "count"))

	m.typeLine("top", "echo TOPPID:$$; exec top -d 1")
	topPID := m.waitFor("top", 0, regexp.MustCompile(`(?m)^(?:[$#] )?TOPPID:(\d+)`), 30*time.Second, "the shell's PID")[1]
	m.waitFor("top", 0, regexp.MustCompile(`load average`), 30*time.Second, "top's screen")
	m.typeLine("count", "echo SHPID:$$; i=0; while [ ! -e "+stop+" ]; do i=$((i+1)); echo n:$i; sleep 0.25; done; echo END:$i")
	countPID := m.waitFor("count", 0, regexp.MustCompile(`(?m)^(?:[$#] )?SHPID:(\d+)`), 30*time.Second, "the shell's PID")[1]
	m.waitFor("count", 0, regexp.MustCompile(`(?m)^n:4\r?$`), 30*time.Second, "the counter running")

	t.Logf("both sessions running after %s", time.Since(begin).Round(100*time.Millisecond))
	// The laptop's network goes away.
	laptop := d.sites.Host2
	laptop.IP("link", "set", "eth0", "down")
	down := time.Now()
	lost := regexp.MustCompile(`connection to workspace "ws1" lost; reconnecting`)
	for _, w := range []string{"top", "count"} {
		m.waitFor(w, 0, lost, outage, "that the connection was lost")
	}
	t.Logf("both clients noticed the outage after %s", time.Since(down).Round(100*time.Millisecond))
	// The laptop's terminal changes size while it is away; the reattach
	// must bring the new size along.
	m.tmux("resize-window", "-t", "lab:count", "-x", "101", "-y", "31")
	time.Sleep(outage - time.Since(down))
	topMark, countMark := len(m.received("top")), len(m.received("count"))
	laptop.IP("link", "set", "eth0", "up")
	laptop.IP("route", "replace", "default", "via", d.sites.Site2.Gateway.String())
	up := time.Now()

	// Back: the counter's lines printed while away arrive, then new ones.
	sm := m.waitFor("count", countMark, regexp.MustCompile(`(?m)^n:(\d+)\r?$`), 60*time.Second, "the counter after the outage")
	t.Logf("the counter's output came back %s after the link (at n:%s)", time.Since(up).Round(100*time.Millisecond), sm[1])
	m.waitFor("top", topMark, regexp.MustCompile(`load average`), 30*time.Second, "top redrawn after the outage")
	if comm, err := os.ReadFile("/proc/" + topPID + "/comm"); err != nil || strings.TrimSpace(string(comm)) != "top" {
		t.Errorf("process %s is no longer top after the outage (%q, %v)", topPID, comm, err)
	}
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	end := m.waitFor("count", 0, regexp.MustCompile(`(?m)^END:(\d+)`), 30*time.Second, "the counter's end")
	total, _ := strconv.Atoi(end[1])
	checkCounter(t, m.received("count"), total)
	m.typeLine("count", `echo "SZ:$(stty size)"`)
	m.waitFor("count", 0, regexp.MustCompile(`(?m)^(?:[$#] )?SZ:31 101`), 30*time.Second, "the window size changed while away (31 101)")

	t.Logf("outage checks done after %s", time.Since(begin).Round(100*time.Millisecond))
	// Another terminal attaches to the counter's session by name: it is
	// shown the scrollback, and it can end the session.
	m.open("second", agentSSH("second", "count"))
	m.waitFor("second", 0, regexp.MustCompile(`END:`+end[1]), 30*time.Second, "the session's scrollback")
	m.typeLine("second", "echo SECOND:$$")
	if got := m.waitFor("second", 0, regexp.MustCompile(`(?m)^(?:[$#] )?SECOND:(\d+)`), 30*time.Second, "the shell's PID")[1]; got != countPID {
		t.Errorf("the second terminal reached shell %s, not the counter's shell %s", got, countPID)
	}
	m.typeLine("second", "exit 5")
	for _, w := range []string{"second", "count"} {
		deadline := time.Now().Add(20 * time.Second)
		for {
			data, err := os.ReadFile(filepath.Join(m.dir, w+".exit"))
			if err == nil && strings.TrimSpace(string(data)) != "" {
				if got := strings.TrimSpace(string(data)); got != "EXIT:5" {
					t.Errorf("client in %s ended with %s, want EXIT:5", w, got)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("client in %s did not end after exit 5 in the session", w)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// checkCounter requires the counter's lines n:1..n:total in what the
// terminal received, each once and in order.
func checkCounter(t *testing.T, out string, total int) {
	t.Helper()
	var got []int
	for _, sm := range regexp.MustCompile(`(?m)^n:(\d+)\r?$`).FindAllStringSubmatch(out, -1) {
		i, _ := strconv.Atoi(sm[1])
		got = append(got, i)
	}
	if len(got) != total {
		t.Fatalf("the terminal received %d counter lines, the counter printed %d: output was lost or repeated", len(got), total)
	}
	for i, v := range got {
		if v != i+1 {
			t.Fatalf("counter line %d reads n:%d: output lost, repeated or out of order", i+1, v)
		}
	}
	t.Logf("all %d counter lines arrived once, in order", total)
}

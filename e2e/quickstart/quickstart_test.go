// Package quickstart runs the README's quick start exactly as written, in a
// fresh clone of this repository, the way a newcomer would.
package quickstart

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

// quickStartCommands returns the commands of the first sh block under the
// README's "## Quick start" heading, without their comments.
func quickStartCommands(readme string) ([]string, error) {
	_, after, ok := strings.Cut(readme, "\n## Quick start\n")
	if !ok {
		return nil, fmt.Errorf(`README.md has no "## Quick start" section`)
	}
	_, block, ok := strings.Cut(after, "```sh\n")
	if !ok {
		return nil, fmt.Errorf("the quick start has no ```sh block")
	}
	block, _, ok = strings.Cut(block, "```")
	if !ok {
		return nil, fmt.Errorf("the quick start's sh block is not closed")
	}
	var cmds []string
	for _, line := range strings.Split(block, "\n") {
		line, _, _ = strings.Cut(line, "#")
		if line = strings.TrimSpace(line); line != "" {
			cmds = append(cmds, line)
		}
	}
	return cmds, nil
}

func TestQuickStartCommandsParse(t *testing.T) {
	got, err := quickStartCommands("# x\n\n## Quick start\n\ntext\n\n```sh\ngo run ./cmd/agent dev   # comment\nscripts/test\n```\n\n```sh\nnot this\n```\n")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, "|") != "go run ./cmd/agent dev|scripts/test" {
		t.Errorf("got %q", got)
	}
	if _, err := quickStartCommands("# no section\n"); err == nil {
		t.Error("a README without a quick start parsed")
	}
}

var (
	pingLine  = regexp.MustCompile(`^agent ping (\S+)`)
	buildLine = regexp.MustCompile("\\(`(go build [^`]+)` puts the `agent`")
)

// TestReadmeQuickStart clones the repository, runs the quick start's first
// command as written, and follows the instructions it prints: ping the
// workspace and run a command on it over SSH. The second command is the test
// suite itself, which CI runs from a fresh clone through .ci/run; here it is
// checked to be exactly what .ci/run runs.
func TestReadmeQuickStart(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: agent dev listens on the fixed address 127.0.0.1:7443, so the test gives it a private network namespace")
	}
	for _, tool := range []string{"git", "go", "bash"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	root, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Skipf("not in a git checkout, nothing to clone: %v", err)
	}
	readme, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(root)), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	cmds, err := quickStartCommands(string(readme))
	if err != nil {
		t.Fatal(err)
	}
	if len(cmds) != 2 {
		t.Fatalf("the quick start should be two commands, found %d: %q", len(cmds), cmds)
	}
	clone := filepath.Join(t.TempDir(), "agent")
	if out, err := exec.Command("git", "clone", "--quiet", strings.TrimSpace(string(root)), clone).CombinedOutput(); err != nil {
		t.Fatalf("git clone: %v\n%s", err, out)
	}
	ci, err := os.ReadFile(filepath.Join(clone, ".ci/run"))
	if err != nil {
		t.Fatalf("the clone has no .ci/run: %v", err)
	}
	if !strings.Contains(string(ci), "\nexec "+cmds[1]+"\n") {
		t.Errorf(".ci/run does not end by running the README's test command %q", cmds[1])
	}
	if fi, err := os.Stat(filepath.Join(clone, cmds[1])); err != nil || fi.Mode()&0o111 == 0 {
		t.Errorf("the README's test command %q is not an executable file in a fresh clone (%v)", cmds[1], err)
	}

	lab := netlab.New(t)
	ns := lab.Namespace("quick")
	// A machine with a network: Tailscale's engine treats a host whose only
	// interface is loopback as offline and sends nothing, not even on
	// loopback. The link is from a documentation range and leads to an
	// empty namespace.
	lab.Link(ns, "eth0", "192.0.2.10/24", lab.Namespace("lan"), "eth0", "192.0.2.1/24")
	ns.Route("default via 192.0.2.1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	dev := ns.Command("bash", "-c", cmds[0])
	dev.Dir = clone
	dev.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var devOut bytes.Buffer
	pr, pw := io.Pipe()
	dev.Stdout = io.MultiWriter(pw, &devOut)
	dev.Stderr = &devOut
	if err := dev.Start(); err != nil {
		t.Fatalf("%s: %v", cmds[0], err)
	}
	var waitErr error
	exited := make(chan struct{})
	go func() { waitErr = dev.Wait(); pw.Close(); close(exited) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-dev.Process.Pid, syscall.SIGKILL)
		<-exited
	})

	// Follow the banner: its export lines, verbatim, and the workspace's name.
	type banner struct{ exports, name string }
	found := make(chan banner, 1)
	go func() {
		var b banner
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if strings.HasPrefix(line, "export AGENT_") {
				b.exports += line + "\n"
			} else if m := pingLine.FindStringSubmatch(line); m != nil && b.exports != "" {
				b.name = m[1]
				found <- b
				break
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	var b banner
	select {
	case b = <-found:
	case <-exited:
		t.Fatalf("%q exited before printing how to reach the workspace: %v\n%s", cmds[0], waitErr, devOut.String())
	case <-ctx.Done():
		t.Fatalf("%q printed no banner in time:\n%s", cmds[0], devOut.String())
	}
	m := buildLine.FindStringSubmatch(string(readme))
	if m == nil {
		t.Fatal("README.md no longer says how to build the agent binary the banner's lines use")
	}
	// In a second terminal, as the README and the banner say.
	script := m[1] + "\n" + b.exports +
		"agent ping " + b.name + " -c 2\n" +
		"agent ssh " + b.name + " -- echo quick start works\n"
	sh := ns.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", script)
	sh.Dir = clone
	// A home of its own keeps the laptop side's saved login out of the
	// way; Go's caches stay where they are, so nothing is downloaded again.
	goEnv, err := exec.Command("go", "env", "GOPATH", "GOMODCACHE", "GOCACHE").Output()
	if err != nil {
		t.Fatalf("go env: %v", err)
	}
	vals := strings.Split(strings.TrimSpace(string(goEnv)), "\n")
	if len(vals) != 3 {
		t.Fatalf("go env printed %q", goEnv)
	}
	sh.Env = append(os.Environ(), "HOME="+t.TempDir(), "GOPATH="+vals[0], "GOMODCACHE="+vals[1], "GOCACHE="+vals[2])
	out, err := sh.CombinedOutput()
	if err != nil {
		t.Fatalf("following the banner failed: %v\n%s\n%s\nagent dev said:\n%s", err, script, out, devOut.String())
	}
	t.Logf("%s\n%s", script, out)
	if !regexp.MustCompile(`(?m)^pong from`).Match(out) {
		t.Errorf("agent ping printed no pong:\n%s", out)
	}
	if !regexp.MustCompile(`(?m)^quick start works$`).Match(out) {
		t.Errorf("agent ssh -- echo did not print its output:\n%s", out)
	}

	// Ctrl-C stops it cleanly.
	_ = syscall.Kill(-dev.Process.Pid, syscall.SIGINT)
	select {
	case <-exited:
		// `go run` itself exits 1 when its process group is interrupted,
		// whatever the program's status, so judge by the program's log.
		if !strings.Contains(devOut.String(), `msg="coordinator stopped"`) {
			t.Errorf("%q did not shut down cleanly after Ctrl-C (%v):\n%s", cmds[0], waitErr, devOut.String())
		}
	case <-time.After(30 * time.Second):
		t.Errorf("%q still running 30 s after Ctrl-C", cmds[0])
	}
}

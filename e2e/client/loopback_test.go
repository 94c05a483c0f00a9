package client_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/syncbuf"
)

// A laptop offline has only loopback. Tailscale's engine treats a machine
// without any other interface as offline and pauses; agent dev and the
// client must still reach each other through the coordinator and DERP
// relay on 127.0.0.1.
func TestDevOnALoopbackOnlyMachine(t *testing.T) {
	lab := netlab.New(t)
	bin := buildAgent(t)
	laptop := lab.Namespace("lo-only")
	env, out := startDev(t, laptop.Command(bin, "dev", "--data-dir", t.TempDir()))

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	ping := laptop.CommandContext(ctx, bin, "ping", "dev", "-c", "1", "--timeout", "20s")
	ping.Env = env
	pingOut, err := ping.CombinedOutput()
	if err != nil || !strings.Contains(string(pingOut), "pong from dev") {
		t.Fatalf("agent ping on a loopback-only machine: %v\n%s\nagent dev:\n%s", err, pingOut, out.String())
	}
	t.Logf("first pong after %v:\n%s", time.Since(start).Round(time.Millisecond), pingOut)

	// agent list --paths connects to the online workspace and says how.
	list := laptop.CommandContext(ctx, bin, "list", "--paths", "--json")
	list.Env = env
	listOut, err := list.Output()
	var listed struct {
		Workspaces []struct {
			Name   string `json:"name"`
			Online bool   `json:"online"`
			Path   *struct {
				Kind      string  `json:"kind"`
				LatencyMS float64 `json:"latency_ms"`
				Error     string  `json:"error"`
			} `json:"path"`
		} `json:"workspaces"`
	}
	if err != nil || json.Unmarshal(listOut, &listed) != nil || len(listed.Workspaces) != 1 {
		t.Fatalf("agent list --paths --json: %v\n%s", err, listOut)
	}
	if w := listed.Workspaces[0]; w.Name != "dev" || !w.Online || w.Path == nil || (w.Path.Kind != "direct" && w.Path.Kind != "derp") || w.Path.LatencyMS <= 0 {
		t.Errorf("agent list --paths --json: want dev online with a path:\n%s", listOut)
	}

	// A TCP connection over the tailnet: the agent API lists the
	// workspace's ports.
	ports := laptop.CommandContext(ctx, bin, "ports", "dev", "--json")
	ports.Env = env
	var portsErr syncbuf.Buffer
	ports.Stderr = &portsErr
	portsOut, err := ports.Output()
	if err != nil || !strings.HasPrefix(strings.TrimSpace(string(portsOut)), "[") {
		t.Fatalf("agent ports on a loopback-only machine: %v\n%s\n%s\nagent dev:\n%s", err, portsOut, portsErr.String(), out.String())
	}

	// The ProxyCommand bridge carries a live SSH connection when the
	// process that started it is killed while holding its pipes open: it
	// ends too, within the grace it gives the server to close. (Its
	// parent-death watch is what ends it while connecting; see
	// TestStdioEndsWhenItsParentDies.)
	parent := laptop.Command("sh", "-c", `exec 3<&0; "$0" ssh --stdio dev <&3 & echo $!; wait`, bin)
	parent.Env = env
	var bridgeErr syncbuf.Buffer
	parent.Stderr = &bridgeErr
	// Not StdinPipe: Wait would close it, and the bridge would end on
	// EOF rather than on its parent's death.
	stdinR, stdin, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	parent.Stdin = stdinR
	// Its stdout stays open too: only the parent's death may end the
	// bridge, not EOF or a broken pipe.
	stdout, stdoutW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()
	parent.Stdout = stdoutW
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	stdinR.Close()
	stdoutW.Close()
	br := bufio.NewReader(stdout)
	line, _ := br.ReadString('\n')
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		parent.Process.Kill()
		t.Fatalf("the shell did not print the bridge's PID: %q", line)
	}
	defer syscall.Kill(pid, syscall.SIGKILL)
	io.WriteString(stdin, "SSH-2.0-OpenSSH_9.2p1\r\n")
	// The workspace's version line through the bridge: it is proxying.
	banner, err := br.ReadString('\n')
	if !strings.HasPrefix(banner, "SSH-2.0-") {
		parent.Process.Kill()
		t.Fatalf("no SSH banner through the bridge: %q %v\n%s", banner, err, bridgeErr.String())
	}
	time.Sleep(time.Second)
	if exited(pid, 0) {
		t.Fatalf("the bridge ended before its parent: %s", bridgeErr.String())
	}
	parent.Process.Kill()
	parent.Wait()
	killed := time.Now()
	go io.Copy(io.Discard, br) // keep reading what the workspace still sends
	if !exited(pid, 15*time.Second) {
		t.Fatalf("agent ssh --stdio (pid %d) still runs 15 s after its parent was killed mid-connection", pid)
	}
	t.Logf("the proxying bridge ended %v after its parent: %s", time.Since(killed).Round(time.Millisecond), bridgeErr.String())
}

// startDev starts dev (an `agent dev` command, possibly through a wrapper)
// and returns a client's environment for it, with the credentials it
// printed, and its output. It is interrupted at the test's end.
func startDev(t *testing.T, dev *exec.Cmd) (env []string, out *syncbuf.Buffer) {
	t.Helper()
	out = &syncbuf.Buffer{}
	dev.Stdout, dev.Stderr = out, out
	if err := dev.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Process.Signal(os.Interrupt); dev.Wait() })
	exports := regexp.MustCompile(`export (AGENT_URL=\S+) (AGENT_FINGERPRINT=\S+)\s+export (AGENT_TOKEN=\S+)`)
	deadline := time.Now().Add(30 * time.Second)
	var m []string
	for m == nil {
		if m = exports.FindStringSubmatch(out.String()); m == nil {
			if time.Now().After(deadline) {
				t.Fatalf("agent dev printed no credentials:\n%s", out.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"), m[1], m[2], m[3]}, out
}

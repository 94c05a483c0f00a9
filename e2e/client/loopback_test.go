package client_test

import (
	"context"
	"os"
	"regexp"
	"strings"
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
	home := t.TempDir()
	dev := laptop.Command(bin, "dev", "--data-dir", t.TempDir())
	var out syncbuf.Buffer
	dev.Stdout, dev.Stderr = &out, &out
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
	env := []string{"HOME=" + home, "PATH=" + os.Getenv("PATH"), m[1], m[2], m[3]}

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

	ssh := laptop.CommandContext(ctx, bin, "ssh", "dev", "--", "echo", "over-loopback")
	ssh.Env = env
	sshOut, err := ssh.Output()
	if err != nil || strings.TrimSpace(string(sshOut)) != "over-loopback" {
		t.Fatalf("agent ssh on a loopback-only machine: %v\n%s", err, sshOut)
	}
}

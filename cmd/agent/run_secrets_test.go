package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/store"
)

// buildAgent builds the real binary once per test.
func buildAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "agent")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// lockedBuffer collects a process's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// runAgentOnce runs the binary and expects it to exit with an error whose
// output contains every want.
func runAgentOnce(t *testing.T, bin string, env []string, args []string, wants ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("agent %s succeeded, want a refusal:\n%s", strings.Join(args, " "), out)
	}
	for _, w := range wants {
		if !strings.Contains(string(out), w) {
			t.Errorf("agent %s: output lacks %q:\n%s", strings.Join(args, " "), w, out)
		}
	}
}

// TestRunRefusesExposedSecretsAndPlainHTTP runs the real `agent run` on
// files with the permissions an attacker hopes for; each is refused before
// anything is sent, with the command that fixes it.
func TestRunRefusesExposedSecretsAndPlainHTTP(t *testing.T) {
	bin := buildAgent(t)
	dir := t.TempDir()
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}
	goodTok := filepath.Join(dir, "good.token")
	if err := os.WriteFile(goodTok, []byte("agt_x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	openTok := filepath.Join(dir, "open.token")
	if err := os.WriteFile(openTok, []byte("agt_x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(openTok, 0o644); err != nil { // umask-proof
		t.Fatal(err)
	}
	openDir := filepath.Join(dir, "open-state")
	if err := os.Mkdir(openDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(openDir, 0o777); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "state")
	base := []string{"run", "--health-addr", "", "--coordinator-url", "https://192.0.2.1:1"}

	runAgentOnce(t, bin, env, append(base, "--token-file", openTok, "--data-dir", data),
		"readable by every local user", "chmod 600 "+openTok, "--allow-insecure-permissions")
	runAgentOnce(t, bin, env, append(base, "--token-file", goodTok, "--data-dir", openDir),
		"writable by every local user", "chmod 700 "+openDir)
	runAgentOnce(t, bin, env, []string{"run", "--health-addr", "", "--coordinator-url", "http://192.0.2.1:1", "--token-file", goodTok, "--data-dir", data},
		"plain HTTP", "--insecure-http")
	runAgentOnce(t, bin, env, []string{"run", "--health-addr", "", "--coordinator-url", "http://192.0.2.1:1", "--insecure-http",
		"--fingerprint", strings.Repeat("ab", 32), "--token-file", goodTok, "--data-dir", data},
		"a pin needs https://")
}

// TestRunScrubsTokenFromProcess starts the real agent with its token on
// the command line and in the environment, as the attacker found
// it, and checks that neither /proc/PID/cmdline nor /proc/PID/environ of
// the running agent nor an SSH session's environment shows it.
func TestRunScrubsTokenFromProcess(t *testing.T) {
	bin := buildAgent(t)
	dir := t.TempDir()
	coordDir := filepath.Join(dir, "coord")
	if err := os.Mkdir(coordDir, 0o700); err != nil {
		t.Fatal(err)
	}
	srv, err := coordinator.New(coordinator.Config{DataDir: coordDir, Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	ac, err := admin.DialSocket(ctx, admin.SocketPath(coordDir))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ac.CreateUser("alice"); err != nil {
		t.Fatal(err)
	}
	ws, err := ac.CreateAgent("ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	ut, err := ac.CreateToken(store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}

	var logs lockedBuffer
	agentCmd := exec.Command(bin, "run", "--coordinator-url", srv.URL(), "--fingerprint", srv.Fingerprint(),
		"--token", ws.Secret, "--data-dir", filepath.Join(dir, "agent-state"), "--health-addr", "")
	agentCmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "AGENT_TOKEN=" + ws.Secret}
	agentCmd.Stdout, agentCmd.Stderr = &logs, &logs
	if err := agentCmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := agentCmd.Process.Pid
	t.Cleanup(func() {
		agentCmd.Process.Kill()
		agentCmd.Wait()
	})

	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := ac.Info()
		if err == nil && len(info.Peers) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not register within 30 s:\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, f := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
		if err != nil {
			t.Fatalf("the agent (pid %d) is gone: %v\n%s", pid, err, logs.String())
		}
		if bytes.Contains(b, []byte(ws.Secret)) {
			t.Errorf("/proc/%d/%s of the running agent shows its token", pid, f)
		}
		if f == "cmdline" && !bytes.Contains(b, []byte("run\x00")) {
			t.Errorf("pid %d is no longer the agent: %q", pid, b)
		}
	}
	if strings.Contains(logs.String(), ws.Secret) {
		t.Errorf("the agent logged its token:\n%s", logs.String())
	}

	// A session started by the agent sees neither the token nor where it was.
	sctx, scancel := context.WithTimeout(ctx, 60*time.Second)
	defer scancel()
	ssh := exec.CommandContext(sctx, bin, "ssh", "ws1", "--", "sh", "-c", fmt.Sprintf("env; echo; tr '\\0' '\\n' </proc/%d/environ", pid))
	ssh.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "XDG_CONFIG_HOME=" + dir,
		"AGENT_URL=" + srv.URL(), "AGENT_TOKEN=" + ut.Secret, "AGENT_FINGERPRINT=" + srv.Fingerprint()}
	out, err := ssh.CombinedOutput()
	if err != nil {
		t.Fatalf("agent ssh: %v\n%s\nagent log:\n%s", err, out, logs.String())
	}
	if !strings.Contains(string(out), "PATH=") {
		t.Fatalf("the session printed no environment:\n%s", out)
	}
	// The session's own environment, then the agent's as the session sees
	// it: the descriptor number it was handed the token on may show there.
	session, agentEnv, _ := strings.Cut(string(out), "\n\n")
	for _, bad := range []string{ws.Secret, "AGENT_TOKEN"} {
		if strings.Contains(session, bad) {
			t.Errorf("a session's environment contains %q:\n%s", bad, session)
		}
	}
	for _, bad := range []string{ws.Secret, "AGENT_TOKEN="} {
		if strings.Contains(agentEnv, bad) {
			t.Errorf("the agent's environment, read from a session, contains %q:\n%s", bad, agentEnv)
		}
	}
}

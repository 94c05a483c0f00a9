package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
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

// startedOutput runs the agent until it is waiting for the (unreachable)
// coordinator and returns what it logged by then.
func startedOutput(t *testing.T, bin string, env, args []string) string {
	t.Helper()
	var out lockedBuffer
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "waiting for the coordinator") {
		if time.Now().After(deadline) {
			t.Fatalf("agent %s: not waiting for the coordinator within 20 s:\n%s", strings.Join(args, " "), out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return out.String()
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
	// A group-readable file: a warning when the group has other members
	// (nogroup holds nobody), none for a group of the agent's own (root's
	// group here, as a Kubernetes fsGroup Secret is the pod's own).
	sharedTok := filepath.Join(dir, "shared.token")
	if err := os.WriteFile(sharedTok, []byte("agt_x\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sharedTok, 0, 65534); err != nil {
		t.Fatal(err)
	}
	if out := startedOutput(t, bin, env, append(base, "--token-file", sharedTok, "--data-dir", data)); !strings.Contains(out, "readable by group nogroup") || !strings.Contains(out, "nobody") {
		t.Errorf("a token file readable by nogroup: no warning naming the group and its members:\n%s", out)
	}
	if out := startedOutput(t, bin, env, append(base, "--token-file", goodTok, "--data-dir", data)); strings.Contains(out, "readable by group") {
		t.Errorf("a 0600 token file drew a warning:\n%s", out)
	}
	ownGroupTok := filepath.Join(dir, "own-group.token")
	if err := os.WriteFile(ownGroupTok, []byte("agt_x\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if out := startedOutput(t, bin, env, append(base, "--token-file", ownGroupTok, "--data-dir", data)); strings.Contains(out, "readable by group") {
		t.Errorf("a token file readable only by the agent's own group drew a warning:\n%s", out)
	}
	runAgentOnce(t, bin, env, []string{"run", "--health-addr", "", "--coordinator-url", "http://192.0.2.1:1", "--token-file", goodTok, "--data-dir", data},
		"plain HTTP", "--insecure-http")
	runAgentOnce(t, bin, env, []string{"run", "--health-addr", "", "--coordinator-url", "http://192.0.2.1:1", "--insecure-http",
		"--fingerprint", strings.Repeat("ab", 32), "--token-file", goodTok, "--data-dir", data},
		"a pin needs https://")
}

// TestRunScrubsTokenFromProcess starts the real agent as an unprivileged
// user with its token on the command line and in the
// environment, as the attacker found it, and checks that neither
// /proc/PID/cmdline nor /proc/PID/environ of the running agent nor an SSH
// session's environment shows it, and that a session (same uid as the
// agent) cannot read the agent's environment at all.
//
// It also checks what another local user gets from the health listener
// and the status socket.
func TestRunScrubsTokenFromProcess(t *testing.T) {
	// A bare numeric uid, as containers often run the agent: its sessions
	// get /bin/sh.
	const agentUID, stranger = 4243, 4242
	bin := buildAgent(t)
	openPath(t, filepath.Dir(bin))
	dir := t.TempDir()
	ctx := context.Background()
	srv, ac, ws, ut := startSecretsCoordinator(t, dir)

	home := t.TempDir()
	openPath(t, home)
	if err := os.Chown(home, agentUID, agentUID); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(home, 0o700); err != nil {
		t.Fatal(err)
	}
	var logs lockedBuffer
	healthAddr := freeTCPAddr(t)
	stateDir := filepath.Join(home, "agent-state")
	agentCmd := exec.Command(bin, "run", "--coordinator-url", srv.URL(), "--fingerprint", srv.Fingerprint(),
		"--token", ws.Secret, "--data-dir", stateDir, "--health-addr", healthAddr)
	agentCmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + home, "AGENT_TOKEN=" + ws.Secret}
	agentCmd.Dir = home
	agentCmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: agentUID, Gid: agentUID}}
	agentCmd.Stdout, agentCmd.Stderr = &logs, &logs
	if err := agentCmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := agentCmd.Process.Pid
	t.Cleanup(func() {
		agentCmd.Process.Kill()
		agentCmd.Wait()
	})

	waitRegistered(t, ac, &logs)
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

	// A session started by the agent sees neither the token nor where it
	// was, and cannot read the agent's environment.
	sctx, scancel := context.WithTimeout(ctx, 60*time.Second)
	defer scancel()
	ssh := exec.CommandContext(sctx, bin, "ssh", "ws1", "--", "sh", "-c",
		fmt.Sprintf("env; echo; cat /proc/%d/environ >/dev/null 2>&1 && echo AGENT-ENVIRON-READABLE || echo AGENT-ENVIRON-DENIED", pid))
	ssh.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "XDG_CONFIG_HOME=" + dir,
		"AGENT_URL=" + srv.URL(), "AGENT_TOKEN=" + ut.Secret, "AGENT_FINGERPRINT=" + srv.Fingerprint()}
	out, err := ssh.CombinedOutput()
	if err != nil {
		t.Fatalf("agent ssh: %v\n%s\nagent log:\n%s", err, out, logs.String())
	}
	session, verdict, _ := strings.Cut(string(out), "\n\n")
	if !strings.Contains(session, "PATH=") {
		t.Fatalf("the session printed no environment:\n%s", out)
	}
	for _, bad := range []string{ws.Secret, "AGENT_TOKEN"} {
		if strings.Contains(session, bad) {
			t.Errorf("a session's environment contains %q:\n%s", bad, session)
		}
	}
	if !strings.Contains(verdict, "AGENT-ENVIRON-DENIED") {
		t.Errorf("a session running as the agent's uid could read /proc/%d/environ: %s", pid, verdict)
	}

	checkHealthForOtherUsers(t, healthAddr, stateDir, agentUID, stranger)
}

// startSecretsCoordinator runs a coordinator with user alice, her agent
// ws1 and a user token.
func startSecretsCoordinator(t *testing.T, dir string) (*coordinator.Server, *admin.Client, admin.AgentCreated, admin.TokenCreated) {
	t.Helper()
	coordDir := filepath.Join(dir, "coord")
	if err := os.Mkdir(coordDir, 0o700); err != nil {
		t.Fatal(err)
	}
	srv := serveCoordinator(t, coordinator.Config{DataDir: coordDir, Listen: "127.0.0.1:0"})
	ac, err := admin.DialSocket(t.Context(), admin.SocketPath(coordDir))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ac.CreateUser(t.Context(), "alice"); err != nil {
		t.Fatal(err)
	}
	ws, err := ac.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	ut, err := ac.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return srv, ac, ws, ut
}

// waitRegistered waits until an agent is connected to the coordinator.
func waitRegistered(t *testing.T, ac *admin.Client, logs *lockedBuffer) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := ac.Info(t.Context())
		if err == nil && len(info.Peers) > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not register within 30 s:\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRunAsPID1HandsTheTokenToItsChild runs the agent as PID 1 of a new
// PID namespace, as a container starts it, with the token in its
// environment: PID 1 re-executes itself without it, reaps, and hands the
// token to the agent child on a pipe; the agent registers, and neither
// process's /proc environment or command line shows the token.
func TestRunAsPID1HandsTheTokenToItsChild(t *testing.T) {
	bin := buildAgent(t)
	dir := t.TempDir()
	srv, ac, ws, _ := startSecretsCoordinator(t, dir)
	var logs lockedBuffer
	cmd := exec.Command("unshare", "--pid", "--fork", "--kill-child", bin, "run", "--coordinator-url", srv.URL(),
		"--fingerprint", srv.Fingerprint(), "--data-dir", filepath.Join(dir, "state"), "--health-addr", "")
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + dir, "AGENT_TOKEN=" + ws.Secret}
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// unshare's child is the namespace's PID 1; the agent is its child.
	// Killing PID 1 ends the namespace, then unshare returns; WaitDelay
	// keeps a failure before PID 1 is known from hanging the test.
	cmd.WaitDelay = 5 * time.Second
	var pid1 int
	t.Cleanup(func() {
		if pid1 > 0 {
			syscall.Kill(pid1, syscall.SIGKILL)
		}
		cmd.Process.Kill()
		cmd.Wait()
	})
	pid1 = onlyChild(t, cmd.Process.Pid)
	waitRegistered(t, ac, &logs)
	if !strings.Contains(logs.String(), "running as PID 1") {
		t.Fatalf("the agent did not run as PID 1 with a reaper:\n%s", logs.String())
	}
	agentPID := onlyChild(t, pid1)
	for _, pid := range []int{pid1, agentPID} {
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(b, []byte(ws.Secret)) {
				t.Errorf("/proc/%d/%s shows the token", pid, f)
			}
		}
	}
}

// onlyChild returns the one child of pid. Children are listed per thread
// that forked them, so every thread is read.
func onlyChild(t *testing.T, pid int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var kids []string
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
		for _, task := range tasks {
			b, _ := os.ReadFile(task)
			kids = append(kids, strings.Fields(string(b))...)
		}
		if len(kids) == 1 {
			n, _ := strconv.Atoi(kids[0])
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d has children %q, want one", pid, kids)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// openPath lets other users traverse dir and its parent (test temporary
// directories are 0700 root).
func openPath(t *testing.T, dir string) {
	t.Helper()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
}

// freeTCPAddr returns a loopback address nothing listens on just now.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// curlAs runs curl as uid and returns the HTTP status code and body; code
// 0 means no HTTP answer.
func curlAs(t *testing.T, uid uint32, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "curl", append([]string{"-s", "-w", "\n%{http_code}"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, _ := cmd.Output()
	s := strings.TrimRight(string(out), "\n")
	i := strings.LastIndex(s, "\n")
	code, _ := strconv.Atoi(s[i+1:])
	if i < 0 {
		return code, ""
	}
	return code, s[:i]
}

// checkHealthForOtherUsers: another local user gets the bare health and
// readiness, never peers or users; the owner gets the full status on the
// socket in the data directory, and nobody else does even when the socket
// is opened up by mistake.
func checkHealthForOtherUsers(t *testing.T, healthAddr, stateDir string, owner, other uint32) {
	base := "http://" + healthAddr
	code, body := curlAs(t, other, base+"/readyz")
	if code != http.StatusOK || !strings.Contains(body, `"ready": true`) || !strings.Contains(body, `"name": "ws1"`) {
		t.Errorf("/readyz for another user: %d %s", code, body)
	}
	for _, leak := range []string{"peers", "alice", "addresses"} {
		if strings.Contains(body, leak) {
			t.Errorf("/readyz shows %q to every local user:\n%s", leak, body)
		}
	}
	if code, body := curlAs(t, other, base+"/status"); code != http.StatusForbidden || !strings.Contains(body, "status.sock") {
		t.Errorf("/status for another user: %d %s", code, body)
	}
	if code, body := curlAs(t, other, base+"/metrics"); code != http.StatusOK || strings.Contains(body, "agent_peer_path") || !strings.Contains(body, "agent_connections_total") {
		t.Errorf("/metrics for another user: %d, peer_path shown=%v", code, strings.Contains(body, "agent_peer_path"))
	}

	sock := filepath.Join(stateDir, "status.sock")
	code, body = curlAs(t, owner, "--unix-socket", sock, "http://agent/status")
	if code != http.StatusOK || !strings.Contains(body, `"peers"`) || !strings.Contains(body, `"name": "ws1"`) {
		t.Errorf("owner's /status on %s: %d %s", sock, code, body)
	}
	// The goroutine dump, for finding what holds an agent above idle.
	if code, body := curlAs(t, owner, "--unix-socket", sock, "http://agent/debug/goroutines"); code != http.StatusOK || !strings.Contains(body, "goroutine profile: total") {
		t.Errorf("owner's /debug/goroutines on %s: %d %.200s", sock, code, body)
	}
	if code, body := curlAs(t, other, base+"/debug/goroutines"); code != http.StatusNotFound && code != http.StatusMethodNotAllowed || strings.Contains(body, "goroutine") {
		t.Errorf("/debug/goroutines on the health listener: %d %.200s", code, body)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("status socket: %v, want mode 0600", err)
	}
	if code, body := curlAs(t, other, "--unix-socket", sock, "http://agent/status"); code == http.StatusOK || strings.Contains(body, "peers") {
		t.Errorf("another user on the status socket: %d %s", code, body)
	}
	// Opened up by mistake: the peer credential check still refuses.
	for _, d := range []string{stateDir, filepath.Dir(stateDir)} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	if code, body := curlAs(t, other, "--unix-socket", sock, "http://agent/status"); code != http.StatusForbidden || strings.Contains(body, "peers") {
		t.Errorf("another user on an opened-up status socket: %d %s", code, body)
	}
	if code, body := curlAs(t, other, "--unix-socket", sock, "http://agent/debug/goroutines"); code != http.StatusForbidden || strings.Contains(body, "goroutine profile") {
		t.Errorf("another user's /debug/goroutines on an opened-up status socket: %d %.200s", code, body)
	}
}

// TestAdminAsAnotherUserSaysWhatItNeeds runs the real `agent admin` as a
// user who neither is root nor owns the data directory, with and without a
// running coordinator: one line saying who may, not a database error.
func TestAdminAsAnotherUserSaysWhatItNeeds(t *testing.T) {
	const stranger = 4242
	bin := buildAgent(t)
	openPath(t, filepath.Dir(bin))
	dir := t.TempDir()
	openPath(t, dir)
	coordDir := filepath.Join(dir, "coord")
	if err := os.Mkdir(coordDir, 0o755); err != nil { // readable, as a careless install leaves it
		t.Fatal(err)
	}
	run := func() string {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "admin", "--data-dir", coordDir, "list")
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: stranger, Gid: stranger}}
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Fatalf("agent admin as uid %d succeeded:\n%s", stranger, out)
		}
		return string(out)
	}
	want := "needs root or the owner of the coordinator's data directory " + coordDir
	if out := run(); !strings.Contains(out, want) || !strings.Contains(out, "root (uid 0)") || strings.Contains(out, "bolt") || strings.Contains(out, ".db") {
		t.Errorf("offline: %s", out)
	}
	serveCoordinator(t, coordinator.Config{DataDir: coordDir, Listen: "127.0.0.1:0"})
	if out := run(); !strings.Contains(out, want) {
		t.Errorf("with a running coordinator: %s", out)
	}
}

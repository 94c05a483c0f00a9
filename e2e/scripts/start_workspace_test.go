package scripts

import (
	"bytes"
	"context"
	"github.com/agentd/agent/internal/syncbuf"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// shells are the POSIX shells the scripts must work with: dash (Debian's
// /bin/sh) and busybox (minimal and Alpine-style images).
func shells(t *testing.T) map[string][]string {
	t.Helper()
	s := map[string][]string{"dash": {"/bin/sh"}}
	if p, err := exec.LookPath("busybox"); err == nil {
		s["busybox"] = []string{p, "sh"}
	} else {
		t.Logf("busybox not installed (apt-get install busybox-static): testing with dash only")
	}
	return s
}

type result struct {
	code           int
	stdout, stderr string
}

// runScript runs a script in a clean environment (only what the test sets).
func runScript(t *testing.T, shell []string, name string, environ []string, cred *syscall.Credential, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	argv := append(append(append([]string{}, shell[1:]...), script(name)), args...)
	cmd := exec.CommandContext(ctx, shell[0], argv...)
	cmd.Env = environ
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("run %s: %v", name, err)
		}
		code = ee.ExitCode()
	}
	return result{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func hostPath() string { return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" }

// tokenFile writes a token readable only by root.
func tokenFile(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "token")
	writeFile(t, p, "agt_secret_token_value\n", 0o600)
	return p
}

func TestStartWorkspaceRefusesBadSetups(t *testing.T) {
	dir := worldDir(t)
	tok := tokenFile(t, dir)
	empty := filepath.Join(dir, "empty")
	writeFile(t, empty, "", 0o644)
	notExec := filepath.Join(dir, "agent-noexec")
	copyFile(t, env.agent, notExec, 0o644)
	notAgent := filepath.Join(dir, "not-an-agent")
	writeFile(t, notAgent, "\x7fELF\x02\x01\x01garbage that is no program", 0o755)
	url := "http://" + closedPort(t)

	cases := []struct {
		name    string
		environ []string
		want    string
	}{
		{"binary missing", []string{"AGENT_BIN=" + filepath.Join(dir, "nope"), "AGENT_URL=" + url, "AGENT_TOKEN=x"},
			"not found; install it"},
		{"binary not executable", []string{"AGENT_BIN=" + notExec, "AGENT_URL=" + url, "AGENT_TOKEN=x"},
			"is not an executable file"},
		{"binary does not run", []string{"AGENT_BIN=" + notAgent, "AGENT_URL=" + url, "AGENT_TOKEN=x"},
			"does not run on this machine"},
		{"no URL", []string{"AGENT_BIN=" + env.agent, "AGENT_TOKEN=x"},
			"AGENT_URL is not set"},
		{"URL without scheme", []string{"AGENT_BIN=" + env.agent, "AGENT_URL=coordinator:8080", "AGENT_TOKEN=x"},
			"is not an http:// or https:// URL"},
		{"no token", []string{"AGENT_BIN=" + env.agent, "AGENT_URL=" + url},
			"no agent token: set AGENT_TOKEN_FILE"},
		{"token file missing", []string{"AGENT_BIN=" + env.agent, "AGENT_URL=" + url, "AGENT_TOKEN_FILE=" + filepath.Join(dir, "missing")},
			"does not exist; mount the token secret"},
		{"token file is a directory", []string{"AGENT_BIN=" + env.agent, "AGENT_URL=" + url, "AGENT_TOKEN_FILE=" + dir},
			"is not a regular file"},
		{"token file empty", []string{"AGENT_BIN=" + env.agent, "AGENT_URL=" + url, "AGENT_TOKEN_FILE=" + empty},
			"is empty"},
		{"wait attempts not a number", []string{"AGENT_BIN=" + env.agent, "AGENT_URL=" + url, "AGENT_TOKEN_FILE=" + tok, "AGENT_WAIT_ATTEMPTS=ten"},
			"AGENT_WAIT_ATTEMPTS=ten is not a whole number"},
	}
	for shellName, sh := range shells(t) {
		for _, c := range cases {
			t.Run(shellName+"/"+c.name, func(t *testing.T) {
				r := runScript(t, sh, "start-workspace", append([]string{"PATH=" + hostPath()}, c.environ...), nil)
				if r.code != 1 {
					t.Fatalf("exit status %d, want 1; stderr:\n%s", r.code, r.stderr)
				}
				lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
				last := lines[len(lines)-1]
				if !strings.HasPrefix(last, "start-workspace: ") || !strings.Contains(last, c.want) {
					t.Fatalf("last stderr line %q, want a start-workspace line containing %q", last, c.want)
				}
				if strings.Contains(r.stderr, "agt_secret_token_value") {
					t.Fatal("the token appears in the script's output")
				}
			})
		}
	}
}

func TestStartWorkspaceChecksPermissionsAsUnprivilegedUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the script as another user")
	}
	dir := worldDir(t)
	tok := tokenFile(t, dir) // 0600 root: unreadable for nobody
	readable := filepath.Join(dir, "readable-token")
	writeFile(t, readable, "agt_secret_token_value\n", 0o644)
	rootOnly := filepath.Join(dir, "root-only")
	if err := os.Mkdir(rootOnly, 0o755); err != nil {
		t.Fatal(err)
	}
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	url := "http://" + closedPort(t)
	base := []string{"PATH=" + hostPath(), "AGENT_BIN=" + env.agent, "AGENT_URL=" + url}
	for shellName, sh := range shells(t) {
		t.Run(shellName, func(t *testing.T) {
			r := runScript(t, sh, "start-workspace", append(base, "AGENT_TOKEN_FILE="+tok), nobody)
			if r.code != 1 || !strings.Contains(r.stderr, "is not readable by uid 65534") {
				t.Errorf("unreadable token: exit %d, stderr %q; want 1 and 'is not readable by uid 65534'", r.code, r.stderr)
			}
			r = runScript(t, sh, "start-workspace", append(base, "AGENT_TOKEN_FILE="+readable, "AGENT_DATA_DIR="+rootOnly), nobody)
			if r.code != 1 || !strings.Contains(r.stderr, "is not writable by uid 65534") {
				t.Errorf("read-only data dir: exit %d, stderr %q; want 1 and 'is not writable by uid 65534'", r.code, r.stderr)
			}
			r = runScript(t, sh, "start-workspace", append(base, "AGENT_TOKEN_FILE="+readable, "AGENT_DATA_DIR="+filepath.Join(rootOnly, "sub")), nobody)
			if r.code != 1 || !strings.Contains(r.stderr, "cannot be created by uid 65534") {
				t.Errorf("uncreatable data dir: exit %d, stderr %q; want 1 and 'cannot be created by uid 65534'", r.code, r.stderr)
			}
		})
	}
}

// TestStartWorkspaceGivesUpOnUnreachableCoordinator runs the wait loop
// against a closed loopback port with each downloader the script can use.
func TestStartWorkspaceGivesUpOnUnreachableCoordinator(t *testing.T) {
	dir := worldDir(t)
	tok := tokenFile(t, dir)
	url := "http://" + closedPort(t)
	downloaders := map[string]string{
		"curl":     pathWith(t, append(baseTools, "curl")...),
		"gnu-wget": pathWith(t, append(baseTools, "wget")...),
	}
	if bb, err := exec.LookPath("busybox"); err == nil {
		d := pathWith(t, baseTools...)
		if err := os.Symlink(bb, filepath.Join(d, "wget")); err != nil {
			t.Fatal(err)
		}
		downloaders["busybox-wget"] = d
	}
	sh := []string{"/bin/sh"}
	for name, path := range downloaders {
		t.Run(name, func(t *testing.T) {
			start := time.Now()
			r := runScript(t, sh, "start-workspace", []string{
				"PATH=" + path, "AGENT_BIN=" + env.agent, "AGENT_URL=" + url + "/",
				"AGENT_TOKEN_FILE=" + tok, "AGENT_WAIT_ATTEMPTS=3", "AGENT_WAIT_INTERVAL=1",
			}, nil)
			elapsed := time.Since(start)
			if r.code != 1 {
				t.Fatalf("exit status %d, want 1; stderr:\n%s", r.code, r.stderr)
			}
			for _, want := range []string{
				"waiting for the coordinator at " + url + " (attempt 1/3): ",
				"(attempt 2/3)",
				"did not answer GET /healthz after 3 attempts (last: ",
			} {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
				}
			}
			if strings.Contains(r.stderr, "(attempt 3/3)") {
				t.Errorf("the last attempt should end in the final error, not a waiting line:\n%s", r.stderr)
			}
			// The reason must be the tool's own, not an empty "last: )".
			if strings.Contains(r.stderr, "(last: )") || strings.Contains(r.stderr, "): \n") {
				t.Errorf("a failure reason is empty:\n%s", r.stderr)
			}
			if elapsed < 2*time.Second {
				t.Errorf("3 attempts 1 s apart took %v, want at least 2 s", elapsed)
			}
		})
	}
}

// TestStartWorkspaceWaitsThenStartsAgent serves 503 twice, then 200, and
// checks the script then becomes `agent run` with its arguments.
func TestStartWorkspaceWaitsThenStartsAgent(t *testing.T) {
	if !agentHasRun(t) {
		t.Skip("this build of the agent has no `run` command yet")
	}
	var hits atomic.Int32
	var sawCredentials atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
			return
		}
		if r.Header.Get("Authorization") != "" || strings.Contains(r.URL.RawQuery, "agt_") {
			sawCredentials.Store(true)
		}
		if hits.Add(1) <= 2 {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	}))
	defer srv.Close()
	dir := worldDir(t)
	tok := tokenFile(t, dir)
	dataDir := filepath.Join(dir, "data", "agent")

	r := runScript(t, []string{"/bin/sh"}, "start-workspace", []string{
		"PATH=" + hostPath(), "AGENT_BIN=" + env.agent, "AGENT_URL=" + srv.URL,
		"AGENT_TOKEN_FILE=" + tok, "AGENT_DATA_DIR=" + dataDir,
		"AGENT_WAIT_ATTEMPTS=5", "AGENT_WAIT_INTERVAL=0",
	}, nil, "--help")
	if r.code != 0 {
		t.Fatalf("exit status %d, want 0 from `agent run --help`; stderr:\n%s", r.code, r.stderr)
	}
	if n := hits.Load(); n != 3 {
		t.Errorf("the script probed /healthz %d times, want 3 (two 503s, then 200)", n)
	}
	if sawCredentials.Load() {
		t.Error("the health probe carried the token")
	}
	if !strings.Contains(r.stderr, "(attempt 2/5): curl: (22)") || !strings.Contains(r.stderr, "coordinator at "+srv.URL+" is up") {
		t.Errorf("stderr lacks the waiting and up lines:\n%s", r.stderr)
	}
	if !strings.Contains(r.stdout+r.stderr, "--coordinator-url") {
		t.Errorf("the script did not end in `agent run --help`; output:\n%s%s", r.stdout, r.stderr)
	}
	if fi, err := os.Stat(dataDir); err != nil || !fi.IsDir() {
		t.Errorf("AGENT_DATA_DIR was not created: %v", err)
	}
}

// TestStartWorkspaceWithoutDownloaderLeavesWaitingToAgent: an image with
// neither curl nor wget (debian:bookworm-slim) still starts the agent.
func TestStartWorkspaceWithoutDownloaderLeavesWaitingToAgent(t *testing.T) {
	if !agentHasRun(t) {
		t.Skip("this build of the agent has no `run` command yet")
	}
	dir := worldDir(t)
	tok := tokenFile(t, dir)
	r := runScript(t, []string{"/bin/sh"}, "start-workspace", []string{
		"PATH=" + pathWith(t, baseTools...), "AGENT_BIN=" + env.agent,
		"AGENT_URL=http://" + closedPort(t), "AGENT_TOKEN_FILE=" + tok,
	}, nil, "--help")
	if r.code != 0 {
		t.Fatalf("exit status %d, want 0 from `agent run --help`; stderr:\n%s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "no curl (or wget for this URL) in this image") {
		t.Errorf("stderr lacks the note about not waiting:\n%s", r.stderr)
	}
}

// TestStartWorkspaceStopsPromptlyOnSIGTERM: as PID 1 a shell ignores SIGTERM
// unless it handles it; the script must stop while waiting, not after the
// runtime's grace period.
func TestStartWorkspaceStopsPromptlyOnSIGTERM(t *testing.T) {
	dir := worldDir(t)
	tok := tokenFile(t, dir)
	for shellName, sh := range shells(t) {
		t.Run(shellName, func(t *testing.T) {
			argv := append(append([]string{}, sh[1:]...), script("start-workspace"))
			cmd := exec.Command(sh[0], argv...)
			cmd.Env = []string{"PATH=" + hostPath(), "AGENT_BIN=" + env.agent, "AGENT_URL=http://" + closedPort(t),
				"AGENT_TOKEN_FILE=" + tok, "AGENT_WAIT_ATTEMPTS=100", "AGENT_WAIT_INTERVAL=60"}
			stderr := &syncbuf.Buffer{}
			cmd.Stderr = stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(20 * time.Second)
			for !strings.Contains(stderr.String(), "(attempt 1/100)") {
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("no waiting line within 20 s; stderr:\n%s", stderr.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			// Give the shell a moment to enter `wait` on its 60 s sleep.
			time.Sleep(200 * time.Millisecond)
			sent := time.Now()
			cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if took := time.Since(sent); took > 5*time.Second {
					t.Errorf("stopped %v after SIGTERM, want well under the 60 s sleep", took)
				}
				ee, ok := err.(*exec.ExitError)
				if !ok || ee.ExitCode() != 143 {
					t.Errorf("exit %v, want status 143", err)
				}
				if !strings.Contains(stderr.String(), "stopped by signal while starting") {
					t.Errorf("stderr lacks the stop message:\n%s", stderr.String())
				}
			case <-time.After(15 * time.Second):
				cmd.Process.Kill()
				<-done
				t.Fatal("the script ignored SIGTERM for 15 s")
			}
		})
	}
}

func agentHasRun(t *testing.T) bool {
	t.Helper()
	out, err := exec.Command(env.agent, "run", "--help").CombinedOutput()
	return err == nil && strings.Contains(string(out), "--coordinator-url")
}

// TestStartWorkspaceSelfSignedCoordinator: with a pinned fingerprint the
// probe accepts the self-signed certificate (the agent checks the pin);
// without one, an unverifiable certificate is reported as the reason.
func TestStartWorkspaceSelfSignedCoordinator(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	}))
	defer srv.Close()
	dir := worldDir(t)
	tok := tokenFile(t, dir)
	downloaders := map[string]string{
		"curl":     pathWith(t, append(baseTools, "curl")...),
		"gnu-wget": pathWith(t, append(baseTools, "wget")...),
	}
	for name, path := range downloaders {
		t.Run(name, func(t *testing.T) {
			base := []string{"PATH=" + path, "AGENT_BIN=" + env.agent, "AGENT_URL=" + srv.URL,
				"AGENT_TOKEN_FILE=" + tok, "AGENT_WAIT_ATTEMPTS=1"}
			r := runScript(t, []string{"/bin/sh"}, "start-workspace", base, nil, "--help")
			if r.code != 1 || !strings.Contains(r.stderr, "did not answer GET /healthz after 1 attempts") ||
				!strings.Contains(strings.ToLower(r.stderr), "certificate") {
				t.Errorf("unpinned self-signed: exit %d, stderr %q; want 1 and a certificate error", r.code, r.stderr)
			}
			r = runScript(t, []string{"/bin/sh"}, "start-workspace", append(base, "AGENT_FINGERPRINT=00ff"), nil, "--help")
			if !strings.Contains(r.stderr, "coordinator at "+srv.URL+" is up") {
				t.Errorf("pinned self-signed: exit %d, stderr %q; want the coordinator reported up", r.code, r.stderr)
			}
		})
	}
}

// TestStartWorkspaceBusyboxWgetOnlyForHTTP: BusyBox wget's TLS is not
// trusted with an https:// coordinator; the script leaves waiting to the
// agent instead of failing a healthy start.
func TestStartWorkspaceBusyboxWgetOnlyForHTTP(t *testing.T) {
	if !agentHasRun(t) {
		t.Skip("this build of the agent has no `run` command yet")
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox not installed (apt-get install busybox-static)")
	}
	path := pathWith(t, baseTools...)
	if err := os.Symlink(bb, filepath.Join(path, "wget")); err != nil {
		t.Fatal(err)
	}
	dir := worldDir(t)
	tok := tokenFile(t, dir)
	r := runScript(t, []string{"/bin/sh"}, "start-workspace", []string{
		"PATH=" + path, "AGENT_BIN=" + env.agent,
		"AGENT_URL=https://" + closedPort(t), "AGENT_TOKEN_FILE=" + tok,
	}, nil, "--help")
	if r.code != 0 || !strings.Contains(r.stderr, "not waiting for the coordinator here") {
		t.Errorf("https with busybox wget only: exit %d, stderr %q; want 0 and the not-waiting note", r.code, r.stderr)
	}
}

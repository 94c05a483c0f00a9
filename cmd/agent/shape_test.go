package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/agent"
	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
)

// parseCmd runs args through the real root command with the command args[0]
// rebuilt by build (around a run function that only records its options),
// and returns the exit status main would give and what it said.
func parseCmd(t *testing.T, vars map[string]string, build func(*cliEnv) *cobra.Command, args ...string) (code int, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	env := &cliEnv{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errOut, Getenv: func(k string) string { return vars[k] }}
	root := newRootCmd(env)
	old, _, err := root.Find(args[:1])
	if err != nil || old == root {
		t.Fatalf("no command %q", args[0])
	}
	root.RemoveCommand(old)
	root.AddCommand(build(env))
	root.SetArgs(args)
	if err := root.ExecuteContext(context.Background()); err != nil {
		return exitCode(err), errOut.String() + err.Error()
	}
	return 0, errOut.String()
}

// Command lines these commands cannot run exit 2 with a sentence, before
// anything starts.
func TestServerCommandsUsageErrorsExit2(t *testing.T) {
	for _, args := range [][]string{
		{"coordinator", "extra"},
		{"coordinator", "--listen"},
		{"dev", "extra"},
		{"dev", "--no-such-flag"},
		{"run", "extra"},
		{"run", "--listen-port", "70000"},
		{"version", "extra"},
		{"config-ssh", "--dry-run=maybe"},
		{"login", "a", "b"},
		{"admin", "user", "create"},
		{"admin", "grant", "alice"},
		{"admin", "list", "extra"},
		{"admin", "agent", "create", "ws1"},
		{"admin", "token", "create"},
		{"admin", "token", "create", "--user", "a", "--agent", "b"},
	} {
		_, stderr, code := runClientCLI(t, map[string]string{"AGENT_COORDINATOR_DATA_DIR": t.TempDir()}, args...)
		if code != 2 {
			t.Errorf("agent %s: exit status %d, want 2 (%s)", strings.Join(args, " "), code, stderr)
		}
		if stderr == "" {
			t.Errorf("agent %s: no message", strings.Join(args, " "))
		}
	}
}

// Secrets come from the environment but never show in --help; "off" turns
// the STUN listeners off; flags win over the environment.
func TestCoordinatorOptions(t *testing.T) {
	vars := map[string]string{
		"AGENT_POSTGRES_URL":             "postgres://u:hunter2@db.example/agent",
		"AGENT_MESH_KEY":                 "meshsecret",
		"AGENT_COORDINATOR_DATA_DIR":     "/srv/coord",
		"AGENT_COORDINATOR_METRICS_ADDR": "127.0.0.1:9999",
		"AGENT_TLS_CERT":                 "/etc/c.pem",
	}
	var got *coordinatorOptions
	capture := func(env *cliEnv) *cobra.Command {
		return newCoordinatorCmdWith(env, func(_ context.Context, _ *cliEnv, o *coordinatorOptions) error { got = o; return nil })
	}
	if code, stderr := parseCmd(t, vars, capture, "coordinator", "--stun-addr", "off", "--listen", "127.0.0.1:9443", "--max-sessions-per-token", "7"); code != 0 {
		t.Fatal(stderr)
	}
	c := got.cfg
	if c.PostgresURL != vars["AGENT_POSTGRES_URL"] || c.MeshKey != "meshsecret" || c.DataDir != "/srv/coord" || c.TLSCertFile != "/etc/c.pem" {
		t.Errorf("environment not read: %+v", c)
	}
	if c.STUNAddr != "" || c.STUNAddr2 != "" || c.Listen != "127.0.0.1:9443" || c.Limits.MaxSessionsPerToken != 7 || got.metricsAddr != "127.0.0.1:9999" {
		t.Errorf("flags not parsed: %+v, metrics %q", c, got.metricsAddr)
	}
	if code, _ := parseCmd(t, vars, capture, "coordinator", "--postgres-url", "postgres://flag@db/x", "--data-dir", "/d"); code != 0 || got.cfg.PostgresURL != "postgres://flag@db/x" || got.cfg.DataDir != "/d" {
		t.Errorf("flags should win over the environment: %+v", got.cfg)
	}
	out, _, _ := runClientCLI(t, vars, "coordinator", "--help")
	if strings.Contains(out, "hunter2") || strings.Contains(out, "meshsecret") {
		t.Errorf("--help shows a secret from the environment:\n%s", out)
	}
}

// The coordinator serves, prints how to get going and its metrics URL, and
// stops when its context ends.
func TestCoordinatorServesAndStops(t *testing.T) {
	dir := t.TempDir()
	out := &lockedBuffer{}
	env := &cliEnv{Stdin: strings.NewReader(""), Stdout: out, Stderr: &lockedBuffer{}, Getenv: func(string) string { return "" }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	o := &coordinatorOptions{metricsAddr: "127.0.0.1:0"}
	o.cfg = coordinator.Config{DataDir: dir, Listen: "127.0.0.1:0", STUNAddr: "127.0.0.1:0"}
	go func() { done <- runCoordinator(ctx, env, o) }()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "agent login") {
		if time.Now().After(deadline) {
			t.Fatalf("no banner:\n%s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	banner := out.String()
	for _, want := range []string{"agent coordinator serving https://127.0.0.1:", "certificate fingerprint (sha256): ", "agent admin --data-dir " + dir + " user create alice"} {
		if !strings.Contains(banner, want) {
			t.Errorf("banner lacks %q:\n%s", want, banner)
		}
	}
	m := regexp.MustCompile(`metrics: (http://\S+)`).FindStringSubmatch(banner)
	if m == nil {
		t.Fatalf("banner names no metrics URL:\n%s", banner)
	}
	resp, err := http.Get(m[1])
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET %s: %s", m[1], resp.Status)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("the coordinator did not stop when its context ended")
	}
}

func TestDevOptions(t *testing.T) {
	var got *devOptions
	capture := func(env *cliEnv) *cobra.Command {
		return newDevCmdWith(env, func(_ context.Context, _ *cliEnv, o *devOptions) error { got = o; return nil })
	}
	if code, stderr := parseCmd(t, nil, capture, "dev"); code != 0 {
		t.Fatal(stderr)
	}
	if want := (devOptions{dataDir: "agent-data", listen: "127.0.0.1:7443", stunAddr: "127.0.0.1:0", name: "dev", user: "dev", memoryLimit: defaultDevMemoryLimit}); *got != want {
		t.Errorf("defaults = %+v, want %+v", *got, want)
	}
	if code, stderr := parseCmd(t, map[string]string{"AGENT_SHELL": "/bin/sh"}, capture, "dev", "--data-dir", "/d", "--listen", ":1", "--stun-addr", ":2", "--name", "ws9", "--user", "ann"); code != 0 {
		t.Fatal(stderr)
	}
	if want := (devOptions{dataDir: "/d", listen: ":1", stunAddr: ":2", name: "ws9", user: "ann", shell: "/bin/sh", memoryLimit: defaultDevMemoryLimit}); *got != want {
		t.Errorf("flags = %+v, want %+v", *got, want)
	}
}

// agent run takes everything from the environment a container sets, and
// the command line wins; --coordinator-url and --url are one flag.
func TestRunOptions(t *testing.T) {
	vars := map[string]string{
		"AGENT_URL": "https://coord.example:8443", "AGENT_TOKEN_FILE": "/run/secrets/token", "AGENT_FINGERPRINT": "ab",
		"AGENT_INSECURE_HTTP": "1", "AGENT_DATA_DIR": "/state", "AGENT_HEALTH_ADDR": ":2", "AGENT_SHELL": "/bin/sh",
		"AGENT_MEMORY_LIMIT": "64MiB", "AGENT_ALLOW_INSECURE_PERMISSIONS": "1",
	}
	var got *runOptions
	capture := func(env *cliEnv) *cobra.Command {
		return newRunCmdWith(env, func(_ context.Context, _ *cliEnv, o *runOptions) error { got = o; return nil })
	}
	if code, stderr := parseCmd(t, vars, capture, "run"); code != 0 {
		t.Fatal(stderr)
	}
	want := runOptions{url: "https://coord.example:8443", tokenFile: "/run/secrets/token", fingerprint: "ab", insecureHTTP: true,
		dataDir: "/state", healthAddr: ":2", shell: "/bin/sh", memoryLimit: "64MiB", allowInsecurePerms: true,
		sessionIdle: sshd.DefaultSessionIdleTimeout, deadPeer: agent.DefaultDeadPeerTimeout}
	if *got != want {
		t.Errorf("from the environment: %+v, want %+v", *got, want)
	}
	for _, flag := range []string{"--url", "--coordinator-url"} {
		if code, stderr := parseCmd(t, vars, capture, "run", flag, "https://other.example", "--listen-port", "41641", "--memory-limit", "0", "--session-idle-timeout", "10m"); code != 0 {
			t.Fatal(stderr)
		}
		if got.url != "https://other.example" || got.listenPort != 41641 || got.memoryLimit != "0" || got.sessionIdle != 10*time.Minute {
			t.Errorf("%s: %+v", flag, *got)
		}
	}
	if code, _ := parseCmd(t, nil, capture, "run"); code != 0 || got.healthAddr != "127.0.0.1:2113" || got.memoryLimit != defaultMemoryLimit {
		t.Errorf("defaults: %+v", *got)
	}
}

func TestNetcheckOptions(t *testing.T) {
	var got *netcheckOptions
	capture := func(env *cliEnv) *cobra.Command {
		return newNetcheckCmdWith(env, func(_ context.Context, _ *cliEnv, o *netcheckOptions) error { got = o; return nil })
	}
	// Wrong options exit 1 as docs/netcheck.md says: 2 means "broken".
	for _, args := range [][]string{
		{"netcheck", "extra"},
		{"netcheck", "--fix"},
		{"netcheck", "--dry-run"},
		{"netcheck", "--host", "--fix", "--watch"},
		{"netcheck", "--metrics-addr", ":0"},
		{"netcheck", "--timeout", "soon"},
		{"netcheck", "--no-such-flag"},
	} {
		got = nil
		if code, stderr := parseCmd(t, nil, capture, args...); code != 1 || stderr == "" || got != nil {
			t.Errorf("agent %s: exit status %d (%q), ran: %v; want 1 with a message, before running", strings.Join(args, " "), code, stderr, got != nil)
		}
	}
	if code, stderr := parseCmd(t, nil, capture, "netcheck", "--host", "--root", "/host", "--bridge", "br0", "--bridge", "cni0", "--fix", "--pattern", "veth*", "--json"); code != 0 {
		t.Fatal(stderr)
	}
	if !got.host || !got.fix || !got.jsonOut || got.nodeOpts.Root != "/host" || strings.Join(got.nodeOpts.Bridges, ",") != "br0,cni0" || strings.Join(got.guardPattern, ",") != "veth*" {
		t.Errorf("node flags: %+v", *got)
	}
	if code, stderr := parseCmd(t, nil, capture, "netcheck", "--watch", "--interval", "5s", "--metrics-addr", ":9153", "--stun-port", "3479"); code != 0 {
		t.Fatal(stderr)
	}
	if !got.watch || got.interval != 5*time.Second || got.metricsAddr != ":9153" || got.opts.STUNPort != 3479 {
		t.Errorf("watch flags: %+v", *got)
	}
}

func TestVersionOptions(t *testing.T) {
	var got *versionOptions
	capture := func(env *cliEnv) *cobra.Command {
		return newVersionCmdWith(env, func(_ *cliEnv, o *versionOptions) error { got = o; return nil })
	}
	if code, stderr := parseCmd(t, nil, capture, "version", "--json"); code != 0 || !got.json {
		t.Fatalf("version --json: %d %s %+v", code, stderr, got)
	}
	out, stderr, code := runClientCLI(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "agent ") || !strings.Contains(out, "  go:        go") {
		t.Errorf("agent version: %d %s\n%s", code, stderr, out)
	}
}

// config-ssh writes its block into ~/.ssh/config (HOME from the
// environment), OpenSSH reads it, and a second run changes nothing.
func TestConfigSSHWithOpenSSH(t *testing.T) {
	sshBin, err := exec.LookPath("ssh")
	if err != nil {
		t.Fatalf("OpenSSH's ssh is needed (Debian package openssh-client): %v", err)
	}
	home := t.TempDir()
	cfg := filepath.Join(home, ".ssh", "config")
	if err := os.MkdirAll(filepath.Dir(cfg), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte("Host other\n    User bob\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{"HOME": home}
	out, stderr, code := runClientCLI(t, vars, "config-ssh", "--dry-run")
	if code != 0 || !strings.Contains(out, "+Host *.agent") || !strings.Contains(out, "dry run") {
		t.Fatalf("--dry-run: %d %s\n%s", code, stderr, out)
	}
	if b, _ := os.ReadFile(cfg); strings.Contains(string(b), "agent") {
		t.Fatalf("--dry-run wrote the file:\n%s", b)
	}
	if out, stderr, code = runClientCLI(t, vars, "config-ssh"); code != 0 || !strings.Contains(out, "Updated "+cfg) {
		t.Fatalf("config-ssh: %d %s\n%s", code, stderr, out)
	}
	g, err := exec.Command(sshBin, "-F", cfg, "-G", "ws1.agent").CombinedOutput()
	if err != nil {
		t.Fatalf("ssh -G: %v\n%s", err, g)
	}
	exe, _ := os.Executable()
	exe, _ = filepath.EvalSymlinks(exe)
	for _, want := range []string{"proxycommand " + exe + " ssh --stdio %h", "stricthostkeychecking true"} {
		if !strings.Contains(string(g), want+"\n") {
			t.Errorf("ssh -G ws1.agent lacks %q:\n%s", want, g)
		}
	}
	if g, _ := exec.Command(sshBin, "-F", cfg, "-G", "other").CombinedOutput(); !strings.Contains(string(g), "user bob\n") || strings.Contains(string(g), "proxycommand") {
		t.Errorf("the rest of the file changed meaning:\n%s", g)
	}
	if out, _, code = runClientCLI(t, vars, "config-ssh"); code != 0 || !strings.Contains(out, "already up to date") {
		t.Errorf("second run: %d\n%s", code, out)
	}
}

// login takes the URL without a trailing slash and AGENT_INSECURE_HTTP; a
// real login saves a profile the client commands read, and an agent's
// token is refused.
func TestLoginOptionsAndProfile(t *testing.T) {
	var got *loginOptions
	capture := func(env *cliEnv) *cobra.Command {
		return newLoginCmdWith(env, func(_ context.Context, _ *cliEnv, o *loginOptions) error { got = o; return nil })
	}
	if code, stderr := parseCmd(t, map[string]string{"AGENT_INSECURE_HTTP": "1"}, capture, "login", "http://coord.example:8080/ ", "--token-file", "/t"); code != 0 {
		t.Fatal(stderr)
	}
	if want := (loginOptions{url: "http://coord.example:8080", tokenFile: "/t", insecureHTTP: true}); *got != want {
		t.Errorf("login options = %+v, want %+v", *got, want)
	}

	dir := t.TempDir()
	vars := map[string]string{"AGENT_COORDINATOR_DATA_DIR": dir, "XDG_CONFIG_HOME": t.TempDir(), "HOME": t.TempDir()}
	for _, args := range [][]string{{"admin", "user", "create", "alice"}, {"admin", "agent", "create", "ws1", "--owner", "alice"}} {
		if _, stderr, code := runClientCLI(t, vars, args...); code != 0 {
			t.Fatalf("%v: %s", args, stderr)
		}
	}
	out, stderr, code := runClientCLI(t, vars, "admin", "token", "create", "--user", "alice")
	if code != 0 {
		t.Fatal(stderr)
	}
	userToken := lastLine(out)
	out, stderr, code = runClientCLI(t, vars, "admin", "token", "create", "--agent", "ws1")
	if code != 0 {
		t.Fatal(stderr)
	}
	agentToken := lastLine(out)
	srv := serveCoordinator(t, coordinator.Config{DataDir: dir, Listen: "127.0.0.1:0"})

	if _, stderr, code := runClientCLI(t, vars, "login", srv.URL(), "--token", agentToken, "--fingerprint", srv.Fingerprint()); code != 1 || !strings.Contains(stderr, "token of agent ws1") {
		t.Errorf("login with an agent token: %d %s", code, stderr)
	}
	tokFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokFile, []byte(userToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, stderr, code = runClientCLI(t, vars, "login", srv.URL()+"/", "--token-file", tokFile, "--fingerprint", strings.ToUpper(srv.Fingerprint()))
	if code != 0 || !strings.Contains(out, "as alice") {
		t.Fatalf("login: %d %s\n%s", code, stderr, out)
	}
	p, err := coordclient.LoadProfile(func(k string) string { return vars[k] })
	if err != nil {
		t.Fatal(err)
	}
	if p.URL != srv.URL() || p.Token != userToken || p.Fingerprint != srv.Fingerprint() || p.InsecureHTTP {
		t.Errorf("saved profile = %+v", p)
	}
	path, _ := coordclient.ProfilePath(func(k string) string { return vars[k] })
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("profile %s: %v, mode %v, want 0600", path, err, st.Mode().Perm())
	}
}

// admin checks its command line before it touches the data directory, so a
// mistyped line says what is wrong with it, not with the directory.
func TestAdminChecksTheCommandLineFirst(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nosuch")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"agent", "create", "ws1"}, 2, "--owner is required"},
		{[]string{"token", "create"}, 2, "exactly one of --user USER, --agent AGENT or --admin USER"},
		{[]string{"token", "create", "--user", "a", "--expires", "soon"}, 1, `--expires "soon"`},
		{[]string{"list"}, 1, "does not exist"},
	} {
		args := append([]string{"admin", "--data-dir", missing}, tc.args...)
		_, stderr, code := runClientCLI(t, nil, args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("agent %s: exit %d %q, want %d and %q", strings.Join(args, " "), code, stderr, tc.code, tc.want)
		}
	}
}

// agent dev brings up a coordinator and this machine's agent; the commands
// its banner prints reach the workspace, which shows as online.
func TestDevWorkspaceIsReachable(t *testing.T) {
	out := &lockedBuffer{}
	env := &cliEnv{Stdin: strings.NewReader(""), Stdout: out, Stderr: &lockedBuffer{}, Getenv: func(string) string { return "" }, logLevel: "warn"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	o := &devOptions{dataDir: t.TempDir(), listen: "127.0.0.1:0", stunAddr: "127.0.0.1:0", name: "ws7", user: "ann"}
	go func() { done <- runDev(ctx, env, o) }()
	exports := regexp.MustCompile(`export AGENT_URL=(\S+) AGENT_FINGERPRINT=(\S+)\n\s+export AGENT_TOKEN=(\S+)`)
	var m []string
	for deadline := time.Now().Add(30 * time.Second); m == nil; m = exports.FindStringSubmatch(out.String()) {
		if time.Now().After(deadline) {
			t.Fatalf("no banner:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	vars := map[string]string{"AGENT_URL": m[1], "AGENT_FINGERPRINT": m[2], "AGENT_TOKEN": m[3], "XDG_CONFIG_HOME": t.TempDir()}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		list, stderr, code := runClientCLI(t, vars, "list")
		if code == 0 && regexp.MustCompile(`ws7\s+ann\s+online`).MatchString(list) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent list never showed ws7 online: exit %d %s\n%s", code, stderr, list)
		}
	}
	cancel()
	select {
	case err := <-done:
		// main exits 130 after an interrupt whatever the error says.
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("agent dev after its context ended: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("agent dev did not stop when its context ended")
	}
}

// netcheck --host --dry-run shows the guard for a node's file tree under
// --root and writes nothing there.
func TestNetcheckGuardDryRun(t *testing.T) {
	root := t.TempDir()
	out, stderr, code := runClientCLI(t, nil, "netcheck", "--host", "--root", root, "--dry-run")
	if code != 0 {
		t.Fatalf("exit %d: %s\n%s", code, stderr, out)
	}
	for _, want := range []string{"create " + filepath.Join(root, "etc/systemd/network/10-agent-container-ifaces.network"), "Unmanaged=yes", "dry run: nothing written"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if entries, err := os.ReadDir(root); err != nil || len(entries) != 0 {
		t.Errorf("--dry-run wrote into --root: %v %v", entries, err)
	}
}

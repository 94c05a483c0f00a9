package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

// runCLI runs one agent command line in-process.
func runCLI(t *testing.T, vars map[string]string, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	env := &cliEnv{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errOut, Getenv: func(k string) string { return vars[k] }}
	root := newRootCmd(env)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

// serveCoordinator runs a coordinator until the test ends.
func serveCoordinator(t *testing.T, cfg coordinator.Config) *coordinator.Server {
	t.Helper()
	srv, err := coordinator.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return srv
}

// lastLine is the token line of "create" output.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

func TestAdminOfflineThenThroughRunningCoordinator(t *testing.T) {
	dir := t.TempDir()
	vars := map[string]string{"AGENT_COORDINATOR_DATA_DIR": dir, "XDG_CONFIG_HOME": t.TempDir()}

	// No coordinator: the store file is used directly.
	if out, err := runCLI(t, vars, "admin", "user", "create", "alice"); err != nil || !strings.Contains(out, "created user alice") {
		t.Fatalf("offline user create: %v\n%s", err, out)
	}
	out, err := runCLI(t, vars, "admin", "agent", "create", "ws1", "--owner", "alice")
	if err != nil || !strings.HasPrefix(lastLine(out), "agt_") {
		t.Fatalf("offline agent create: %v\n%s", err, out)
	}
	if out, err := runCLI(t, vars, "admin", "agent", "reset-identity", "ws1"); err != nil || !strings.Contains(out, "forgot the host key pinned for agent ws1") {
		t.Fatalf("offline reset-identity: %v\n%s", err, out)
	}
	if _, err := runCLI(t, vars, "admin", "agent", "reset-identity", "nosuch"); err == nil || !strings.Contains(err.Error(), `"nosuch" not found`) {
		t.Fatalf("reset-identity of an unknown agent: %v", err)
	}
	if _, err := runCLI(t, vars, "admin", "agent", "create", "ws2"); err == nil || !strings.Contains(err.Error(), "--owner") {
		t.Fatalf("agent create without owner: %v", err)
	}
	if _, err := runCLI(t, vars, "admin", "--data-dir", filepath.Join(dir, "typo"), "list"); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("admin on a missing data dir: %v", err)
	}

	// Now a coordinator holds the store; admin goes through its socket.
	srv := serveCoordinator(t, coordinator.Config{DataDir: dir, Listen: "127.0.0.1:0"})

	out, err = runCLI(t, vars, "admin", "token", "create", "--user", "alice", "--expires", "30d")
	if err != nil || !strings.HasPrefix(lastLine(out), "usr_") || !strings.Contains(out, "expires") {
		t.Fatalf("token create while running: %v\n%s", err, out)
	}
	userToken := lastLine(out)
	out, err = runCLI(t, vars, "admin", "info", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var info admin.Info
	if err := json.Unmarshal([]byte(out), &info); err != nil || !info.Running || info.Fingerprint != srv.Fingerprint() {
		t.Fatalf("info while running: %+v %v", info, err)
	}
	if out, err := runCLI(t, vars, "admin", "agent", "reset-identity", "ws1", "--json"); err != nil || !strings.Contains(out, `"reset_identity"`) {
		t.Fatalf("reset-identity while running: %v\n%s", err, out)
	}
	if _, err := runCLI(t, vars, "admin", "grant", "nobody", "ws1"); err == nil || !strings.Contains(err.Error(), `user "nobody" not found`) {
		t.Fatalf("grant to unknown user: %v", err)
	}

	// agent login checks the token and pins the certificate.
	if _, err := runCLI(t, vars, "login", srv.URL(), "--token", userToken); err == nil || !strings.Contains(err.Error(), srv.Fingerprint()) {
		t.Fatalf("login without a pin should show the fingerprint to compare: %v", err)
	}
	out, err = runCLI(t, vars, "login", srv.URL(), "--token", userToken, "--fingerprint", strings.ToUpper(srv.Fingerprint()))
	if err != nil || !strings.Contains(out, "as alice") {
		t.Fatalf("login: %v\n%s", err, out)
	}
	p, err := coordclient.LoadProfile(func(k string) string { return vars[k] })
	if err != nil || p.Token != userToken || p.Fingerprint != srv.Fingerprint() || p.URL != srv.URL() {
		t.Fatalf("saved profile %+v %v", p, err)
	}
	path, _ := coordclient.ProfilePath(func(k string) string { return vars[k] })
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("profile file mode: %v %v", st, err)
	}
	if _, err := runCLI(t, vars, "login", srv.URL(), "--token", "usr_wrong", "--fingerprint", srv.Fingerprint()); err == nil || !strings.Contains(err.Error(), "token_invalid") {
		t.Fatalf("login with a wrong token: %v", err)
	}

	// Revocation by the token itself; list shows it.
	if _, err := runCLI(t, vars, "admin", "token", "revoke", userToken); err != nil {
		t.Fatal(err)
	}
	out, _ = runCLI(t, vars, "admin", "list")
	if !strings.Contains(out, "revoked") || !strings.Contains(out, "ws1") {
		t.Fatalf("list:\n%s", out)
	}
}

func TestParseExpiry(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"":                     {},
		"720h":                 now.Add(720 * time.Hour),
		"30d":                  now.Add(30 * 24 * time.Hour),
		"2027-01-31T00:00:00Z": time.Date(2027, 1, 31, 0, 0, 0, 0, time.UTC),
	} {
		got, err := parseExpiry(in, now)
		if err != nil || !got.Equal(want) {
			t.Errorf("%q: %v %v, want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"-1h", "soon", "0d"} {
		if _, err := parseExpiry(bad, now); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestPrintInfoShowsAgentNetwork(t *testing.T) {
	var out strings.Builder
	printInfo(&out, admin.Info{Running: true, DataDir: "/d", Peers: []admin.PeerInfo{
		{Role: protocol.RoleAgent, Name: "ws1", User: "alice", HasNode: true, Endpoints: 2,
			Network: &protocol.NetworkVerdict{Status: protocol.NetworkBroken, Summary: "gone"}},
		{Role: protocol.RoleClient, Name: "ws1", User: "alice"},
	}})
	lines := strings.Split(out.String(), "\n")
	var agentLine, clientLine string
	for _, l := range lines {
		switch {
		case strings.HasPrefix(l, "agent "):
			agentLine = l
		case strings.HasPrefix(l, "client "):
			clientLine = l
		}
	}
	if !strings.Contains(out.String(), "NETWORK") || !strings.Contains(agentLine, " broken ") {
		t.Errorf("the agent's verdict is missing:\n%s", out.String())
	}
	if !strings.Contains(clientLine, " - ") {
		t.Errorf("a client has no verdict and should show -:\n%s", out.String())
	}
}

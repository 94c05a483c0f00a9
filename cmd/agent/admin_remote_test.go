package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentd/agent/coordinator"
)

// TestAdminOverHTTPS: an admin token made on the coordinator's machine
// administers it from elsewhere with --url; the token file, the URL and
// the token kind are checked first, each refusal in one line.
func TestAdminOverHTTPS(t *testing.T) {
	dir := t.TempDir()
	srv := serveCoordinator(t, coordinator.Config{DataDir: dir, Listen: "127.0.0.1:0"})

	// On the coordinator's machine: an admin token for user ops.
	local := map[string]string{"AGENT_COORDINATOR_DATA_DIR": dir, "XDG_CONFIG_HOME": t.TempDir()}
	for _, args := range [][]string{{"admin", "user", "create", "ops"}, {"admin", "user", "create", "alice"}} {
		if _, err := runCLI(t, local, args...); err != nil {
			t.Fatal(err)
		}
	}
	out, err := runCLI(t, local, "admin", "token", "create", "--admin", "ops")
	if err != nil || !strings.Contains(out, "created admin token") || !strings.HasPrefix(lastLine(out), "adm_") {
		t.Fatalf("admin token create: %v\n%s", err, out)
	}
	tokFile := filepath.Join(t.TempDir(), "admin-token")
	if err := os.WriteFile(tokFile, []byte(lastLine(out)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	userTok := lastLine(orFatal[string](t)(runCLI(t, local, "admin", "token", "create", "--user", "alice")))

	// Elsewhere: no data directory, only the URL and the token.
	away := map[string]string{"AGENT_COORDINATOR_DATA_DIR": filepath.Join(t.TempDir(), "none"), "XDG_CONFIG_HOME": t.TempDir(),
		"AGENT_FINGERPRINT": srv.Fingerprint()}
	remote := []string{"admin", "--url", srv.URL(), "--token-file", tokFile}
	if out, err := runCLI(t, away, append(remote, "agent", "create", "ws1", "--owner", "alice")...); err != nil || !strings.HasPrefix(lastLine(out), "agt_") {
		t.Fatalf("agent create over HTTPS: %v\n%s", err, out)
	}
	if out, err := runCLI(t, away, append(remote, "list")...); err != nil || !strings.Contains(out, "ws1") {
		t.Fatalf("list over HTTPS: %v\n%s", err, out)
	}
	away["AGENT_ADMIN_URL"] = srv.URL()
	away["AGENT_ADMIN_TOKEN"] = strings.TrimSpace(string(orFatal[[]byte](t)(os.ReadFile(tokFile))))
	if out, err := runCLI(t, away, "admin", "info"); err != nil || !strings.Contains(out, "coordinator: running") {
		t.Fatalf("info with the URL and token from the environment: %v\n%s", err, out)
	}
	delete(away, "AGENT_ADMIN_URL")
	delete(away, "AGENT_ADMIN_TOKEN")

	open := filepath.Join(t.TempDir(), "open-token")
	if err := os.WriteFile(open, orFatal[[]byte](t)(os.ReadFile(tokFile)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"world-readable token file", []string{"admin", "--url", srv.URL(), "--token-file", open, "list"}, "chmod 600"},
		{"no token", []string{"admin", "--url", srv.URL(), "list"}, "needs an admin token"},
		{"user token", []string{"admin", "--url", srv.URL(), "--token", userTok, "list"}, "not an admin token"},
		{"plain http", append([]string{"admin", "--url", "http://" + srv.Addr().String(), "--token-file", tokFile, "--fingerprint", ""}, "list"), "plain HTTP"},
		{"admin token minting one", append(remote, "token", "create", "--admin", "alice"), "coordinator's machine"},
		{"wrong fingerprint", []string{"admin", "--url", srv.URL(), "--token-file", tokFile, "--fingerprint", strings.Repeat("ab", 32), "list"}, "fingerprint"},
	} {
		vars := away
		if tc.name == "plain http" {
			vars = map[string]string{"XDG_CONFIG_HOME": t.TempDir()}
		}
		_, err := runCLI(t, vars, tc.args...)
		t.Logf("%s: %v", tc.name, err)
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: %v, want one line containing %q", tc.name, err, tc.want)
		}
	}
}

// orFatal fails the test on err.
func orFatal[T any](t *testing.T) func(v T, err error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

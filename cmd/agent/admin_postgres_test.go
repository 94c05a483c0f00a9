package main

import (
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/internal/pgtest"
)

// TestAdminOnPostgres: with the store in PostgreSQL, admin works on the
// database when no coordinator runs here, and the running replica sees
// the change; the URL comes from the environment, and a bad one is
// refused in one line without the password.
func TestAdminOnPostgres(t *testing.T) {
	url := pgtest.Start(t).NewDatabase()
	vars := map[string]string{"AGENT_POSTGRES_URL": url, "AGENT_COORDINATOR_DATA_DIR": t.TempDir(), "XDG_CONFIG_HOME": t.TempDir()}
	if out, err := runCLI(t, vars, "admin", "user", "create", "alice"); err != nil || !strings.Contains(out, "created user alice") {
		t.Fatalf("user create on the database: %v\n%s", err, out)
	}
	out, err := runCLI(t, vars, "admin", "agent", "create", "ws1", "--owner", "alice")
	if err != nil || !strings.HasPrefix(lastLine(out), "agt_") {
		t.Fatalf("agent create on the database: %v\n%s", err, out)
	}

	// A replica elsewhere (its own data directory) sees them.
	srv := serveCoordinator(t, coordinator.Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", PostgresURL: url})
	if srv.FirstStart() {
		t.Fatal("the replica thinks the store is empty")
	}
	if out, err := runCLI(t, vars, "admin", "list"); err != nil || !strings.Contains(out, "ws1") || !strings.Contains(out, "alice") {
		t.Fatalf("list: %v\n%s", err, out)
	}

	bad := map[string]string{"AGENT_COORDINATOR_DATA_DIR": t.TempDir(), "XDG_CONFIG_HOME": t.TempDir()}
	wrong := strings.Replace(url, "-secret@", "-nope@", 1)
	start := time.Now()
	_, err = runCLI(t, bad, "admin", "--postgres-url", wrong, "list")
	if err == nil || !strings.Contains(err.Error(), "wrong password") || strings.Contains(err.Error(), "-nope") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("admin with a wrong password: %v", err)
	}
	if time.Since(start) > 15*time.Second {
		t.Fatal("admin took too long to fail")
	}
	// --help never shows the URL from the environment.
	for _, cmd := range [][]string{{"coordinator", "--help"}, {"admin", "--help"}} {
		out, _ := runCLI(t, vars, cmd...)
		if !strings.Contains(out, "--postgres-url") || strings.Contains(out, "-secret") {
			t.Fatalf("agent %s: want the flag described, without the password from the environment:\n%s", strings.Join(cmd, " "), out)
		}
	}
}

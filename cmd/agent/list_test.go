package main

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

// A user lists the workspaces they own or were granted, not the others;
// shell completion offers the same names; logout forgets the login.
func TestListCompletionAndLogout(t *testing.T) {
	dir := t.TempDir()
	vars := map[string]string{"AGENT_COORDINATOR_DATA_DIR": dir, "XDG_CONFIG_HOME": t.TempDir(), "HOME": t.TempDir()}
	for _, args := range [][]string{
		{"admin", "user", "create", "alice"},
		{"admin", "user", "create", "bob"},
		{"admin", "agent", "create", "ws1", "--owner", "alice"},
		{"admin", "agent", "create", "bobs", "--owner", "bob"},
		{"admin", "agent", "create", "shared", "--owner", "bob"},
		{"admin", "grant", "alice", "shared"},
	} {
		if _, stderr, code := runClientCLI(t, vars, args...); code != 0 {
			t.Fatalf("%v: %s", args, stderr)
		}
	}
	srv := serveCoordinator(t, coordinator.Config{DataDir: dir, Listen: "127.0.0.1:0"})
	out, stderr, code := runClientCLI(t, vars, "admin", "token", "create", "--user", "alice")
	if code != 0 {
		t.Fatal(stderr)
	}
	token := lastLine(out)
	if _, stderr, code := runClientCLI(t, vars, "login", srv.URL(), "--token", token, "--fingerprint", srv.Fingerprint()); code != 0 {
		t.Fatal(stderr)
	}

	out, stderr, code = runClientCLI(t, vars, "list", "--json")
	if code != 0 {
		t.Fatalf("list --json: %s", stderr)
	}
	var got protocol.Workspaces
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("list --json is not JSON: %v\n%s", err, out)
	}
	var names []string
	for _, w := range got.Workspaces {
		names = append(names, w.Name+"/"+w.Owner)
		if w.Online {
			t.Errorf("%s is online without an agent", w.Name)
		}
	}
	if strings.Join(names, " ") != "shared/bob ws1/alice" {
		t.Errorf("alice may reach %v, want shared (granted) and ws1 (owned)", names)
	}
	out, _, code = runClientCLI(t, vars, "list")
	if code != 0 || !strings.Contains(out, "NAME") || !strings.Contains(out, "ws1") || !strings.Contains(out, "offline") || strings.Contains(out, "bobs") {
		t.Errorf("list:\n%s", out)
	}

	out, _, _ = runClientCLI(t, vars, "__complete", "ssh", "")
	if !strings.Contains(out, "ws1\toffline") || !strings.Contains(out, "shared\t") || strings.Contains(out, "bobs") {
		t.Errorf("completion of ssh's workspace:\n%s", out)
	}
	out, _, _ = runClientCLI(t, vars, "__complete", "port-forward", "sh")
	if !strings.Contains(out, "shared") || strings.Contains(out, "ws1") {
		t.Errorf("completion of port-forward sh:\n%s", out)
	}
	// An unreachable coordinator completes nothing, quickly.
	out, _, _ = runClientCLI(t, vars, "__complete", "ping", "--url", "https://127.0.0.1:9", "")
	if strings.Contains(out, "ws1") {
		t.Errorf("completion without a coordinator:\n%s", out)
	}

	// A wrong token is said once, with the reason.
	_, stderr, code = runClientCLI(t, vars, "list", "--token", "usr_"+strings.Repeat("x", 43))
	if code != 1 || !strings.Contains(stderr, "token") {
		t.Errorf("list with a wrong token: exit %d: %s", code, stderr)
	}

	out, _, code = runClientCLI(t, vars, "logout")
	path, _ := coordclient.ProfilePath(func(k string) string { return vars[k] })
	if _, err := os.Stat(path); code != 0 || !os.IsNotExist(err) || !strings.Contains(out, "Logged out") {
		t.Fatalf("logout: exit %d, %v\n%s", code, err, out)
	}
	_, stderr, code = runClientCLI(t, vars, "list")
	if code != 1 || !strings.Contains(stderr, "not logged in") {
		t.Errorf("list after logout: exit %d: %s", code, stderr)
	}
	out, _, code = runClientCLI(t, vars, "logout")
	if code != 0 || !strings.Contains(out, "Not logged in") {
		t.Errorf("second logout: exit %d: %s", code, out)
	}
}

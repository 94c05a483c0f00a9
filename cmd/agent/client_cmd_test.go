package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// runClientCLI runs one command line in-process and returns its output and
// the exit status main would give.
func runClientCLI(t *testing.T, vars map[string]string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	if vars == nil {
		vars = map[string]string{}
	}
	if _, ok := vars["HOME"]; !ok {
		vars["HOME"] = t.TempDir()
	}
	env := &cliEnv{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errOut, Getenv: func(k string) string { return vars[k] }}
	root := newRootCmd(env)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	if err != nil {
		code = exitCode(err)
		errOut.WriteString(err.Error())
	}
	return out.String(), errOut.String(), code
}

// Command lines that cannot work exit 2 and say why, before any network.
func TestClientUsageErrorsExit2(t *testing.T) {
	for _, args := range [][]string{
		{"ssh"},
		{"ssh", "ws1", "--stdio", "--", "uname"},
		{"ssh", "ws1", "--stdio", "-A"},
		{"ssh", "ws1", "--no-such-flag"},
		{"ssh", "ws1", "--session", "no spaces"},
		{"ssh", "ws1", "--session", "s1", "--", "uname"},
		{"ssh", "ws1", "--session", "s1", "-A"},
		{"ssh", "ws1", "--session", "s1", "--stdio"},
		{"ping"},
		{"ping", "ws1", "ws2"},
		{"ping", "ws1", "-c", "-1"},
		{"ping", "ws1", "--json", "-c", "0"},
		{"ping", "ws1", "--timeout", "soon"},
		{"ports"},
		{"port-forward"},
		{"port-forward", "ws1"},
		{"port-forward", "ws1", "99999"},
		{"port-forward", "ws1", "8080", "--bind", "not-an-address"},
		{"port-forward", "ws1", "--udp", "53:x"},
		{"login"},
		{"login", "https://x", "--token", "a", "--token-file", "b"},
		{"config-ssh", "extra"},
		{"speedtest"},
		{"speedtest", "ws1", "--duration", "2m"},
	} {
		_, stderr, code := runClientCLI(t, nil, args...)
		if code != 2 {
			t.Errorf("agent %s: exit status %d, want 2 (%s)", strings.Join(args, " "), code, stderr)
		}
		if stderr == "" {
			t.Errorf("agent %s: no reason given", strings.Join(args, " "))
		}
	}
}

// Not logged in is an error (1) with the next step, not a usage error.
func TestNotLoggedInSaysHow(t *testing.T) {
	_, stderr, code := runClientCLI(t, nil, "ping", "ws1")
	if code != 1 || !strings.Contains(stderr, "agent login") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}

// The coordinator URL has one name on every command; the old spelling
// still works.
func TestOneVocabulary(t *testing.T) {
	root := newRootCmd(&cliEnv{Getenv: func(string) string { return "" }})
	for _, path := range [][]string{{"ssh"}, {"ping"}, {"ports"}, {"port-forward"}, {"run"}, {"netcheck"}} {
		cmd, _, err := root.Find(path)
		if err != nil {
			t.Fatal(err)
		}
		if cmd.Flags().Lookup("url") == nil {
			t.Errorf("agent %s has no --url", path[0])
		}
		if err := cmd.Flags().Set("coordinator-url", "https://192.0.2.1:8443"); err != nil {
			t.Errorf("agent %s --coordinator-url: %v", path[0], err)
		} else if got := cmd.Flags().Lookup("url").Value.String(); got != "https://192.0.2.1:8443" {
			t.Errorf("agent %s --coordinator-url set --url to %q", path[0], got)
		}
	}
	for _, path := range [][]string{{"ssh"}, {"ping"}, {"ports"}, {"port-forward"}} {
		cmd, _, _ := root.Find(path)
		for _, name := range []string{"url", "token", "fingerprint"} {
			if cmd.Flags().Lookup(name) == nil {
				t.Errorf("agent %s has no --%s", path[0], name)
			}
		}
	}
}

// Every client command's --help shows an example.
func TestClientCommandsHaveExamples(t *testing.T) {
	root := newRootCmd(&cliEnv{Getenv: func(string) string { return "" }})
	for _, name := range []string{"ssh", "ping", "ports", "port-forward", "login", "config-ssh", "list", "logout", "completion", "speedtest"} {
		cmd, _, err := root.Find([]string{name})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(cmd.Example, "agent "+name) {
			t.Errorf("agent %s --help has no example", name)
		}
	}
}

// Without --verbose, client commands log nothing; with it (or
// AGENT_VERBOSE=1) they do.
func TestClientLoggerIsQuietByDefault(t *testing.T) {
	var buf bytes.Buffer
	env := &cliEnv{Stderr: &buf, Getenv: func(string) string { return "" }, logLevel: "info"}
	env.ClientLogger().Warn("should not appear")
	if buf.Len() != 0 {
		t.Fatalf("logged without --verbose: %s", buf.String())
	}
	env.verbose = true
	env.ClientLogger().Info("appears")
	if !strings.Contains(buf.String(), "appears") {
		t.Fatalf("--verbose logged nothing")
	}
}

// A notice during a terminal session (raw mode) ends its line with \r\n, so
// it does not stair-step across the screen.
func TestNoticeInRawTerminal(t *testing.T) {
	var buf bytes.Buffer
	env := &cliEnv{Stderr: &buf, Getenv: func(string) string { return "" }}
	env.notice("one")
	env.rawTerminal.Store(true)
	env.notice("two")
	if buf.String() != "one\ntwo\r\n" {
		t.Fatalf("got %q", buf.String())
	}
}

package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func TestVersionJSONThroughRoot(t *testing.T) {
	var out, errOut bytes.Buffer
	env := &cliEnv{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errOut, Getenv: func(string) string { return "" }}
	root := newRootCmd(env)
	root.SetArgs([]string{"version", "--json"})
	if err := root.Execute(); err != nil {
		t.Fatalf("agent version --json: %v (stderr %q)", err, errOut.String())
	}
	var info buildInfo
	if err := json.Unmarshal(out.Bytes(), &info); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out.String())
	}
	if info.GoVersion != runtime.Version() {
		t.Errorf("go_version = %q, want %q", info.GoVersion, runtime.Version())
	}
	if want := runtime.GOOS + "/" + runtime.GOARCH; info.Platform != want {
		t.Errorf("platform = %q, want %q", info.Platform, want)
	}
	if info.Version == "" {
		t.Error("version is empty")
	}
}

func TestVersionRejectsArguments(t *testing.T) {
	var out, errOut bytes.Buffer
	env := &cliEnv{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errOut, Getenv: func(string) string { return "" }}
	root := newRootCmd(env)
	root.SetArgs([]string{"version", "extra"})
	if err := root.Execute(); err == nil {
		t.Fatal("agent version extra: want an error, got none")
	}
}

// TestVersionReportsVCSRevision builds the real binary with VCS stamping and
// checks that `agent version` reports the checkout's commit.
func TestVersionReportsVCSRevision(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the agent binary; skipped in -short mode")
	}
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Skipf("not inside a git checkout with git available (%v): VCS stamping cannot be checked", err)
	}
	bin := filepath.Join(t.TempDir(), "agent")
	build := exec.Command("go", "build", "-buildvcs=true", "-o", bin, ".")
	build.Env = append(os.Environ(), "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "version", "--json").Output()
	if err != nil {
		t.Fatalf("agent version --json: %v", err)
	}
	var info buildInfo
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if want := strings.TrimSpace(string(head)); info.Revision != want {
		t.Errorf("revision = %q, want %q", info.Revision, want)
	}
	if info.RevisionTime == "" {
		t.Error("revision_time is empty")
	}
	if info.TailscaleVersion != "" {
		want, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "tailscale.com").Output()
		if err != nil {
			t.Fatalf("go list -m tailscale.com: %v", err)
		}
		if got := info.TailscaleVersion; got != strings.TrimSpace(string(want)) {
			t.Errorf("tailscale_version = %q, want %q (go.mod)", got, strings.TrimSpace(string(want)))
		}
	}
	text, err := exec.Command(bin, "version").Output()
	if err != nil {
		t.Fatalf("agent version: %v", err)
	}
	if !strings.Contains(string(text), info.Revision) {
		t.Errorf("text output does not mention revision %s:\n%s", info.Revision, text)
	}
}

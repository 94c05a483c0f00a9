// Package scripts tests scripts/start-workspace and scripts/install by
// running them, with the real agent binary, against real files, real
// permissions and real (local) HTTP servers and closed ports.
package scripts

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// testEnv is what every test here uses; built once in TestMain because it
// needs a build of the agent.
type testEnv struct {
	root  string // repository root
	agent string // agent binary built from this checkout
	dir   string // world-readable directory holding the build
}

func repoRoot() (string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		return "", fmt.Errorf("go list -m: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

func setup() (*testEnv, error) {
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "scripts-test-")
	if err != nil {
		return nil, err
	}
	// Tests run the scripts as an unprivileged user too: let it in.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	agent := filepath.Join(dir, "agent")
	if prebuilt := os.Getenv("AGENT_TEST_BINARY"); prebuilt != "" {
		// A binary built beforehand (for example by CI for several test packages).
		b, err := os.ReadFile(prebuilt)
		if err == nil {
			err = os.WriteFile(agent, b, 0o755)
		}
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("AGENT_TEST_BINARY: %w", err)
		}
		return &testEnv{root: root, agent: agent, dir: dir}, nil
	}
	build := exec.Command("go", "build", "-trimpath", "-o", agent, "./cmd/agent")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("build the agent: %w\n%s", err, out)
	}
	return &testEnv{root: root, agent: agent, dir: dir}, nil
}

var env *testEnv

func TestMain(m *testing.M) {
	e, err := setup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "scripts tests:", err)
		os.Exit(1)
	}
	env = e
	code := m.Run()
	os.RemoveAll(e.dir)
	os.Exit(code)
}

// script returns the path of a script in scripts/.
func script(name string) string { return filepath.Join(env.root, "scripts", name) }

// worldDir makes a temporary directory an unprivileged user can enter.
func worldDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	// t.TempDir's parent (one per test) is private too.
	for _, p := range []string{filepath.Dir(d), d} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // WriteFile's mode is masked by umask
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, string(b), mode)
}

// pathWith makes a directory of symlinks to exactly the named host tools,
// so a test can run a script on a PATH without curl, or without wget.
func pathWith(t *testing.T, tools ...string) string {
	t.Helper()
	d := worldDir(t)
	for _, tool := range tools {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("%s is not installed: %v", tool, err)
		}
		if err := os.Symlink(p, filepath.Join(d, tool)); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// baseTools are what the scripts need besides a downloader.
var baseTools = []string{"sh", "cat", "cut", "cp", "chmod", "grep", "id", "mkdir", "mv", "printf", "rm", "sha256sum", "sleep", "tail", "tr", "uname"}

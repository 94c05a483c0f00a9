package scripts

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
)

// hostArch is the name install picks on this machine.
func hostArch(t *testing.T) string {
	t.Helper()
	switch runtime.GOARCH {
	case "amd64", "arm64":
		return runtime.GOARCH
	}
	t.Skipf("install supports amd64 and arm64, this machine is %s", runtime.GOARCH)
	return ""
}

// dist makes a release directory holding the agent for this machine.
func dist(t *testing.T) (dir string, sum string) {
	t.Helper()
	dir = worldDir(t)
	copyFile(t, env.agent, filepath.Join(dir, "agent-linux-"+hostArch(t)), 0o755)
	b, err := os.ReadFile(env.agent)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	return dir, hex.EncodeToString(h[:])
}

func install(t *testing.T, path string, cred *syscall.Credential, args ...string) result {
	t.Helper()
	return runScript(t, []string{"/bin/sh"}, "install", []string{"PATH=" + path}, cred, args...)
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		return false
	}
	return bytes.Equal(x, y)
}

// noLeftovers fails if the install left temporary files in bindir.
func noLeftovers(t *testing.T, bindir string) {
	t.Helper()
	entries, _ := os.ReadDir(bindir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".agent.install.") {
			t.Errorf("temporary file %s left in %s", e.Name(), bindir)
		}
	}
}

func TestInstallFromDirectoryWithChecksum(t *testing.T) {
	src, sum := dist(t)
	prefix := filepath.Join(worldDir(t), "usr", "local")
	r := install(t, hostPath(), nil, "--prefix", prefix, "--sha256", strings.ToUpper(sum), src)
	if r.code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", r.code, r.stderr)
	}
	target := filepath.Join(prefix, "bin", "agent")
	if !sameFile(t, env.agent, target) {
		t.Fatal("the installed file differs from the release binary")
	}
	fi, err := os.Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("installed mode %v, want 0755", fi.Mode().Perm())
	}
	if !strings.Contains(r.stderr, "installed "+filepath.Join(src, "agent-linux-"+hostArch(t))+" as "+target) {
		t.Errorf("stderr lacks the installed line:\n%s", r.stderr)
	}
	noLeftovers(t, filepath.Dir(target))
}

func TestInstallReplacesAtomically(t *testing.T) {
	src, _ := dist(t)
	prefix := worldDir(t)
	bindir := filepath.Join(prefix, "bin")
	if err := os.MkdirAll(bindir, 0o755); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(bindir, "agent")
	writeFile(t, target, "#!/bin/sh\necho old agent\n", 0o755)
	// A running agent holds its file open; the update must not rewrite it.
	held, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	r := install(t, hostPath(), nil, "--prefix", prefix, src)
	if r.code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", r.code, r.stderr)
	}
	if !sameFile(t, env.agent, target) {
		t.Fatal("the target does not hold the new binary")
	}
	old := make([]byte, 64)
	n, _ := held.ReadAt(old, 0)
	if string(old[:n]) != "#!/bin/sh\necho old agent\n" {
		t.Fatalf("the old file was rewritten in place (reads %q); install must rename a new file over it", old[:n])
	}
	noLeftovers(t, bindir)
}

func TestInstallRefusesWrongChecksumAndKeepsOldBinary(t *testing.T) {
	src, sum := dist(t)
	prefix := worldDir(t)
	bindir := filepath.Join(prefix, "bin")
	os.MkdirAll(bindir, 0o755)
	target := filepath.Join(bindir, "agent")
	writeFile(t, target, "old", 0o755)
	wrong := []byte(sum)
	if wrong[0] == '0' {
		wrong[0] = '1'
	} else {
		wrong[0] = '0'
	}
	r := install(t, hostPath(), nil, "--prefix", prefix, "--sha256", string(wrong), src)
	if r.code != 1 || !strings.Contains(r.stderr, "has SHA-256 "+sum+", expected "+string(wrong)+"; not installed") {
		t.Fatalf("exit %d, stderr %q; want 1 and the checksum mismatch", r.code, r.stderr)
	}
	if b, _ := os.ReadFile(target); string(b) != "old" {
		t.Fatalf("the old binary was replaced despite the mismatch: %q", b)
	}
	noLeftovers(t, bindir)
}

func TestInstallRejectsBadInput(t *testing.T) {
	src, _ := dist(t)
	notRunnable := worldDir(t)
	writeFile(t, filepath.Join(notRunnable, "agent-linux-"+hostArch(t)), "\x7fELF\x02\x01\x01not a program", 0o755)
	other := map[string]string{"amd64": "arm64", "arm64": "amd64"}[hostArch(t)]
	prefix := worldDir(t)
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no source", []string{"--prefix", prefix}, 2, "no SOURCE given"},
		{"two sources", []string{"--prefix", prefix, src, src}, 2, "more than one SOURCE"},
		{"unknown option", []string{"--frobnicate", src}, 2, "unknown option --frobnicate"},
		{"short checksum", []string{"--prefix", prefix, "--sha256", "abc123", src}, 1, "has 6 hex digits; a SHA-256 has 64"},
		{"checksum not hex", []string{"--prefix", prefix, "--sha256", strings.Repeat("g", 64), src}, 1, "is not a hex SHA-256"},
		{"unsupported arch", []string{"--prefix", prefix, "--arch", "riscv64", src}, 1, "--arch riscv64 is not supported"},
		{"missing arch build", []string{"--prefix", prefix, "--arch", other, src}, 1, "agent-linux-" + other + " not found"},
		{"source missing", []string{"--prefix", prefix, filepath.Join(src, "nope")}, 1, "is neither an http(s) URL nor a directory"},
		{"binary does not run", []string{"--prefix", prefix, notRunnable}, 1, "does not run here"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := install(t, hostPath(), nil, c.args...)
			if r.code != c.code || !strings.Contains(r.stderr, c.want) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, c.code, c.want)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(prefix, "bin", "agent")); err == nil {
		t.Error("a failed install left an agent in the prefix")
	}
	noLeftovers(t, filepath.Join(prefix, "bin"))
}

func TestInstallForAnotherArchitectureSkipsRunCheck(t *testing.T) {
	other := map[string]string{"amd64": "arm64", "arm64": "amd64"}[hostArch(t)]
	src := worldDir(t)
	// Filling an image for another architecture: the file cannot run here,
	// and must not be run.
	writeFile(t, filepath.Join(src, "agent-linux-"+other), "\x7fELF other architecture", 0o755)
	prefix := worldDir(t)
	r := install(t, hostPath(), nil, "--prefix", prefix, "--arch", other, src)
	if r.code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", r.code, r.stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(prefix, "bin", "agent")); string(b) != "\x7fELF other architecture" {
		t.Fatalf("installed %q", b)
	}
}

func TestInstallFromURL(t *testing.T) {
	src, sum := dist(t)
	srv := httptest.NewServer(http.FileServer(http.Dir(src)))
	defer srv.Close()
	downloaders := map[string]string{
		"curl": pathWith(t, append(baseTools, "curl")...),
		"wget": pathWith(t, append(baseTools, "wget")...),
	}
	for name, path := range downloaders {
		t.Run(name, func(t *testing.T) {
			prefix := worldDir(t)
			r := install(t, path, nil, "--prefix", prefix, "--sha256", sum, srv.URL+"/")
			if r.code != 0 {
				t.Fatalf("exit %d; stderr:\n%s", r.code, r.stderr)
			}
			if !sameFile(t, env.agent, filepath.Join(prefix, "bin", "agent")) {
				t.Fatal("the downloaded binary differs from the release binary")
			}
			other := map[string]string{"amd64": "arm64", "arm64": "amd64"}[hostArch(t)]
			r = install(t, path, nil, "--prefix", prefix, "--arch", other, srv.URL)
			if r.code != 1 || !strings.Contains(r.stderr, "download of "+srv.URL+"/agent-linux-"+other+" failed: ") || !strings.Contains(r.stderr, "404") {
				t.Fatalf("missing file: exit %d, stderr %q; want 1 and a download failure naming the 404", r.code, r.stderr)
			}
			noLeftovers(t, filepath.Join(prefix, "bin"))
		})
	}
}

func TestInstallIntoUnwritablePrefix(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the script as another user")
	}
	src, _ := dist(t)
	prefix := worldDir(t)
	if err := os.Mkdir(filepath.Join(prefix, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := install(t, hostPath(), &syscall.Credential{Uid: 65534, Gid: 65534}, "--prefix", prefix, src)
	if r.code != 1 || !strings.Contains(r.stderr, "is not writable by uid 65534; run as root or choose --prefix") {
		t.Fatalf("exit %d, stderr %q; want 1 and the not-writable message", r.code, r.stderr)
	}
}

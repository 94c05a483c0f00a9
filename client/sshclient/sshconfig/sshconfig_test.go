package sshconfig

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const userConfig = `# my settings
ServerAliveInterval 60

Host github.com
    User git

Host *
    IdentitiesOnly yes
`

func TestUpdateIsIdempotentAndPreservesTheRest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config")
	if err := os.WriteFile(path, []byte(userConfig), 0o640); err != nil {
		t.Fatal(err)
	}
	block, err := Block(Options{AgentPath: "/usr/local/bin/agent"})
	if err != nil {
		t.Fatal(err)
	}
	res, err := Update(path, block, false)
	if err != nil || !res.Changed {
		t.Fatalf("first update: %+v %v", res, err)
	}
	first, _ := os.ReadFile(path)
	if backup, _ := os.ReadFile(path + ".agent.bak"); string(backup) != userConfig {
		t.Fatalf("backup holds %q, want the original config", backup)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode changed to %v", fi.Mode().Perm())
	}
	// The block sits before the first Host line; global lines stay global.
	s := string(first)
	if !(strings.Index(s, "ServerAliveInterval 60") < strings.Index(s, "Host *.agent") &&
		strings.Index(s, "Host *.agent") < strings.Index(s, "Host github.com")) {
		t.Fatalf("block in the wrong place:\n%s", s)
	}
	if strings.Replace(s, block+"\n", "", 1) != userConfig {
		t.Fatalf("content outside the block changed:\n%s", s)
	}

	res, err = Update(path, block, false)
	if err != nil || res.Changed {
		t.Fatalf("second update changed something: %+v %v", res.Changed, err)
	}
	again, _ := os.ReadFile(path)
	if string(again) != string(first) || strings.Count(string(again), "Host *.agent") != 1 {
		t.Fatalf("second run changed the file:\n%s", again)
	}

	// A new binary path updates the block in place.
	block2, _ := Block(Options{AgentPath: "/opt/agent dir/agent"})
	res, err = Update(path, block2, true)
	if err != nil || !res.Changed {
		t.Fatalf("dry run: %+v %v", res, err)
	}
	if now, _ := os.ReadFile(path); string(now) != string(first) {
		t.Fatal("dry run wrote the file")
	}
	d := Diff(path, res.Old, res.New)
	if !strings.Contains(d, "-    ProxyCommand /usr/local/bin/agent ssh --stdio %h") ||
		!strings.Contains(d, "+    ProxyCommand '/opt/agent dir/agent' ssh --stdio %h") {
		t.Fatalf("diff:\n%s", d)
	}
	if _, err := Update(path, block2, false); err != nil {
		t.Fatal(err)
	}
	now, _ := os.ReadFile(path)
	if strings.Count(string(now), beginMarker) != 1 || !strings.Contains(string(now), "'/opt/agent dir/agent'") {
		t.Fatalf("updated block:\n%s", now)
	}
}

func TestNewFileAndBrokenMarkers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "config")
	block, _ := Block(Options{AgentPath: "/bin/agent", Suffix: "ws"})
	if _, err := Update(path, block, false); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	if string(got) != block {
		t.Fatalf("new file:\n%s", got)
	}
	if err := os.WriteFile(path, []byte(beginMarker+"\nHost x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Update(path, block, false); err == nil || !strings.Contains(err.Error(), "only one") {
		t.Fatalf("half a block: %v", err)
	}
}

// TestOpenSSHReadsTheBlock: OpenSSH's own parser resolves ws1.agent to our
// ProxyCommand with the host name filled in.
func TestOpenSSHReadsTheBlock(t *testing.T) {
	if _, err := exec.LookPath("ssh"); err != nil {
		t.Skip("ssh (openssh-client) is not installed")
	}
	path := filepath.Join(t.TempDir(), "config")
	if err := os.WriteFile(path, []byte(userConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	block, _ := Block(Options{AgentPath: "/usr/local/bin/agent"})
	if _, err := Update(path, block, false); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ssh", "-G", "-F", path, "WS1.agent").CombinedOutput()
	if err != nil {
		t.Fatalf("ssh -G: %v\n%s", err, out)
	}
	for _, want := range []string{
		"proxycommand /usr/local/bin/agent ssh --stdio %h",
		"hostname ws1.agent",
		"stricthostkeychecking true",
		"userknownhostsfile /dev/null",
		"knownhostscommand /usr/local/bin/agent ssh --known-hosts %H",
	} {
		if !strings.Contains(string(out), want+"\n") {
			t.Errorf("ssh -G lacks %q:\n%s", want, out)
		}
	}
	out, _ = exec.Command("ssh", "-G", "-F", path, "github.com").CombinedOutput()
	if strings.Contains(string(out), "proxycommand") {
		t.Errorf("the block leaks to other hosts:\n%s", out)
	}
}

func TestBlockChecksHostKeys(t *testing.T) {
	block, err := Block(Options{AgentPath: "/usr/local/bin/agent"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"KnownHostsCommand /usr/local/bin/agent ssh --known-hosts %H\n",
		"StrictHostKeyChecking yes\n",
		"UserKnownHostsFile /dev/null\n",
	} {
		if !strings.Contains(block, want) {
			t.Errorf("block lacks %q:\n%s", want, block)
		}
	}
	if strings.Contains(block, "StrictHostKeyChecking no") {
		t.Fatalf("block turns host key checking off:\n%s", block)
	}
}

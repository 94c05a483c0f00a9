package deploy

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

const (
	unitFile = "systemd/agent-coordinator.service"
	envFile  = "systemd/coordinator.env"
)

// unitKeys parses a unit file into section -> key -> values (keys may repeat).
func unitKeys(t *testing.T, path string) map[string]map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			out[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: cannot parse line %q", path, line)
			}
			out[section][k] = append(out[section][k], v)
		}
	}
	return out
}

// envFileVars parses NAME=value lines.
func envFileVars(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: line %q is not NAME=value", path, line)
		}
		vars[k] = v
	}
	return vars
}

// verifyRoot makes a file-system root for systemd-analyze: the unit, its
// environment file and the agent binary where the unit expects them, and the
// machine's own system units (for the targets the unit refers to).
func verifyRoot(t *testing.T, unitText string) (root, unitPath string) {
	t.Helper()
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze not found (apt-get install systemd)")
	}
	if _, err := os.Stat("/usr/lib/systemd/system/multi-user.target"); err != nil {
		t.Skip("the machine has no systemd unit directory to verify against (apt-get install systemd)")
	}
	root = t.TempDir()
	for _, d := range []string{"usr/local/bin", "etc/agent", "etc/systemd/system", "usr/lib/systemd"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/usr/lib/systemd/system", filepath.Join(root, "usr/lib/systemd/system")); err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(agentBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/local/bin/agent"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	env, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/agent/coordinator.env"), env, 0o640); err != nil {
		t.Fatal(err)
	}
	unitPath = filepath.Join(root, "etc/systemd/system/agent-coordinator.service")
	if err := os.WriteFile(unitPath, []byte(unitText), 0o644); err != nil {
		t.Fatal(err)
	}
	return root, unitPath
}

// verify runs `systemd-analyze verify` and returns its complaints about our
// unit. systemd-analyze exits 0 on unknown keys and bad values (it only
// warns), so every line naming the unit counts.
func verify(t *testing.T, unitText string) []string {
	t.Helper()
	root, unitPath := verifyRoot(t, unitText)
	cmd := exec.Command("systemd-analyze", "verify", "--man=no", "--root="+root, unitPath)
	out, err := cmd.CombinedOutput()
	var complaints []string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "agent-coordinator.service") || strings.Contains(line, "coordinator.env") {
			complaints = append(complaints, line)
		}
	}
	if err != nil && len(complaints) == 0 {
		complaints = append(complaints, "systemd-analyze verify: "+err.Error()+": "+strings.TrimSpace(string(out)))
	}
	return complaints
}

func TestCoordinatorUnitVerifies(t *testing.T) {
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	if c := verify(t, string(unit)); len(c) > 0 {
		t.Errorf("systemd-analyze verify %s:\n%s", unitFile, strings.Join(c, "\n"))
	}
	// The check must be able to fail: a misspelt directive is reported.
	broken := strings.Replace(string(unit), "ProtectClock=yes", "ProtectClok=yes", 1)
	if broken == string(unit) {
		t.Fatal("the unit has no ProtectClock=yes to misspell")
	}
	if c := verify(t, broken); len(c) == 0 {
		t.Error("systemd-analyze verify did not notice a misspelt directive: the check is blind")
	}
}

// TestCoordinatorUnitIsHardened: systemd's own offline security review must
// rate the unit's exposure low (0 is best, 10 worst).
func TestCoordinatorUnitIsHardened(t *testing.T) {
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	root, unitPath := verifyRoot(t, string(unit))
	out, err := exec.Command("systemd-analyze", "security", "--offline=true", "--root="+root, "--threshold=25", unitPath).CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for agent-coordinator.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("systemd-analyze security printed no exposure level (%v):\n%s", err, out)
	}
	level, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security: exposure %.1f (0 best, 10 worst)", level)
	if err != nil || level > 2.5 {
		t.Errorf("exposure %.1f is over 2.5 (%v):\n%s", level, err, out)
	}
	k := unitKeys(t, unitFile)["Service"]
	for key, want := range map[string]string{"DynamicUser": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes", "StateDirectory": "agent-coordinator"} {
		if got := k[key]; len(got) != 1 || got[0] != want {
			t.Errorf("%s=%v, want %s", key, got, want)
		}
	}
}

// TestCoordinatorUnitMatchesTheCommandLine: the flags the unit passes exist,
// every ${VAR} it expands is set by the example file or a default, every
// variable of the example file is used, and the state directory is the
// coordinator's data directory.
func TestCoordinatorUnitMatchesTheCommandLine(t *testing.T) {
	bin := agentBinary(t)
	svc := unitKeys(t, unitFile)["Service"]
	execStart := svc["ExecStart"]
	if len(execStart) != 1 {
		t.Fatalf("ExecStart=%v, want one command", execStart)
	}
	argv := strings.Fields(execStart[0])
	if argv[0] != "/usr/local/bin/agent" || len(argv) < 2 || argv[1] != "coordinator" {
		t.Fatalf("ExecStart runs %q, want /usr/local/bin/agent coordinator ...", execStart[0])
	}
	checkArgs(t, bin, unitFile, "coordinator", argv[2:])

	defaults := map[string]string{}
	for _, e := range svc["Environment"] {
		for _, kv := range strings.Fields(e) {
			k, v, _ := strings.Cut(kv, "=")
			defaults[k] = v
		}
	}
	file := envFileVars(t, envFile)
	expanded := map[string]bool{}
	for _, m := range regexp.MustCompile(`\$\{([A-Z_]+)\}`).FindAllStringSubmatch(execStart[0], -1) {
		expanded[m[1]] = true
		if _, ok := file[m[1]]; !ok {
			if _, ok := defaults[m[1]]; !ok {
				t.Errorf("ExecStart expands ${%s}, which neither %s nor Environment= sets", m[1], envFile)
			}
		}
	}
	coordHelp := help(t, bin, "coordinator")
	rootHelp := help(t, bin)
	for name := range file {
		if !expanded[name] && !envDocumented(coordHelp, name) && !envDocumented(rootHelp, name) {
			t.Errorf("%s sets %s, which neither the unit's ExecStart nor `agent coordinator` uses", envFile, name)
		}
	}
	dataDir := defaults["AGENT_COORDINATOR_DATA_DIR"]
	if want := "%S/" + svc["StateDirectory"][0]; dataDir != want {
		t.Errorf("AGENT_COORDINATOR_DATA_DIR=%q, want %q (the StateDirectory)", dataDir, want)
	}
	if !envDocumented(coordHelp, "AGENT_COORDINATOR_DATA_DIR") {
		t.Error("`agent coordinator` does not read AGENT_COORDINATOR_DATA_DIR")
	}
}

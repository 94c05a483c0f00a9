package deploy

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
)

// builtAgent is the agent built once for this test run by TestMain (or the
// binary AGENT_TEST_BINARY names), so the manifests are checked against the
// command line as it is, not as it was documented.
var builtAgent string

func TestMain(m *testing.M) {
	code, err := runWithAgent(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "deploy tests:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func runWithAgent(m *testing.M) (int, error) {
	if p := os.Getenv("AGENT_TEST_BINARY"); p != "" {
		builtAgent = p
		return m.Run(), nil
	}
	dir, err := os.MkdirTemp("", "deploy-test-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	builtAgent = filepath.Join(dir, "agent")
	build := exec.Command("go", "build", "-o", builtAgent, "./cmd/agent")
	build.Dir = ".." // the repository root: the agent's own module
	if out, err := build.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("build the agent in the repository root: %w\n%s", err, out)
	}
	return m.Run(), nil
}

func agentBinary(t *testing.T) string {
	t.Helper()
	return builtAgent
}

// help returns `agent SUBCOMMAND --help`.
func help(t *testing.T, bin string, sub ...string) string {
	t.Helper()
	out, err := exec.Command(bin, append(sub, "--help")...).CombinedOutput()
	if err != nil {
		t.Fatalf("agent %s --help: %v\n%s", strings.Join(sub, " "), err, out)
	}
	return string(out)
}

var flagName = regexp.MustCompile(`^--([a-z0-9-]+)`)

// checkArgs fails for every --flag in args that `agent SUB --help` does not
// list, and for a subcommand the binary does not have.
func checkArgs(t *testing.T, bin, where string, sub string, args []string) {
	t.Helper()
	h := help(t, bin, sub)
	if !strings.Contains(h, "agent "+sub) {
		t.Errorf("%s: `agent %s --help` does not describe %q:\n%s", where, sub, sub, h)
	}
	for _, a := range args {
		m := flagName.FindStringSubmatch(a)
		if m == nil {
			continue
		}
		if !regexp.MustCompile(`(?m)^\s+(-\w, )?--` + regexp.QuoteMeta(m[1]) + `\b`).MatchString(h) {
			t.Errorf("%s: `agent %s` has no flag --%s", where, sub, m[1])
		}
	}
}

// envDocumented reports whether NAME is one the command reads: its help
// says "env NAME".
func envDocumented(help, name string) bool {
	return strings.Contains(help, "env "+name+")") || strings.Contains(help, "env "+name+";")
}

// startWorkspaceEnv lists the variables scripts/start-workspace reads, from
// its header.
func startWorkspaceEnv(t *testing.T) map[string]bool {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "scripts", "start-workspace"))
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#\s+(AGENT_[A-Z_]+)\s`).FindAllStringSubmatch(string(data), -1) {
		vars[m[1]] = true
	}
	return vars
}

// TestManifestsMatchTheCommandLine runs the real binary's help for every
// container and checks its flags and AGENT_* variables exist.
func TestManifestsMatchTheCommandLine(t *testing.T) {
	bin := agentBinary(t)
	rootHelp := help(t, bin)
	for _, w := range workloads(loadManifests(t)) {
		for _, c := range w.pod.Containers {
			where := fmt.Sprintf("%s container %s", w, c.Name)
			argv := append(append([]string{}, c.Command...), c.Args...)
			var sub string
			var helpText string
			if len(argv) == 0 {
				// The workspace image's entrypoint: start-workspace, which
				// execs `agent run`.
				sub = "run"
				helpText = help(t, bin, "run")
			} else {
				if len(c.Command) > 0 && filepath.Base(c.Command[0]) == "agent" {
					argv = argv[1:]
				}
				sub = argv[0]
				checkArgs(t, bin, where, sub, argv[1:])
				helpText = help(t, bin, sub)
			}
			sw := startWorkspaceEnv(t)
			for _, e := range c.Env {
				if !strings.HasPrefix(e.Name, "AGENT_") {
					continue
				}
				if envDocumented(helpText, e.Name) || envDocumented(rootHelp, e.Name) {
					continue
				}
				if len(argv) == 0 && sw[e.Name] {
					continue
				}
				t.Errorf("%s: sets %s, which `agent %s` does not read", where, e.Name, sub)
			}
		}
	}
}

// TestWorkspaceHealthPortMatchesAgentDefault: the manifests move the health
// endpoint to 0.0.0.0 but keep the agent's port, so docs and dashboards agree.
func TestWorkspaceHealthPortMatchesAgentDefault(t *testing.T) {
	h := help(t, agentBinary(t), "run")
	m := regexp.MustCompile(`--health-addr string .*\(default "([^"]+)"\)`).FindStringSubmatch(h)
	if m == nil {
		t.Fatalf("`agent run --help` shows no --health-addr default:\n%s", h)
	}
	_, defPort, _ := strings.Cut(m[1], ":")
	d := find[*appsv1.Deployment](t, loadManifests(t), "workspaces", "ws1")
	addr, _ := envValue(d.Spec.Template.Spec.Containers[0], "AGENT_HEALTH_ADDR")
	if _, port, _ := strings.Cut(addr, ":"); port != defPort {
		t.Errorf("AGENT_HEALTH_ADDR=%s uses port %s; the agent's default is %s", addr, port, defPort)
	}
	if !envDocumented(h, "AGENT_HEALTH_ADDR") {
		t.Error("`agent run` does not read AGENT_HEALTH_ADDR")
	}
}

// Package tailnet_test runs the real agent binary, as a coordinator, a
// workspace agent and a laptop client, in network namespaces of its own:
// the coordinator on a "public" network, the agent and the client each
// behind their own NAT router.
package tailnet_test

import (
	"bytes"
	"context"
	"encoding/json"
	"github.com/agentd/agent/internal/syncbuf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/testkit/agentbin"
)

// agentBinary is the real binary these tests run, built once.
var agentBinary agentbin.Builder

func buildAgent(t testing.TB) string { return agentBinary.Path(t) }

func TestMain(m *testing.M) {
	// Sessions run /bin/sh, not root's login shell: bash reads ~/.bashrc
	// for commands run by an SSH server, and a machine whose .bashrc does
	// real work (pyenv init here: its rehash lock held concurrent sessions
	// for 60 s) would decide these tests' timing.
	os.Setenv("AGENT_SHELL", "/bin/sh")
	code := m.Run()
	agentBinary.Remove()
	os.Exit(code)
}

const coordPort = "8443"

// deployment is the whole product across the lab.
type deployment struct {
	t       testing.TB
	bin     string
	lab     *netlab.Lab
	sites   *netlab.TwoSites
	dataDir string
	url, fp string

	userToken  string
	agentToken string

	coord *exec.Cmd
	agent *exec.Cmd
	home  string // the client's HOME
}

func newDeployment(t testing.TB, mode netlab.NATMode) *deployment {
	t.Helper()
	return newDeploymentWith(t, mode, netlab.DropUnsolicited)
}

// newDeploymentWith is newDeployment with the workspace router's treatment
// of unsolicited inbound UDP given (the laptop's router always drops it).
func newDeploymentWith(t testing.TB, mode netlab.NATMode, workspaceFW netlab.Firewall) *deployment {
	t.Helper()
	lab := netlab.New(t)
	bin := buildAgent(t)
	d := &deployment{
		t:       t,
		bin:     bin,
		lab:     lab,
		sites:   lab.NewTwoSitesWith(mode, workspaceFW, netlab.DropUnsolicited),
		dataDir: t.TempDir(),
		home:    t.TempDir(),
	}
	d.url = "https://" + d.sites.CoordinatorAddr.String() + ":" + coordPort
	d.startCoordinator()

	d.admin("user", "create", "alice")
	d.admin("user", "create", "bob")
	var created struct {
		Secret string `json:"secret"`
	}
	d.adminJSON(&created, "agent", "create", "ws1", "--owner", "alice")
	d.agentToken = created.Secret
	d.adminJSON(&created, "token", "create", "--user", "alice")
	d.userToken = created.Secret
	d.startAgent()
	return d
}

func (d *deployment) startCoordinator() {
	d.t.Helper()
	d.coord = d.sites.Coordinator.Start(d.bin, "coordinator",
		"--data-dir", d.dataDir,
		"--listen", d.sites.CoordinatorAddr.String()+":"+coordPort,
		"--stun-addr", d.sites.CoordinatorAddr.String()+":3478",
		"--stun-addr2", d.sites.CoordinatorAddr.String()+":3479")
	deadline := time.Now().Add(20 * time.Second)
	for {
		var info struct {
			Running     bool   `json:"running"`
			Fingerprint string `json:"fingerprint"`
		}
		out, err := exec.Command(d.bin, "admin", "--data-dir", d.dataDir, "--json", "info").Output()
		if err == nil && json.Unmarshal(out, &info) == nil && info.Running {
			d.fp = info.Fingerprint
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("the coordinator did not come up within 20 s: %v %s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *deployment) stopCoordinator() {
	d.t.Helper()
	stopProcess(d.t, d.coord)
}

func (d *deployment) startAgent() {
	d.t.Helper()
	d.startAgentWith()
}

// startAgentWith starts the agent with extra `agent run` flags.
func (d *deployment) startAgentWith(extra ...string) {
	d.t.Helper()
	tokenFile := filepath.Join(d.t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(d.agentToken+"\n"), 0o600); err != nil {
		d.t.Fatal(err)
	}
	d.agent = d.sites.Host1.Start(d.bin, append([]string{"run",
		"--coordinator-url", d.url,
		"--token-file", tokenFile,
		"--fingerprint", d.fp,
		"--data-dir", filepath.Join(d.dataDir, "agent-state"),
		"--health-addr", ""}, extra...)...)
	d.waitAgent("ws1")
}

// waitAgent waits until the agent is connected to the coordinator, so a
// test's first client does not race it (and print "offline" warnings).
func (d *deployment) waitAgent(name string) {
	d.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var info struct {
			Peers []struct {
				Role string `json:"role"`
				Name string `json:"name"`
			} `json:"peers"`
		}
		out, err := exec.Command(d.bin, "admin", "--data-dir", d.dataDir, "--json", "info").Output()
		if err == nil && json.Unmarshal(out, &info) == nil {
			for _, p := range info.Peers {
				if p.Role == "agent" && p.Name == name {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("agent %s did not connect to the coordinator within 30 s", name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *deployment) stopAgent() {
	d.t.Helper()
	stopProcess(d.t, d.agent)
}

// stopProcess sends SIGTERM and requires an exit within 5 s.
func stopProcess(t testing.TB, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatalf("signal %s: %v", cmd.Path, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("%v did not exit within 5 s of SIGTERM", cmd.Args[:2])
	}
}

func (d *deployment) admin(args ...string) string {
	d.t.Helper()
	full := append([]string{"admin", "--data-dir", d.dataDir}, args...)
	out, err := exec.Command(d.bin, full...).CombinedOutput()
	if err != nil {
		d.t.Fatalf("agent %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	return string(out)
}

func (d *deployment) adminJSON(v any, args ...string) {
	d.t.Helper()
	out := d.admin(append([]string{"--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		d.t.Fatalf("admin %v: %v in %s", args, err, out)
	}
}

// clientEnv is the laptop's environment: the coordinator and alice's token.
func (d *deployment) clientEnv(token string) []string {
	return []string{
		"HOME=" + d.home,
		"PATH=" + os.Getenv("PATH"),
		"AGENT_URL=" + d.url,
		"AGENT_TOKEN=" + token,
		"AGENT_FINGERPRINT=" + d.fp,
	}
}

// client runs an agent client command on the laptop (Host2).
func (d *deployment) client(ctx context.Context, token string, args ...string) (stdout, stderr string, err error) {
	cmd := d.sites.Host2.CommandContext(ctx, d.bin, args...)
	cmd.Env = d.clientEnv(token)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// startClient starts a long-running client command on the laptop.
func (d *deployment) startClient(args ...string) *exec.Cmd {
	d.t.Helper()
	cmd := d.sites.Host2.Command(d.bin, args...)
	cmd.Env = d.clientEnv(d.userToken)
	return cmd
}

// lockedBuffer collects a child's output from two pipes.
type lockedBuffer = syncbuf.Buffer

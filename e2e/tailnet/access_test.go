package tailnet_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/testkit/sshtest"
)

// sshConfig runs `agent config-ssh` for the laptop and returns the file.
func sshConfig(t *testing.T, d *deployment) string {
	t.Helper()
	path := filepath.Join(d.home, "ssh_config")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if out, stderr, err := d.client(ctx, d.userToken, "config-ssh", "--ssh-config", path); err != nil {
		t.Fatalf("config-ssh: %v\n%s%s", err, out, stderr)
	}
	return path
}

// openSSH runs OpenSSH's ssh on the laptop with the config-ssh block, so
// the ProxyCommand and KnownHostsCommand run there with the user's token.
func openSSH(ctx context.Context, d *deployment, token, config string, args ...string) *exec.Cmd {
	full := append([]string{"-F", config, "-o", "BatchMode=yes", "ws1.agent"}, args...)
	cmd := d.sites.Host2.CommandContext(ctx, "ssh", full...)
	cmd.Env = d.clientEnv(token)
	return cmd
}

// netnsOf is the network namespace a process in ns sees, as readlink of
// /proc/self/ns/net prints it.
func netnsOf(t *testing.T, ns *netlab.Namespace) string {
	t.Helper()
	out, err := ns.Command("readlink", "/proc/self/ns/net").Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// The impostor: a former grantee runs `agent run` with the
// workspace's stolen agent token on his own laptop. The coordinator refuses
// it with one line (the host key is not the one pinned at the workspace's
// first registration), the real agent is not disturbed, and OpenSSH, checking
// host keys strictly against the key the coordinator vouches for, reaches
// the real workspace every time, and refuses with its standard warning a
// workspace holding another key than the one vouched for the name.
func TestImpostorAgentRefused(t *testing.T) {
	sshtest.RequireTools(t, "ssh")
	d := newDeployment(t, netlab.NATEndpointIndependent)
	config := sshConfig(t, d)
	real := netnsOf(t, d.sites.Host1)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	reach := func(what string) {
		t.Helper()
		defer func(t0 time.Time) { t.Logf("%s: ssh took %v", what, time.Since(t0)) }(time.Now())
		out, err := openSSH(ctx, d, d.userToken, config, "readlink /proc/self/ns/net").Output()
		if err != nil || strings.TrimSpace(string(out)) != real {
			t.Fatalf("%s: ssh ws1.agent: %v, output %q; want the real workspace's namespace %s", what, err, out, real)
		}
	}
	reach("before the impostor")

	tokenFile := filepath.Join(t.TempDir(), "stolen")
	if err := os.WriteFile(tokenFile, []byte(d.agentToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		imp := d.sites.Host2.CommandContext(ctx, d.bin, "run",
			"--coordinator-url", d.url, "--token-file", tokenFile, "--fingerprint", d.fp,
			"--data-dir", filepath.Join(t.TempDir(), "impostor"), "--health-addr", "")
		t0 := time.Now()
		out, err := imp.CombinedOutput()
		t.Logf("impostor refused after %v", time.Since(t0))
		if err == nil || !strings.Contains(string(out), "identity_mismatch") || !strings.Contains(string(out), "agent admin agent reset-identity ws1") {
			t.Fatalf("impostor run %d: %v, output:\n%s\nwant a refusal naming the pinned identity and reset-identity", i, err, out)
		}
		reach("after the impostor's attempt")
	}
	for range 3 {
		reach("again")
	}

	// The stolen agent token used as a user token is refused too, and
	// does not knock the agent off.
	_, stderr, err := d.client(ctx, d.agentToken, "ssh", "ws1", "--", "true")
	if err == nil || !strings.Contains(stderr, "agent token of workspace ws1") {
		t.Fatalf("agent token as user token: %v, stderr %q", err, stderr)
	}
	reach("after the agent token was used as a user token")

	// OpenSSH itself refuses a workspace whose key is not the one the
	// coordinator vouches for, with its standard warning. A second
	// workspace, ws2, is reached under ws1's name: OpenSSH looks up the
	// key the coordinator vouches for ws1 (HostKeyAlias) and meets ws2's.
	var ws2 struct {
		Secret string `json:"secret"`
	}
	d.adminJSON(&ws2, "agent", "create", "ws2", "--owner", "alice")
	ws2Token := filepath.Join(t.TempDir(), "ws2-token")
	if err := os.WriteFile(ws2Token, []byte(ws2.Secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.sites.Host1.Start(d.bin, "run", "--coordinator-url", d.url, "--token-file", ws2Token, "--fingerprint", d.fp,
		"--data-dir", filepath.Join(t.TempDir(), "ws2-state"), "--health-addr", "")
	deadline := time.Now().Add(30 * time.Second)
	for {
		cmd := d.sites.Host2.CommandContext(ctx, "ssh", "-F", config, "-o", "BatchMode=yes", "ws2.agent", "true")
		cmd.Env = d.clientEnv(d.userToken)
		if cmd.Run() == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ws2 not reachable within 30 s")
		}
		time.Sleep(300 * time.Millisecond)
	}
	cmd := d.sites.Host2.CommandContext(ctx, "ssh", "-F", config, "-o", "BatchMode=yes", "-o", "HostKeyAlias=ws1.agent", "ws2.agent", "echo reached")
	cmd.Env = d.clientEnv(d.userToken)
	out, err := cmd.CombinedOutput()
	if err == nil || strings.Contains(string(out), "reached") || !strings.Contains(string(out), "REMOTE HOST IDENTIFICATION HAS CHANGED") {
		t.Fatalf("a workspace holding another key than the vouched one: %v, output:\n%s\nwant OpenSSH's refusal", err, out)
	}
}

// Revoking the user's token ends, within the bound, the user's OpenSSH
// session through ProxyCommand and `agent port-forward`, each with one line
// naming the reason, and hangs up the remote process.
func TestRevocationEndsOpenSSHAndPortForward(t *testing.T) {
	sshtest.RequireTools(t, "ssh")
	const bound = 2 * time.Second
	d := newDeployment(t, netlab.NATEndpointIndependent)
	config := sshConfig(t, d)
	var tok struct {
		Secret string `json:"secret"`
		Token  struct {
			ID string `json:"id"`
		} `json:"token"`
	}
	d.adminJSON(&tok, "token", "create", "--user", "alice")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	// The mark is the remote sh's last argument (POSIX sh: the e2e agents
	// run /bin/sh); ssh's own command line spells it differently, so
	// pgrep finds only the remote one.
	suffix := filepath.Base(t.TempDir())
	mark := "agent-e2e-revoke-" + suffix
	ssh := openSSH(ctx, d, tok.Secret, config, `exec sh -c 'sleep 300; :' "$(printf %s agent-e2e-revoke)-`+suffix+`"`)
	var sshOut lockedBuffer
	ssh.Stdout, ssh.Stderr = &sshOut, &sshOut
	if err := ssh.Start(); err != nil {
		t.Fatal(err)
	}
	pf := d.sites.Host2.CommandContext(ctx, d.bin, "port-forward", "ws1", "20001")
	pf.Env = d.clientEnv(tok.Secret)
	var pfOut lockedBuffer
	pf.Stdout, pf.Stderr = &pfOut, &pfOut
	pf.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	// Both are up: the remote process runs, the forward listens.
	deadline := time.Now().Add(45 * time.Second)
	for exec.Command("pgrep", "-f", mark).Run() != nil || !strings.Contains(pfOut.String(), "Forwarding") {
		if time.Now().After(deadline) {
			t.Fatalf("ssh or port-forward not up within 45 s:\nssh: %s\nport-forward: %s", sshOut.String(), pfOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	start := time.Now()
	d.admin("token", "revoke", tok.Token.ID)
	for name, cmd := range map[string]*exec.Cmd{"ssh": ssh, "port-forward": pf} {
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			t.Logf("%s exited %v after the revocation", name, time.Since(start))
			if err == nil {
				t.Errorf("%s exited 0 after the revocation", name)
			}
			if took := time.Since(start); took > bound+time.Second {
				t.Errorf("%s exited %v after the revocation, want about %v", name, took, bound)
			}
		case <-time.After(15 * time.Second):
			t.Fatalf("%s still runs 15 s after the revocation", name)
		}
	}
	for name, out := range map[string]string{"ssh": sshOut.String(), "port-forward": pfOut.String()} {
		if !strings.Contains(out, `access to workspace "ws1" ended: user alice's token was revoked`) {
			t.Errorf("%s did not say why it ended:\n%s", name, out)
		}
	}
	defer func() { t.Logf("the remote process was gone %v after the revocation", time.Since(start)) }()
	for exec.Command("pgrep", "-f", mark).Run() == nil {
		if time.Since(start) > bound+time.Second {
			t.Fatalf("the remote process still runs %v after the revocation", time.Since(start))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

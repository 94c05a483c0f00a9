package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const sshdPath = "/usr/sbin/sshd"

// openSSHTrue times `ssh root@127.0.0.1 true` against OpenSSH's sshd on
// loopback (throwaway config, host key and client key in dir): the
// reference for `agent ssh WORKSPACE true`. It returns sshRuns timings
// after one untimed connection.
func openSSHTrue(ctx context.Context, dir string) ([]float64, error) {
	for _, tool := range []string{sshdPath, "ssh", "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not installed (openssh-server, openssh-client)", tool)
		}
	}
	dir = filepath.Join(dir, "openssh")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	hostKey, clientKey := filepath.Join(dir, "host_key"), filepath.Join(dir, "client_key")
	for _, k := range []string{hostKey, clientKey} {
		if out, err := exec.CommandContext(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ssh-keygen: %w: %s", err, out)
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, "sshd_config")
	conf := fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s.pub
PidFile none
UsePAM no
StrictModes no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
LogLevel ERROR
`, port, hostKey, clientKey)
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	// Debian's sshd refuses to start without its privilege separation directory.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		return nil, err
	}
	sshd := exec.CommandContext(ctx, sshdPath, "-D", "-e", "-f", cfg)
	if err := sshd.Start(); err != nil {
		return nil, fmt.Errorf("start sshd: %w", err)
	}
	defer func() { sshd.Process.Kill(); sshd.Wait() }()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("sshd did not listen on %s: %w", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	args := []string{"-p", strconv.Itoa(port), "-i", clientKey, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
		"-F", "/dev/null", "root@127.0.0.1", "true"}
	var times []float64
	for i := range sshRuns + 1 {
		start := time.Now()
		if out, err := exec.CommandContext(ctx, "ssh", args...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ssh to OpenSSH's sshd: %w: %s", err, strings.TrimSpace(string(out)))
		}
		if i > 0 {
			times = append(times, float64(time.Since(start).Microseconds())/1000)
		}
	}
	return times, nil
}

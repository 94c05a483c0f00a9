package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/agentd/agent/internal/testkit/sshtest"
)

// openSSHTrue times `ssh root@127.0.0.1 true` against OpenSSH's sshd on
// loopback (throwaway config, host key and client key in dir): the
// reference for `agent ssh WORKSPACE true`. It returns sshRuns timings
// after one untimed connection.
func openSSHTrue(ctx context.Context, dir string) ([]float64, error) {
	args, stop, err := referenceSSHD(ctx, filepath.Join(dir, "openssh"))
	if err != nil {
		return nil, err
	}
	defer stop()
	args = append(args, "true")
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

// referenceSSHD starts OpenSSH's sshd on loopback with a throwaway config,
// host key and client key in dir (extra lines added to its config) and
// returns the ssh arguments that log in to it as root, to which the caller
// appends the command.
func referenceSSHD(ctx context.Context, dir string, extra ...string) (sshArgs []string, stop func(), err error) {
	hostKey, clientKey, err := openSSHKeys(ctx, dir, "ssh")
	if err != nil {
		return nil, nil, err
	}
	addr, stop, err := sshtest.StartOpenSSHD(ctx, dir, hostKey, clientKey+".pub", nil, extra...)
	if err != nil {
		return nil, nil, err
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		stop()
		return nil, nil, err
	}
	return []string{"-p", port, "-i", clientKey, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
		"-F", "/dev/null", "root@127.0.0.1"}, stop, nil
}

// openSSHKeys checks that OpenSSH's sshd and the client tool are installed
// and makes dir with a throwaway host key and client key in it.
func openSSHKeys(ctx context.Context, dir, client string) (hostKey, clientKey string, err error) {
	for _, tool := range []string{sshtest.OpenSSHDPath, client, "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", "", fmt.Errorf("%s not installed (openssh-server, openssh-client)", tool)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", err
	}
	hostKey, clientKey = filepath.Join(dir, "host_key"), filepath.Join(dir, "client_key")
	for _, k := range []string{hostKey, clientKey} {
		if out, err := exec.CommandContext(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k).CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("ssh-keygen: %w: %s", err, out)
		}
	}
	return hostKey, clientKey, nil
}

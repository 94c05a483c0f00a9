package sshtest

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"
)

// OpenSSHDPath is where Debian's openssh-server puts sshd.
const OpenSSHDPath = "/usr/sbin/sshd"

// StartOpenSSHD runs the system's sshd in the foreground on a free loopback
// port, as the reference our server is measured against: a throwaway
// configuration in dir with the given host key and authorized keys file,
// root login by key only, and internal sftp. It returns sshd's address once
// it accepts connections, and a func that stops it. sshd's own messages go
// to stderr (nil discards them). Extra lines, e.g. "MaxStartups 1000",
// are appended to the configuration.
func StartOpenSSHD(ctx context.Context, dir, hostKey, authorizedKeys string, stderr io.Writer, extra ...string) (addr string, stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cfg := filepath.Join(dir, "sshd_config")
	conf := fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PidFile none
UsePAM no
StrictModes no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
Subsystem sftp internal-sftp
LogLevel ERROR
`, port, hostKey, authorizedKeys)
	for _, line := range extra {
		conf += line + "\n"
	}
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return "", nil, err
	}
	// Debian's sshd refuses to start without its privilege separation directory.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		return "", nil, err
	}
	cmd := exec.CommandContext(ctx, OpenSSHDPath, "-D", "-e", "-f", cfg)
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return "", nil, fmt.Errorf("start sshd: %w", err)
	}
	stop = func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }
	addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return addr, stop, nil
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("sshd did not listen on %s: %w", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

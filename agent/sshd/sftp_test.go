package sshd_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/internal/testkit/sshtest"
)

// OpenSSH's sftp client learns our limits (limits@openssh.com) and moves
// files in 255 KiB requests, as against OpenSSH's sftp-server, and the
// files arrive intact both ways.
func TestSFTPLimits(t *testing.T) {
	sshtest.RequireTools(t, "sftp")
	_, addr := startServer(t, sshd.Options{})
	tg := target(addr)
	dir := t.TempDir()
	src, sum := sshtest.MakeFile(t, dir, 3<<20+12345)
	up, down := filepath.Join(dir, "up.bin"), filepath.Join(dir, "down.bin")
	batch := filepath.Join(dir, "batch")
	if err := os.WriteFile(batch, []byte("put "+src+" "+up+"\nget "+up+" "+down+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// -vvv is sftp's own log level, which LogLevel=ERROR (for ssh) leaves.
	cmd := exec.CommandContext(ctx, "sftp", append(append([]string{"-vvv"}, tg.SSHArgs()...), "-b", batch, tg.Host)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("sftp: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "using 261120 / 261120") {
		t.Errorf("sftp did not take our limits (want 261120-byte reads and writes):\n%s", stderr.String())
	}
	for _, path := range []string{up, down} {
		if got := sshtest.FileSHA256(t, path); got != sum {
			t.Errorf("%s: SHA-256 %s, want %s", path, got, sum)
		}
	}
}

package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/agentd/agent/internal/testkit/sshtest"
)

// proxySCPBytes is the size of the scp upload through `agent ssh --stdio`
// (issue 14 measured 512 MiB).
const proxySCPBytes = 512 << 20

// proxySCP times scp uploads of proxySCPBytes into the workspace the way
// `agent config-ssh` users make them: OpenSSH's scp with `agent ssh --stdio`
// as its ProxyCommand, to our SSH server. The reference is the same scp to
// OpenSSH's sshd running in the workspace, reached through `agent
// port-forward` over the same tailnet. Both use the same cipher; each is
// run twice, alternating, and the best run of each counts (the machine is
// shared). It returns MB/s for ours and the reference.
func (d *deployment) proxySCP(ctx context.Context) (ours, ref float64, err error) {
	dir := filepath.Join(d.dir, "proxyscp")
	hostKey, clientKey, err := openSSHKeys(ctx, dir, "scp")
	if err != nil {
		return 0, 0, err
	}
	sshdAddr, stopSSHD, err := sshtest.StartOpenSSHD(ctx, dir, hostKey, clientKey+".pub", nil)
	if err != nil {
		return 0, 0, err
	}
	defer stopSSHD()
	_, sshdPort, err := net.SplitHostPort(sshdAddr)
	if err != nil {
		return 0, 0, err
	}
	localPort, err := freePort()
	if err != nil {
		return 0, 0, err
	}
	fwd := exec.CommandContext(ctx, d.bin, "port-forward", "ws", fmt.Sprintf("127.0.0.1:%d:%s", localPort, sshdPort))
	fwd.Env = d.clientEnv
	fwd.Stdout, fwd.Stderr = d.processLogs, d.processLogs
	fwd.Cancel = func() error { return fwd.Process.Signal(os.Interrupt) }
	fwd.WaitDelay = 5 * time.Second
	fwd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := fwd.Start(); err != nil {
		return 0, 0, fmt.Errorf("start agent port-forward: %w", err)
	}
	defer func() {
		fwd.Process.Signal(os.Interrupt)
		fwd.Wait()
	}()

	src := filepath.Join(dir, "src.bin")
	if err := writeZeros(src, proxySCPBytes); err != nil {
		return 0, 0, err
	}
	dst := filepath.Join(dir, "dst.bin")
	common := []string{"-q", "-o", "Ciphers=aes128-gcm@openssh.com", "-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-F", "/dev/null",
		"-i", clientKey, "-o", "IdentitiesOnly=yes"}
	viaStdio := append(slices.Clone(common), "-o", "ProxyCommand="+d.bin+" ssh --stdio %n", src, "root@ws:"+dst)
	viaForward := append(slices.Clone(common), "-P", strconv.Itoa(localPort), src, "root@127.0.0.1:"+dst)

	// The forward's listener is up before its tunnel: the first copy (small)
	// retries until the whole path answers.
	warm := filepath.Join(dir, "warm.bin")
	if err := writeZeros(warm, 1<<20); err != nil {
		return 0, 0, err
	}
	for _, args := range [][]string{viaStdio, viaForward} {
		args = append(slices.Clone(args[:len(args)-2]), warm, args[len(args)-1])
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, err := d.scp(ctx, args, dst, 1<<20); err == nil {
				break
			} else if time.Now().After(deadline) {
				return 0, 0, fmt.Errorf("warm-up copy: %w", err)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	for range 2 {
		for i, args := range [][]string{viaStdio, viaForward} {
			secs, err := d.scp(ctx, args, dst, proxySCPBytes)
			if err != nil {
				return 0, 0, err
			}
			mbs := float64(proxySCPBytes) / 1e6 / secs
			if i == 0 {
				ours = max(ours, mbs)
			} else {
				ref = max(ref, mbs)
			}
		}
	}
	return ours, ref, nil
}

// scp runs one copy and checks that size bytes arrived; it returns seconds.
func (d *deployment) scp(ctx context.Context, args []string, dst string, size int64) (float64, error) {
	defer os.Remove(dst)
	runCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(runCtx, "scp", args...)
	cmd.Env = d.clientEnv
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("scp %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	secs := time.Since(start).Seconds()
	if fi, err := os.Stat(dst); err != nil || fi.Size() != size {
		return 0, fmt.Errorf("scp %s left %v (%v), want %d bytes", strings.Join(args, " "), fi, err, size)
	}
	return secs, nil
}

func writeZeros(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	block := make([]byte, 1<<20)
	for written := int64(0); written < size; written += int64(len(block)) {
		if _, err := f.Write(block[:min(int64(len(block)), size-written)]); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

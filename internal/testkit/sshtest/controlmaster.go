package sshtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ControlMaster: OpenSSH's connection sharing. Several commands run at
// once as sessions of one master connection; a multiplexed client that is
// killed has its own session hung up while the master and the other
// sessions go on; `ssh -O exit` ends the master.
func ControlMaster(t *testing.T, tg Target) {
	dir := shortTempDir(t)
	ctl := filepath.Join(dir, "cm")
	master := tg.Background(t, "-o", "ControlMaster=yes", "-o", "ControlPath="+ctl)
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(ctl); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the master connection never opened its control socket %s", ctl)
		}
		time.Sleep(50 * time.Millisecond)
	}
	muxArgs := func(extra ...string) []string {
		args := append(tg.SSHArgs(), "-o", "ControlMaster=no", "-o", "ControlPath="+ctl)
		return append(append(args, extra...), tg.Host)
	}
	run := func(command string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, "ssh", append(muxArgs(), command)...).CombinedOutput()
		return string(out), err
	}

	// Concurrent sessions over the one connection: the server sees the
	// same client port in each.
	const n = 4
	outs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = run(fmt.Sprintf(`echo "mux-%d $SSH_CLIENT"`, i))
		}()
	}
	wg.Wait()
	var clientPort string
	for i := 0; i < n; i++ {
		f := strings.Fields(outs[i])
		if errs[i] != nil || len(f) < 3 || f[0] != fmt.Sprintf("mux-%d", i) {
			t.Fatalf("multiplexed session %d: %v, output %q", i, errs[i], outs[i])
		}
		if clientPort == "" {
			clientPort = f[2]
		} else if f[2] != clientPort {
			t.Errorf("multiplexed session %d came from client port %s, session 0 from %s: not one connection", i, f[2], clientPort)
		}
	}

	// A killed multiplexed client: its session is hung up, the master's
	// connection stays.
	marker := fmt.Sprintf("sleep 5%d.%d", os.Getpid(), time.Now().UnixNano()%100000)
	victim := exec.Command("ssh", append(muxArgs(), marker)...)
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = victim.Wait(); close(done) }()
	defer func() { _ = victim.Process.Kill(); <-done }()
	WaitProcess(t, marker, time.Minute)
	_ = victim.Process.Kill()
	<-done
	WaitNoProcess(t, marker, 30*time.Second)
	if out, err := run("echo still-shared"); err != nil || strings.TrimSpace(out) != "still-shared" {
		t.Fatalf("session after a killed multiplexed client: %q %v", out, err)
	}

	// ssh -O exit ends the master.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "ssh", muxArgs("-O", "exit")...).CombinedOutput(); err != nil {
		t.Fatalf("ssh -O exit: %v: %s", err, out)
	}
	deadline = time.Now().Add(30 * time.Second)
	for master.Process.Signal(syscall.Signal(0)) == nil {
		if time.Now().After(deadline) {
			t.Fatal("the master connection still runs 30 s after ssh -O exit")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

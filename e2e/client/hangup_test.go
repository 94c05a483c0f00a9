package client_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/syncbuf"
	"github.com/agentd/agent/internal/testkit/sshload"
)

// A client ended by a hangup (its terminal closed; OpenSSH hangs up its
// ProxyCommand as it exits) must end the way Ctrl-C ends it: close its
// session and say goodbye to the coordinator. Killed by the signal's
// default action it counted as lost, and the workspace kept its peer for
// the 15-minute grace of a client in a network blip. A client started
// under nohup keeps running through the hangup, as nohup asks.
func TestHungUpClientSaysGoodbye(t *testing.T) {
	bin := buildAgent(t)
	ns, env, devOut, socket := devInNamespace(t, bin, "hup")
	probe := sshload.NewProbe(0, socket)

	for _, tc := range []struct {
		name  string
		nohup bool
	}{{"hangup", false}, {"nohup", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			if err := waitCount(ctx, "peer(s)", probe.Peers, 0, 20*time.Second); err != nil {
				t.Fatalf("before the client: %v", err)
			}
			// One argument: like OpenSSH, agent ssh hands the command to the
			// workspace's shell as one line.
			args := []string{bin, "ssh", "dev", "--", "echo ready; exec sleep 60"}
			if tc.nohup {
				args = append([]string{"sh", "-c", `trap "" HUP; exec "$@"`, "sh"}, args...)
			}
			client := ns.CommandContext(ctx, args[0], args[1:]...)
			client.Env = env
			stdout, err := client.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			var stderr syncbuf.Buffer
			client.Stderr = &stderr
			if err := client.Start(); err != nil {
				t.Fatal(err)
			}
			defer client.Process.Kill()
			ready, done := make(chan error, 1), make(chan error, 1)
			go func() {
				var got strings.Builder
				sc := bufio.NewScanner(stdout)
				for sc.Scan() && sc.Text() != "ready" {
					fmt.Fprintln(&got, sc.Text())
				}
				if sc.Text() != "ready" {
					ready <- fmt.Errorf("the session ended without printing ready: %q", got.String())
				} else {
					ready <- nil
				}
				io.Copy(io.Discard, stdout)
				done <- client.Wait()
			}()
			select {
			case err := <-ready:
				if err != nil {
					t.Fatalf("%v\nclient: %s\nagent dev:\n%s", err, stderr.String(), devOut.String())
				}
			case <-ctx.Done():
				t.Fatalf("the session printed nothing in time\nclient: %s", stderr.String())
			}
			// The session runs: the workspace has the client as its peer (so
			// the check below can fail).
			if err := waitCount(ctx, "peer(s)", probe.Peers, 1, 30*time.Second); err != nil {
				t.Fatalf("with the session running: %v\nclient: %s\nagent dev:\n%s", err, stderr.String(), devOut.String())
			}
			if err := client.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			hungUp := time.Now()
			if tc.nohup {
				select {
				case err := <-done:
					t.Fatalf("a client started under nohup ended on a hangup: %v: %s", err, stderr.String())
				case <-time.After(2 * time.Second):
				}
				// Ended as a service manager ends it instead.
				if err := client.Process.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
			}
			_, err2 := awaitOwnEnd(t, done, &stderr, "it was hung up")
			t.Logf("agent ssh ended %v after the signal (%v): %q", time.Since(hungUp).Round(time.Millisecond), err2, stderr.String())
			// Said goodbye: the workspace drops a departed client at once,
			// and keeps a lost one for 15 minutes.
			if err := waitCount(ctx, "peer(s)", probe.Peers, 0, 5*time.Second); err != nil {
				t.Fatalf("after the client ended: %v (it did not say goodbye: the workspace keeps a lost client's peer for 15 minutes)\nagent dev:\n%s", err, devOut.String())
			}
		})
	}
}

// devInNamespace starts `agent dev` in a new network namespace and
// returns the namespace, a client's environment, dev's output and its
// agent's status socket.
func devInNamespace(t *testing.T, bin, name string) (*netlab.Namespace, []string, *syncbuf.Buffer, string) {
	t.Helper()
	ns := netlab.New(t).Namespace(name)
	dataDir := t.TempDir()
	env, out := startDev(t, ns.Command(bin, "dev", "--data-dir", dataDir))
	return ns, env, out, filepath.Join(dataDir, "agent", "status.sock")
}

// awaitOwnEnd waits up to 15 s for a client's end (done has its Wait's
// error) after what happened, and fails the test if a signal killed it.
// It returns the exit status and Wait's error.
func awaitOwnEnd(t *testing.T, done <-chan error, stderr *syncbuf.Buffer, after string) (int, error) {
	t.Helper()
	var err error
	select {
	case err = <-done:
	case <-time.After(15 * time.Second):
		t.Fatalf("agent ssh still runs 15 s after %s:\n%s", after, stderr.String())
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return 0, err
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		t.Fatalf("agent ssh was killed by %v after %s instead of ending by itself: %s", ws.Signal(), after, stderr.String())
	}
	return ee.ExitCode(), err
}

// waitCount waits up to limit for count to give want; what names the count
// in the error ("peer(s)").
func waitCount(ctx context.Context, what string, count func(context.Context) (int, error), want int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		n, err := count(ctx)
		if err == nil && n == want {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("the agent has %d %s, want %d, after %v (%v)", n, what, want, limit, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sshSessionsOf counts the agent's open SSH sessions, for waitCount.
func sshSessionsOf(p *sshload.Probe) func(context.Context) (int, error) {
	return func(ctx context.Context) (int, error) {
		f, err := p.Metrics(ctx)
		return f.SSHSessions, err
	}
}

// A session whose local output goes away (`agent ssh ws -- cmd | head`)
// ends as a pipeline's writer does, with status 141, but closes its session
// first, so the workspace hangs the command up, and says goodbye. Killed by
// SIGPIPE (Go's default for a write to a closed stdout), the client left
// the command running in the workspace until keepalives gave up, and its
// peer kept as lost.
func TestClosedOutputEndsTheSession(t *testing.T) {
	bin := buildAgent(t)
	ns, env, devOut, socket := devInNamespace(t, bin, "epipe")
	probe := sshload.NewProbe(0, socket)
	for _, tc := range []struct {
		name  string
		args  []string
		stdin string
	}{
		{"command", []string{"ssh", "dev", "--", "yes"}, ""},
		// A shell fed its commands on stdin (no terminal).
		{"shell", []string{"ssh", "dev"}, "exec yes\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			client := ns.CommandContext(ctx, bin, tc.args...)
			client.Env = env
			client.Stdin = strings.NewReader(tc.stdin)
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			client.Stdout = w
			var stderr syncbuf.Buffer
			client.Stderr = &stderr
			if err := client.Start(); err != nil {
				t.Fatal(err)
			}
			w.Close()
			defer client.Process.Kill()
			line, err := bufio.NewReader(r).ReadString('\n')
			if line != "y\n" {
				t.Fatalf("first line %q (%v)\nclient: %s\nagent dev:\n%s", line, err, stderr.String(), devOut.String())
			}
			// The command runs in the workspace (so the checks below can fail).
			if err := waitCount(ctx, "SSH session(s) open", sshSessionsOf(probe), 1, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			r.Close()
			closed := time.Now()
			done := make(chan error, 1)
			go func() { done <- client.Wait() }()
			code, werr := awaitOwnEnd(t, done, &stderr, "its output closed")
			if code != 141 {
				t.Errorf("agent ssh ended with %v, want exit status 141 (128 + SIGPIPE, as for any pipeline writer): %s", werr, stderr.String())
			}
			t.Logf("agent ssh ended %v after its output closed: %v %q", time.Since(closed).Round(time.Millisecond), werr, stderr.String())
			if err := waitCount(ctx, "SSH session(s) open", sshSessionsOf(probe), 0, 5*time.Second); err != nil {
				t.Errorf("after the client ended: %v (the command still runs in the workspace)", err)
			}
			if err := waitCount(ctx, "peer(s)", probe.Peers, 0, 5*time.Second); err != nil {
				t.Errorf("after the client ended: %v (it did not say goodbye)\nagent dev:\n%s", err, devOut.String())
			}
		})
	}
}

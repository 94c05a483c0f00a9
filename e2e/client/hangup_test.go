package client_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/syncbuf"
)

// A client ended by a hangup (its terminal closed; OpenSSH hangs up its
// ProxyCommand as it exits) must end the way Ctrl-C ends it: close its
// session and say goodbye to the coordinator. Killed by the signal's
// default action it counted as lost, and the workspace kept its peer for
// the 15-minute grace of a client in a network blip. A client started
// under nohup keeps running through the hangup, as nohup asks.
func TestHungUpClientSaysGoodbye(t *testing.T) {
	lab := netlab.New(t)
	bin := buildAgent(t)
	ns := lab.Namespace("hup")
	dataDir := t.TempDir()
	env, devOut := startDev(t, ns.Command(bin, "dev", "--data-dir", dataDir))
	peers := agentPeerCounter(filepath.Join(dataDir, "agent", "status.sock"))

	for _, tc := range []struct {
		name  string
		nohup bool
	}{{"hangup", false}, {"nohup", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			if err := waitPeers(ctx, peers, 0, 20*time.Second); err != nil {
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
			if err := waitPeers(ctx, peers, 1, 30*time.Second); err != nil {
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
			var err2 error
			select {
			case err2 = <-done:
			case <-time.After(15 * time.Second):
				t.Fatalf("agent ssh still runs 15 s after it was hung up:\n%s", stderr.String())
			}
			var ee *exec.ExitError
			if errors.As(err2, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					t.Fatalf("agent ssh was killed by %v instead of ending its session: %s", ws.Signal(), stderr.String())
				}
			}
			t.Logf("agent ssh ended %v after the signal (%v): %q", time.Since(hungUp).Round(time.Millisecond), err2, stderr.String())
			// Said goodbye: the workspace drops a departed client at once,
			// and keeps a lost one for 15 minutes.
			if err := waitPeers(ctx, peers, 0, 5*time.Second); err != nil {
				t.Fatalf("after the client ended: %v (it did not say goodbye: the workspace keeps a lost client's peer for 15 minutes)\nagent dev:\n%s", err, devOut.String())
			}
		})
	}
}

// agentPeerCounter returns a function that counts the peers the agent
// lists on its owner-only status socket.
func agentPeerCounter(socket string) func(context.Context) (int, error) {
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	return func(ctx context.Context) (int, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/status", nil)
		if err != nil {
			return 0, err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		var st struct {
			Peers []json.RawMessage `json:"peers"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			return 0, fmt.Errorf("status socket: %w", err)
		}
		return len(st.Peers), nil
	}
}

// waitPeers waits up to limit for the agent to list want peers.
func waitPeers(ctx context.Context, count func(context.Context) (int, error), want int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		n, err := count(ctx)
		if err == nil && n == want {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("the agent lists %d peer(s), want %d, after %v (%v)", n, want, limit, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"
)

// runNamespaceChild runs this program again as `unshare NSARGS -- benchrun
// ARGS...` with env added, copies its stderr to log and decodes the JSON it
// prints into v. what names the measurements in errors.
func runNamespaceChild(ctx context.Context, log io.Writer, nsArgs, env []string, what string, v any, args ...string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "unshare", append(append(nsArgs, "--", self), args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout = &stdout
	cmd.Stderr = io.MultiWriter(log, &stderr)
	// unshare executes the child in its place: an interrupt lets the child
	// stop what it started.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 15 * time.Second
	fmt.Fprintf(log, "\n$ %s unshare %s -- benchrun %s\n", strings.Join(env, " "), strings.Join(nsArgs, " "), strings.Join(args, " "))
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", what, err, lastLines(stderr.String(), 1))
	}
	if err := json.Unmarshal(stdout.Bytes(), v); err != nil {
		return fmt.Errorf("%s printed %q: %w", what, stdout.String(), err)
	}
	return nil
}

// namespaceUp brings up loopback and a veth pair a/b with a documentation
// address in a fresh network namespace: with no interface but loopback,
// Tailscale's engine takes the network for down and never dials its relay.
func namespaceUp(ctx context.Context, a, b string) error {
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", a, "type", "veth", "peer", "name", b},
		{"addr", "add", "198.51.100.1/24", "dev", a},
		{"link", "set", a, "up"},
		{"link", "set", b, "up"},
	} {
		if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s in the bench namespace: %w: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// upDeployment, in a fresh network namespace, brings its links up, starts
// a deployment in a new temporary directory and waits for its first
// `agent ssh ws true` (which also brings the agent's side up). done stops
// it and removes the directory.
func upDeployment(ctx context.Context, bin, vethA, vethB string) (d *deployment, done func(), err error) {
	if err := namespaceUp(ctx, vethA, vethB); err != nil {
		return nil, nil, err
	}
	dir, err := os.MkdirTemp("", "agent-bench-")
	if err != nil {
		return nil, nil, err
	}
	d = &deployment{bin: bin, dir: dir}
	done = func() { d.stop(); os.RemoveAll(dir) }
	if err := d.start(ctx); err != nil {
		done()
		return nil, nil, err
	}
	if _, err := d.sshTrue(ctx); err != nil {
		done()
		return nil, nil, err
	}
	return d, done, nil
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/agent"
	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
)

// devOptions is `agent dev` as parsed from its command line.
type devOptions struct {
	dataDir  string
	listen   string
	stunAddr string
	name     string
	user     string
	// shell for SSH sessions (env AGENT_SHELL, as agent run's --shell).
	shell       string
	memoryLimit string
}

func newDevCmd(env *cliEnv) *cobra.Command {
	return newDevCmdWith(env, runDev)
}

// newDevCmdWith builds the command around runF, so tests can check what the
// command line parses to without starting anything.
func newDevCmdWith(env *cliEnv, runF func(context.Context, *cliEnv, *devOptions) error) *cobra.Command {
	o := &devOptions{}
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run an embedded coordinator and an agent for this machine, and show how to reach it",
		Long: `Run everything on this machine for a first look: a coordinator (HTTPS with a
self-signed certificate, DERP relay, STUN), a user, and a workspace agent for
this machine that joins the tailnet through it. It prints the commands that
reach the workspace: a shell, a ping, port forwarding and OpenSSH.

State (the coordinator's store and certificate, the agent's SSH host key)
lives in --data-dir, so a restart keeps the same identities; each start
issues fresh tokens. Stop it with Ctrl-C.`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.shell = env.Getenv("AGENT_SHELL")
			return runF(cmd.Context(), env, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.dataDir, "data-dir", "agent-data", "directory for the coordinator's store and the agent's state")
	f.StringVar(&o.listen, "listen", "127.0.0.1:7443", "coordinator HTTPS address")
	f.StringVar(&o.stunAddr, "stun-addr", "127.0.0.1:0", "coordinator STUN address (UDP)")
	f.StringVar(&o.name, "name", "dev", "the workspace's name")
	f.StringVar(&o.user, "user", "dev", "the user allowed to reach it")
	f.StringVar(&o.memoryLimit, "memory-limit", envOr(env, "AGENT_DEV_MEMORY_LIMIT", defaultDevMemoryLimit), memoryLimitFlagUsage("AGENT_DEV_MEMORY_LIMIT"))
	return cmd
}

// runDev runs the embedded coordinator and this machine's agent until ctx
// ends.
func runDev(ctx context.Context, env *cliEnv, o *devOptions) error {
	log := env.Logger()
	// The flag always has a value; an in-process caller that gives none
	// leaves its own runtime's limit alone.
	if o.memoryLimit != "" {
		limit, err := applyMemoryLimit(env, o.memoryLimit)
		if err != nil {
			return err
		}
		if limit > 0 {
			log.Debug("soft memory limit", "bytes", limit)
		}
		// A burst of sessions grows both the agent's and the
		// coordinator's heap; hand it back once quiet, as `agent run` does.
		go returnIdleMemory(ctx, idleCheckInterval)
	}
	abs, err := filepath.Abs(o.dataDir)
	if err != nil {
		return err
	}
	coordDir := filepath.Join(abs, "coordinator")
	if err := os.MkdirAll(coordDir, 0o700); err != nil {
		return fmt.Errorf("create the data directory: %w", err)
	}
	srv, err := coordinator.New(coordinator.Config{
		DataDir:  coordDir,
		Listen:   o.listen,
		STUNAddr: o.stunAddr,
		Logger:   log.With("component", "coordinator"),
	})
	if err != nil {
		return fmt.Errorf("start the coordinator: %w (another `agent dev` running? choose another --listen or --data-dir)", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()

	creds, err := devCredentials(ctx, coordDir, o.user, o.name)
	if err != nil {
		cancel()
		<-served
		return err
	}
	a, err := agent.New(agent.Options{
		Logger:      log.With("component", "agent"),
		Coordinator: coordclient.Config{URL: srv.URL(), Token: creds.agentToken, Fingerprint: srv.Fingerprint(), Software: "agent-dev"},
		DataDir:     filepath.Join(abs, "agent"),
		HealthAddr:  "",
		Shell:       o.shell,
	})
	if err != nil {
		cancel()
		<-served
		return err
	}
	printDevBanner(env.Stdout, srv.URL(), srv.Fingerprint(), creds.userToken, o.name)
	agentErr := a.Run(ctx)
	cancel()
	select {
	case <-served:
	case <-time.After(5 * time.Second):
	}
	return agentErr
}

type devCreds struct{ agentToken, userToken string }

// devCredentials makes sure the user and the agent exist and issues fresh
// tokens for both: tokens are shown once, so a restart needs new ones.
func devCredentials(ctx context.Context, dataDir, user, name string) (devCreds, error) {
	adm, err := admin.DialSocket(ctx, admin.SocketPath(dataDir))
	if err != nil {
		return devCreds{}, fmt.Errorf("reach the embedded coordinator's admin socket: %w", err)
	}
	if _, err := adm.CreateUser(ctx, user); err != nil && !errors.Is(err, store.ErrExists) {
		return devCreds{}, fmt.Errorf("create user %q: %w", user, err)
	}
	var creds devCreds
	created, err := adm.CreateAgent(ctx, name, user)
	switch {
	case err == nil:
		creds.agentToken = created.Secret
	case errors.Is(err, store.ErrExists):
		t, err := adm.CreateToken(ctx, store.KindAgent, name, time.Time{})
		if err != nil {
			return devCreds{}, fmt.Errorf("issue a token for agent %q: %w", name, err)
		}
		creds.agentToken = t.Secret
	default:
		return devCreds{}, fmt.Errorf("create agent %q: %w", name, err)
	}
	// The user token expires, so a forgotten dev session leaves nothing
	// usable behind for long.
	t, err := adm.CreateToken(ctx, store.KindUser, user, time.Now().Add(24*time.Hour))
	if err != nil {
		return devCreds{}, fmt.Errorf("issue a token for user %q: %w", user, err)
	}
	creds.userToken = t.Secret
	return creds, nil
}

func printDevBanner(w io.Writer, url, fp, token, name string) {
	fmt.Fprintf(w, `
Workspace %[4]q is joining the tailnet through the coordinator at %[1]s.
In another terminal:

  export AGENT_URL=%[1]s AGENT_FINGERPRINT=%[2]s
  export AGENT_TOKEN=%[3]s
  agent ping %[4]s                      # path (direct or DERP) and latency
  agent ssh %[4]s                       # a shell; or: agent ssh %[4]s -- uname -a
  agent port-forward %[4]s 8080:8080    # a server on the workspace's localhost:8080
  agent config-ssh && ssh %[4]s.agent   # OpenSSH, scp, rsync, VS Code Remote-SSH
                                         # (config-ssh needs 'agent login' first:
                                         #  agent login %[1]s --token $AGENT_TOKEN --fingerprint %[2]s)

`, url, fp, token, name)
}

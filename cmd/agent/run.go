package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/agentd/agent/agent"
	"github.com/agentd/agent/agent/reaper"
	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/coordinator/coordclient"
)

// runOptions is `agent run` as parsed from its command line.
type runOptions struct {
	url, token, tokenFile, fingerprint string
	dataDir, healthAddr, memoryLimit   string
	listenPort                         uint16
	shell                              string
	sessionIdle, deadPeer              time.Duration
	insecureHTTP, allowInsecurePerms   bool
}

func newRunCmd(env *cliEnv) *cobra.Command {
	return newRunCmdWith(env, runAgent)
}

// newRunCmdWith builds the command around runF, so tests can check what the
// command line and the environment parse to without starting the agent.
func newRunCmdWith(env *cliEnv, runF func(context.Context, *cliEnv, *runOptions) error) *cobra.Command {
	o := &runOptions{}
	var memoryLimit string // --memory-limit; copied into o when the command runs
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the workspace agent: join the tailnet, serve SSH and port forwarding",
		Long: `Run the workspace agent. It registers with the coordinator, brings up a
userspace tailnet (no TUN device, no root), serves SSH on tailnet port 1 and the
agent API on port 2, and forwards every other tailnet port to this workspace's
localhost. While the coordinator is away, established tunnels keep working and
the agent reconnects with backoff.

The token is read from --token-file (preferred), AGENT_TOKEN_FILE, --token or
AGENT_TOKEN, and is never passed to processes the agent starts. Given by
--token or AGENT_TOKEN, the agent re-executes itself (same PID) without it, so
/proc/PID/cmdline and /proc/PID/environ do not show it. A token file readable
by every local user, or a data directory writable by every local user, is
refused (--allow-insecure-permissions overrides); a group-readable token file
whose group has other members is warned about. See docs/security.md.`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.memoryLimit = memoryLimit
			return runF(cmd.Context(), env, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.url, "coordinator-url", env.Getenv("AGENT_URL"), "coordinator URL, e.g. https://coord.example.com:8443 (env AGENT_URL)")
	f.StringVar(&o.tokenFile, "token-file", env.Getenv("AGENT_TOKEN_FILE"), "file holding the agent token (env AGENT_TOKEN_FILE; preferred over --token)")
	f.StringVar(&o.token, "token", env.Getenv("AGENT_TOKEN"), "agent token (env AGENT_TOKEN; visible in the process list: prefer --token-file)")
	f.StringVar(&o.fingerprint, "fingerprint", env.Getenv("AGENT_FINGERPRINT"), "SHA-256 fingerprint of the coordinator's self-signed certificate to pin (env AGENT_FINGERPRINT)")
	f.BoolVar(&o.insecureHTTP, "insecure-http", coordclient.InsecureHTTPFromEnv(env.Getenv(coordclient.EnvInsecureHTTP)), "allow an http:// coordinator URL: the token travels in cleartext (env AGENT_INSECURE_HTTP=1)")
	f.BoolVar(&o.allowInsecurePerms, "allow-insecure-permissions", coordclient.InsecureHTTPFromEnv(env.Getenv("AGENT_ALLOW_INSECURE_PERMISSIONS")), "run even when the token file is readable by every local user or the data directory writable by every local user (env AGENT_ALLOW_INSECURE_PERMISSIONS=1)")
	f.StringVar(&o.dataDir, "data-dir", env.Getenv("AGENT_DATA_DIR"), "directory for state kept across restarts, e.g. the SSH host key (env AGENT_DATA_DIR; default ~/.local/state/agent)")
	f.StringVar(&o.healthAddr, "health-addr", envOr(env, "AGENT_HEALTH_ADDR", "127.0.0.1:2113"), "serve /healthz, /readyz and /metrics here; empty disables (env AGENT_HEALTH_ADDR)")
	f.StringVar(&memoryLimit, "memory-limit", envOr(env, "AGENT_MEMORY_LIMIT", defaultMemoryLimit), memoryLimitFlagUsage("AGENT_MEMORY_LIMIT"))
	f.StringVar(&o.shell, "shell", env.Getenv("AGENT_SHELL"), "shell for SSH sessions instead of the account's login shell from /etc/passwd, e.g. /bin/sh in an image whose passwd entry names a shell it lacks (env AGENT_SHELL)")
	f.DurationVar(&o.sessionIdle, "session-idle-timeout", sshd.DefaultSessionIdleTimeout, "end a reconnecting terminal session (agent ssh) after it had no client attached for this long")
	f.DurationVar(&o.deadPeer, "dead-peer-timeout", agent.DefaultDeadPeerTimeout, "close a forwarded connection or SSH connection whose client stopped answering (killed, or its network gone) within this long; at least 1s")
	f.Uint16Var(&o.listenPort, "listen-port", 0, "UDP port for WireGuard (0 picks one; set it when the host publishes a fixed UDP port)")
	return cmd
}

// runAgent runs the workspace agent until ctx ends (or, with the token in
// its process image, re-executes itself without it).
func runAgent(ctx context.Context, env *cliEnv, o *runOptions) error {
	log := env.Logger()
	// Before the o.token is in memory: processes of the same uid
	// (every SSH session) may not read /proc/PID/environ or mem of
	// the agent, nor attach a debugger. OpenSSH's sshd does the
	// same. Children are dumpable again after exec.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		log.Warn("could not protect the agent's memory from processes of the same user", "err", err)
	}
	if o.deadPeer < time.Second {
		return fmt.Errorf("--dead-peer-timeout %v is too short: give at least 1s (default %v)", o.deadPeer, agent.DefaultDeadPeerTimeout)
	}
	tok, src, err := loadToken(env, o.token, o.tokenFile)
	if err != nil {
		return err
	}
	if o.dataDir == "" {
		o.dataDir = defaultDataDir(env)
	}
	policy := permissionPolicy{allowInsecure: o.allowInsecurePerms, log: log}
	if src == tokenFromFile {
		if err := policy.checkTokenFile(o.tokenFile); err != nil {
			return err
		}
	}
	if err := policy.checkDataDir(o.dataDir); err != nil {
		return err
	}
	if o.url == "" {
		return errors.New("no coordinator URL: pass --coordinator-o.url or set AGENT_URL")
	}
	if _, err := coordclient.ParseURL(o.url, o.fingerprint, o.insecureHTTP); err != nil {
		return err
	}
	// A o.token on the command line or in the environment stays
	// visible in /proc/PID/cmdline and /proc/PID/environ however
	// the process changes its variables: start afresh without it.
	if tokenInProcessImage(tok) {
		return reexecWithoutToken(tok)
	}
	// As PID 1 in a container, stay PID 1 only to reap orphans and
	// pass signals on, and run the agent itself as a child, handing
	// it the o.token on descriptor 3.
	if os.Getpid() == 1 {
		r, err := tokenPipe(tok)
		if err != nil {
			return err
		}
		args, childEnv := withoutToken(os.Args, os.Environ(), 3)
		if err := reaper.ReapOrphansIfPID1With(log, reaper.Child{Args: args, Env: childEnv, Files: []*os.File{r}}); err != nil {
			return err
		}
	}
	// Children (SSH sessions) must not inherit the o.token or know
	// where it was.
	for _, k := range []string{"AGENT_TOKEN", "AGENT_TOKEN_FILE", envTokenFD} {
		os.Unsetenv(k)
	}
	limit, err := applyMemoryLimit(env, o.memoryLimit)
	if err != nil {
		return err
	}
	if limit > 0 {
		log.Debug("soft memory limit", "bytes", limit)
	}
	go returnIdleMemory(ctx, idleCheckInterval)
	a, err := agent.New(agent.Options{
		Logger:      log,
		Coordinator: coordclient.Config{URL: o.url, Token: tok, Fingerprint: o.fingerprint, InsecureHTTP: o.insecureHTTP},
		DataDir:     o.dataDir,
		HealthAddr:  o.healthAddr,
		ListenPort:  o.listenPort,
		Shell:       o.shell,

		SessionIdleTimeout: o.sessionIdle,
		DeadPeerTimeout:    o.deadPeer,
	})
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// loadToken finds the token: handed over on a descriptor by agent run
// itself, else read from a file when one is named, else the literal from
// --token or AGENT_TOKEN. A file wins because it keeps the token out of the
// process list.
func loadToken(env *cliEnv, literal, file string) (string, tokenSource, error) {
	if v := env.Getenv(envTokenFD); v != "" {
		tok, err := readTokenFD(v)
		return tok, tokenFromFD, err
	}
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", tokenFromFile, fmt.Errorf("read the token file: %w (check --token-file / AGENT_TOKEN_FILE)", err)
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", tokenFromFile, fmt.Errorf("the token file %s is empty: write the agent token into it", file)
		}
		return tok, tokenFromFile, nil
	}
	if literal == "" {
		return "", tokenFromFlag, errors.New("no agent token: pass --token-file (or AGENT_TOKEN_FILE) naming a file with the token that `agent admin agent create` printed")
	}
	if env.Getenv("AGENT_TOKEN") == literal {
		return literal, tokenFromEnv, nil
	}
	return literal, tokenFromFlag, nil
}

// tokenInProcessImage reports whether this process's command line or
// initial environment carries the token.
func tokenInProcessImage(tok string) bool {
	if os.Getenv("AGENT_TOKEN") != "" {
		return true
	}
	for _, a := range os.Args {
		if strings.Contains(a, tok) {
			return true
		}
	}
	return false
}

// defaultDataDir is ~/.local/state/agent, honouring XDG_STATE_HOME.
func defaultDataDir(env *cliEnv) string {
	if d := env.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "agent")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", "agent")
	}
	return filepath.Join(os.TempDir(), "agent-state")
}

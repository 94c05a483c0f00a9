package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/agent"
	"github.com/agentd/agent/agent/reaper"
	"github.com/agentd/agent/coordclient"
)

func newRunCmd(env *cliEnv) *cobra.Command {
	var (
		url, token, tokenFile, fingerprint string
		dataDir, healthAddr, memoryLimit   string
		listenPort                         uint16
	)
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the workspace agent: join the tailnet, serve SSH and port forwarding",
		Long: `Run the workspace agent. It registers with the coordinator, brings up a
userspace tailnet (no TUN device, no root), serves SSH on tailnet port 1 and the
agent API on port 2, and forwards every other tailnet port to this workspace's
localhost. While the coordinator is away, established tunnels keep working and
the agent reconnects with backoff.

The token is read from --token-file (preferred), AGENT_TOKEN_FILE, --token or
AGENT_TOKEN, and is never passed to processes the agent starts.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := env.Logger()
			// As PID 1 in a container, stay PID 1 only to reap orphans and
			// pass signals on, and run the agent itself as a child.
			if err := reaper.ReapOrphansIfPID1(log); err != nil {
				return err
			}
			limit, err := applyMemoryLimit(env, memoryLimit)
			if err != nil {
				return err
			}
			if limit > 0 {
				log.Debug("soft memory limit", "bytes", limit)
			}
			tok, err := loadToken(token, tokenFile)
			if err != nil {
				return err
			}
			// Children (SSH sessions) must not inherit the token.
			os.Unsetenv("AGENT_TOKEN")
			os.Unsetenv("AGENT_TOKEN_FILE")
			if url == "" {
				return errors.New("no coordinator URL: pass --coordinator-url or set AGENT_URL")
			}
			if dataDir == "" {
				dataDir = defaultDataDir(env)
			}
			a, err := agent.New(agent.Options{
				Logger:      log,
				Coordinator: coordclient.Config{URL: url, Token: tok, Fingerprint: fingerprint},
				DataDir:     dataDir,
				HealthAddr:  healthAddr,
				ListenPort:  listenPort,
			})
			if err != nil {
				return err
			}
			return a.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&url, "coordinator-url", env.Getenv("AGENT_URL"), "coordinator URL, e.g. https://coord.example.com:8443 (env AGENT_URL)")
	f.StringVar(&tokenFile, "token-file", env.Getenv("AGENT_TOKEN_FILE"), "file holding the agent token (env AGENT_TOKEN_FILE; preferred over --token)")
	f.StringVar(&token, "token", env.Getenv("AGENT_TOKEN"), "agent token (env AGENT_TOKEN; visible in the process list: prefer --token-file)")
	f.StringVar(&fingerprint, "fingerprint", env.Getenv("AGENT_FINGERPRINT"), "SHA-256 fingerprint of the coordinator's self-signed certificate to pin (env AGENT_FINGERPRINT)")
	f.StringVar(&dataDir, "data-dir", env.Getenv("AGENT_DATA_DIR"), "directory for state kept across restarts, e.g. the SSH host key (env AGENT_DATA_DIR; default ~/.local/state/agent)")
	f.StringVar(&healthAddr, "health-addr", envOr(env, "AGENT_HEALTH_ADDR", "127.0.0.1:2113"), "serve /healthz, /readyz and /metrics here; empty disables (env AGENT_HEALTH_ADDR)")
	f.StringVar(&memoryLimit, "memory-limit", envOr(env, "AGENT_MEMORY_LIMIT", defaultMemoryLimit), memoryLimitFlagUsage("AGENT_MEMORY_LIMIT"))
	f.Uint16Var(&listenPort, "listen-port", 0, "UDP port for WireGuard (0 picks one; set it when the host publishes a fixed UDP port)")
	return cmd
}

// loadToken reads the token from a file when one is named, else takes the
// literal. A file wins because it keeps the token out of the process list.
func loadToken(literal, file string) (string, error) {
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("read the token file: %w (check --token-file / AGENT_TOKEN_FILE)", err)
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", fmt.Errorf("the token file %s is empty: write the agent token into it", file)
		}
		return tok, nil
	}
	if literal == "" {
		return "", errors.New("no agent token: pass --token-file (or AGENT_TOKEN_FILE) naming a file with the token that `agent admin agent create` printed")
	}
	return literal, nil
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

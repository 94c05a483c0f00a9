// Command agent is the workspace agent, its coordinator, and the client a
// developer runs on a laptop, in one binary: one cobra command per job.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// cliEnv is what every command needs from its surroundings. It is built once
// in main and passed down, so that commands stay testable and there is no
// package-level state.
type cliEnv struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	// Getenv reads the environment; tests replace it.
	Getenv func(string) string

	logFormat string
	logLevel  string
	// logLevelExplicit is set when the user chose a level; client commands
	// otherwise log only warnings, so their own output stays readable.
	logLevelExplicit bool
}

// Logger returns a logger writing to stderr in the format and at the level
// chosen by the global --log-format and --log-level flags.
func (e *cliEnv) Logger() *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(e.logLevel)); err != nil {
		level = slog.LevelInfo
	}
	return e.loggerAt(level)
}

// ClientLogger is Logger for commands a person runs interactively: warnings
// and errors only, unless --log-level says otherwise.
func (e *cliEnv) ClientLogger() *slog.Logger {
	if e.logLevelExplicit {
		return e.Logger()
	}
	return e.loggerAt(slog.LevelWarn)
}

func (e *cliEnv) loggerAt(level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if strings.EqualFold(e.logFormat, "json") {
		return slog.New(slog.NewJSONHandler(e.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(e.Stderr, opts))
}

// exitError carries a process exit status through cobra without printing
// anything more (the command has already said what went wrong).
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func newRootCmd(env *cliEnv) *cobra.Command {
	root := &cobra.Command{
		Use:   "agent",
		Short: "Workspace agent, coordinator and client for a userspace WireGuard tailnet",
		Long: `agent is one binary with one job per subcommand:

  agent run          inside a workspace: join the tailnet, serve SSH and port forwarding
  agent coordinator  once per deployment: node exchange, auth, DERP relay and STUN
  agent ssh, port-forward, ping, config-ssh   on a laptop: reach a workspace
  agent netcheck     diagnose a workspace's network (or a node's, with --host)
  agent dev          an embedded coordinator and an agent for this machine`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			env.logLevelExplicit = cmd.Flags().Changed("log-level") || env.Getenv("AGENT_LOG_LEVEL") != ""
		},
	}
	root.PersistentFlags().StringVar(&env.logFormat, "log-format", envOr(env, "AGENT_LOG_FORMAT", "text"), "log format: text or json (env AGENT_LOG_FORMAT)")
	root.PersistentFlags().StringVar(&env.logLevel, "log-level", envOr(env, "AGENT_LOG_LEVEL", "info"), "log level: debug, info, warn or error (env AGENT_LOG_LEVEL)")
	root.SetIn(env.Stdin)
	root.SetOut(env.Stdout)
	root.SetErr(env.Stderr)

	// Commands, one constructor per file.
	// (add one line per command below; keep the list sorted)
	root.AddCommand(newAdminCmd(env))
	root.AddCommand(newCoordinatorCmd(env))
	root.AddCommand(newLoginCmd(env))
	root.AddCommand(newDevCmd(env))
	root.AddCommand(newPingCmd(env))
	root.AddCommand(newPortForwardCmd(env))
	root.AddCommand(newPortsCmd(env))
	root.AddCommand(newRunCmd(env))
	root.AddCommand(newSSHCmd(env))
	root.AddCommand(newConfigSSHCmd(env))
	root.AddCommand(newNetcheckCmd(env))
	root.AddCommand(newVersionCmd(env))

	return root
}

func envOr(env *cliEnv, name, fallback string) string {
	if v := env.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	env := &cliEnv{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd(env).ExecuteContext(ctx)
	stop()
	if err == nil {
		return
	}
	var ee *exitError
	if errors.As(err, &ee) {
		os.Exit(ee.code)
	}
	fmt.Fprintf(os.Stderr, "agent: %v\n", err)
	os.Exit(1)
}

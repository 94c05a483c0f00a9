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
	"sync/atomic"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// flagAlias maps a deprecated flag name to the one name every command uses
// now.
func flagAlias(name string) string {
	switch name {
	case "coordinator-url":
		return "url"
	}
	return name
}

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
	// verbose (--verbose or AGENT_VERBOSE=1) turns on the structured logs
	// of client commands, which otherwise print only sentences for people.
	verbose bool
	// rawTerminal is set while an interactive session holds the terminal
	// in raw mode, where a line must end in \r\n.
	rawTerminal atomic.Bool
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

// ClientLogger is Logger for commands a person runs on a laptop: silent
// unless --verbose, AGENT_VERBOSE=1 or a --log-level asks for logs. What a
// person should read goes through notice instead; as OpenSSH's
// ProxyCommand, log records would land in the user's terminal or editor.
func (e *cliEnv) ClientLogger() *slog.Logger {
	switch {
	case e.logLevelExplicit:
		return e.Logger()
	case e.verbose:
		return e.loggerAt(slog.LevelDebug)
	}
	return slog.New(slog.DiscardHandler)
}

// notice tells the person at the terminal one plain sentence on stderr.
func (e *cliEnv) notice(msg string) {
	if e.rawTerminal.Load() {
		fmt.Fprint(e.Stderr, msg+"\r\n")
		return
	}
	fmt.Fprintln(e.Stderr, msg)
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

// usageError is a command line that cannot work as written: a missing or
// extra argument, an unknown flag, flags that exclude each other. It exits
// with status 2, as the usage errors of most Unix tools do.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return &usageError{err: fmt.Errorf(format, args...)}
}

// usageArgs turns a cobra argument check's failure into a usage error.
func usageArgs(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := check(cmd, args); err != nil {
			return &usageError{err: fmt.Errorf("%w; see %q", err, cmd.CommandPath()+" --help")}
		}
		return nil
	}
}

// exitCode is the process exit status for an error a command returned.
func exitCode(err error) int {
	var ee *exitError
	var ue *usageError
	switch {
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &ue):
		return 2
	}
	return 1
}

func newRootCmd(env *cliEnv) *cobra.Command {
	root := &cobra.Command{
		Use:   "agent",
		Short: "Workspace agent, coordinator and client for a userspace WireGuard tailnet",
		Long: `agent is one binary with one job per subcommand:

  agent run          inside a workspace: join the tailnet, serve SSH and port forwarding
  agent coordinator  once per deployment: node exchange, auth, DERP relay and STUN
  agent login, list, ssh, port-forward, ping, ports, speedtest, config-ssh   on a laptop: reach a workspace
  agent completion bash|zsh|fish   shell completion, including workspace names
  agent netcheck     diagnose a workspace's network (or a node's, with --host)
  agent dev          an embedded coordinator and an agent for this machine`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			env.logLevelExplicit = cmd.Flags().Changed("log-level") || env.Getenv("AGENT_LOG_LEVEL") != ""
			if v := env.Getenv("AGENT_VERBOSE"); v != "" && v != "0" && !strings.EqualFold(v, "false") {
				env.verbose = true
			}
		},
	}
	// One vocabulary: older spellings keep working on every command
	// without showing up in --help.
	root.SetGlobalNormalizationFunc(func(_ *pflag.FlagSet, name string) pflag.NormalizedName {
		return pflag.NormalizedName(flagAlias(name))
	})
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return &usageError{err: fmt.Errorf("%w; see %q", err, cmd.CommandPath()+" --help")}
	})
	root.PersistentFlags().BoolVarP(&env.verbose, "verbose", "v", false, "client commands: print structured logs on stderr (env AGENT_VERBOSE=1)")
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
	root.AddCommand(newListCmd(env))
	root.AddCommand(newLogoutCmd(env))
	root.AddCommand(newDevCmd(env))
	root.AddCommand(newPingCmd(env))
	root.AddCommand(newPortForwardCmd(env))
	root.AddCommand(newPortsCmd(env))
	root.AddCommand(newRunCmd(env))
	root.AddCommand(newSSHCmd(env))
	root.AddCommand(newSpeedtestCmd(env))
	root.AddCommand(newConfigSSHCmd(env))
	root.AddCommand(newNetcheckCmd(env))
	root.AddCommand(newVersionCmd(env))

	root.InitDefaultCompletionCmd()
	if c, _, err := root.Find([]string{"completion"}); err == nil && c != root {
		c.Example = `  source <(agent completion bash)
  agent completion zsh > "${fpath[1]}/_agent"
  agent completion fish > ~/.config/fish/completions/agent.fish`
		c.Long += "\n\nWorkspace names are completed from the coordinator (as agent list shows them)."
	}

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
	// Before anything else handles a signal: it looks at what we were
	// started with.
	stopOn := setUpSignals()
	ctx, stop := signal.NotifyContext(context.Background(), stopOn...)
	err := newRootCmd(env).ExecuteContext(ctx)
	interrupted := ctx.Err() != nil
	stop()
	if err == nil {
		return
	}
	if interrupted {
		// Interrupted (Ctrl-C, SIGTERM, a hangup): the person knows why.
		os.Exit(130)
	}
	if strings.HasPrefix(err.Error(), "unknown command") {
		err = &usageError{err: err}
	}
	var ee *exitError
	if !errors.As(err, &ee) {
		fmt.Fprintf(os.Stderr, "agent: %v\n", err)
	}
	os.Exit(exitCode(err))
}

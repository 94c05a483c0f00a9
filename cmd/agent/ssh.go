package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/client"
	"github.com/agentd/agent/sshclient"
)

func newSSHCmd(env *cliEnv) *cobra.Command {
	var (
		cf           clientFlags
		stdio        bool
		forwardAgent bool
	)
	cmd := &cobra.Command{
		Use:   "ssh WORKSPACE [-- COMMAND...]",
		Short: "Open a shell or run a command in a workspace, or carry OpenSSH's traffic (--stdio)",
		Long: `Open an interactive shell in a workspace, or run a command there and exit with
its exit status. Authorization comes from the tailnet: no password or key.

With --stdio, copy raw SSH traffic between standard input/output and the
workspace's SSH server, for OpenSSH's ProxyCommand:

  ssh -o ProxyCommand='agent ssh --stdio %n' ws1.agent

(` + "`agent config-ssh`" + ` writes that into ~/.ssh/config for you).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			ws, err := env.connectWorkspace(ctx, &cf, args[0])
			if err != nil {
				return err
			}
			defer ws.Close()
			var code int
			err = untilAccessEnds(ctx, ws, func(ctx context.Context) error {
				conn, err := ws.DialTCP(ctx, client.PortSSH)
				if err != nil {
					return err
				}
				defer conn.Close()
				if stdio {
					if len(args) > 1 {
						return fmt.Errorf("--stdio carries an SSH connection and takes no command (got %q)", strings.Join(args[1:], " "))
					}
					return sshclient.ProxyStdio(ctx, conn, env.Stdin, env.Stdout)
				}
				if len(args) > 1 && !forwardAgent {
					code, err = sshclient.RunCommand(ctx, conn, strings.Join(args[1:], " "), env.Stdin, env.Stdout, env.Stderr)
				} else {
					opts := sshclient.InteractiveOptions{Stderr: env.Stderr, ForwardAgent: forwardAgent}
					if len(args) > 1 {
						opts.Command = strings.Join(args[1:], " ")
					}
					code, err = sshclient.RunInteractive(ctx, conn, opts)
				}
				return err
			})
			if err != nil {
				return err
			}
			if code != 0 {
				return &exitError{code: code}
			}
			return nil
		},
	}
	cf.register(cmd, env)
	cmd.Flags().BoolVar(&stdio, "stdio", false, "carry raw SSH traffic on stdin/stdout (for OpenSSH's ProxyCommand)")
	cmd.Flags().BoolVarP(&forwardAgent, "forward-agent", "A", false, "forward the local SSH agent (SSH_AUTH_SOCK) into the session")
	return cmd
}

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
		knownHosts   bool
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

(` + "`agent config-ssh`" + ` writes that into ~/.ssh/config for you).

Without --stdio, the workspace's SSH host key must be the one the
coordinator vouches for (pinned when the workspace's agent first
registered). With --known-hosts, print that key as a known_hosts line for
OpenSSH's KnownHostsCommand, so OpenSSH checks it too:

  KnownHostsCommand agent ssh --known-hosts %H`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if knownHosts {
				return printKnownHost(ctx, env, &cf, args)
			}
			ws, err := env.connectWorkspace(ctx, &cf, args[0])
			if err != nil {
				return err
			}
			defer ws.Close()
			var vouched string
			if !stdio {
				// With --stdio OpenSSH checks the key itself (config-ssh's
				// KnownHostsCommand); here we do. Asked once the workspace
				// is online, so a freshly started agent has proved its key.
				if vouched, err = env.vouchedHostKey(ctx, &cf, args[0]); err != nil {
					return err
				}
			}
			var code int
			err = untilAccessEnds(ctx, ws, func(ctx context.Context) error {
				conn, err := ws.DialTCP(ctx, client.PortSSH)
				if err != nil {
					return err
				}
				defer conn.Close()
				// Access ended: hang up now rather than wait for the
				// workspace's close, which can no longer arrive.
				stop := context.AfterFunc(ctx, func() {
					if ws.Err() != nil {
						conn.Close()
					}
				})
				defer stop()
				if vouched != "" {
					if conn, err = sshclient.ExpectHostKey(conn, vouched); err != nil {
						return err
					}
				}
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
	cmd.Flags().BoolVar(&knownHosts, "known-hosts", false, "print the workspace's vouched SSH host key as a known_hosts line (for OpenSSH's KnownHostsCommand)")
	cmd.Flags().BoolVarP(&forwardAgent, "forward-agent", "A", false, "forward the local SSH agent (SSH_AUTH_SOCK) into the session")
	return cmd
}

// printKnownHost prints the known_hosts line for the host name OpenSSH
// looks up (args[0], as KnownHostsCommand's %H gives it): that name and the
// key the coordinator vouches for. A workspace with no vouched key prints
// nothing, so OpenSSH with StrictHostKeyChecking refuses it.
func printKnownHost(ctx context.Context, env *cliEnv, cf *clientFlags, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("--known-hosts takes one host name (OpenSSH's %%H), got %d arguments", len(args))
	}
	key, err := env.vouchedHostKey(ctx, cf, args[0])
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "%s %s\n", args[0], key)
	return nil
}

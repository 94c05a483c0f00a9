package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/agentd/agent/client/sshclient/sshconfig"
	"github.com/spf13/cobra"
)

// configSSHOptions is `agent config-ssh` as parsed from its command line.
type configSSHOptions struct {
	configPath string
	suffix     string
	dryRun     bool
}

// newConfigSSHCmd writes the managed "Host *.agent" block into the user's
// OpenSSH config so ssh, scp, rsync, git and VS Code reach workspaces
// through `agent ssh --stdio`.
func newConfigSSHCmd(env *cliEnv) *cobra.Command {
	return newConfigSSHCmdWith(env, runConfigSSH)
}

// newConfigSSHCmdWith builds the command around runF, so tests can check
// what the command line parses to without touching ~/.ssh.
func newConfigSSHCmdWith(env *cliEnv, runF func(*cliEnv, *configSSHOptions) error) *cobra.Command {
	o := &configSSHOptions{}
	cmd := &cobra.Command{
		Use:   "config-ssh",
		Short: "Let ssh, scp, rsync and VS Code reach workspaces as NAME.agent",
		Long: `config-ssh adds (or updates) a marked block in your OpenSSH config:

  Host *.agent
      ProxyCommand <this agent binary> ssh --stdio %h
      KnownHostsCommand <this agent binary> ssh --known-hosts %H
      StrictHostKeyChecking yes

so that "ssh ws1.agent", "scp file ws1.agent:", rsync, git and VS Code
Remote-SSH reach workspace ws1 over the tailnet, and OpenSSH accepts only the
SSH host key the coordinator vouches for (pinned when the workspace's agent
first registered). Running it again updates the
block in place; everything outside the block is left as it is, and the
previous file is kept as <config>.agent.bak.`,
		Example: `  agent config-ssh --dry-run            # show the change first
  agent config-ssh && ssh ws1.agent`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			return runF(env, o)
		},
	}
	cmd.Flags().StringVar(&o.configPath, "ssh-config", "", "OpenSSH config file to update (default ~/.ssh/config)")
	cmd.Flags().BoolVar(&o.dryRun, "dry-run", false, "show the change as a diff without writing anything")
	cmd.Flags().StringVar(&o.suffix, "host-suffix", sshconfig.DefaultSuffix, "host name suffix that marks a workspace")
	return cmd
}

// runConfigSSH writes (or, with --dry-run, shows) the managed block.
func runConfigSSH(env *cliEnv, o *configSSHOptions) error {
	configPath := o.configPath
	if configPath == "" {
		home := env.Getenv("HOME")
		if home == "" {
			h, err := os.UserHomeDir()
			if err != nil {
				return fmt.Errorf("cannot find your home directory for ~/.ssh/config; pass --ssh-config PATH")
			}
			home = h
		}
		configPath = filepath.Join(home, ".ssh", "config")
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("cannot find the path of this agent binary for ProxyCommand: %w", err)
	}
	if resolved, err := filepath.EvalSymlinks(exe); err == nil {
		exe = resolved
	}
	block, err := sshconfig.Block(sshconfig.Options{AgentPath: exe, Suffix: o.suffix})
	if err != nil {
		return fmt.Errorf("--host-suffix: %w", err)
	}
	res, err := sshconfig.Update(configPath, block, o.dryRun)
	if err != nil {
		return err
	}
	switch {
	case !res.Changed:
		fmt.Fprintf(env.Stdout, "%s is already up to date.\n", res.Path)
	case o.dryRun:
		fmt.Fprint(env.Stdout, sshconfig.Diff(res.Path, res.Old, res.New))
		fmt.Fprintln(env.Stdout, "(dry run: nothing was written)")
	default:
		fmt.Fprintf(env.Stdout, "Updated %s: \"ssh NAME.%s\" now reaches workspace NAME.\n", res.Path, trimSuffixDots(o.suffix))
		if res.Backup != "" {
			fmt.Fprintf(env.Stdout, "The previous file is in %s.\n", res.Backup)
		}
	}
	return nil
}

func trimSuffixDots(s string) string {
	for len(s) > 0 && s[0] == '.' {
		s = s[1:]
	}
	for len(s) > 0 && s[len(s)-1] == '.' {
		s = s[:len(s)-1]
	}
	return s
}

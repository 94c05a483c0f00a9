package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/coordinator/coordclient"
)

func newLogoutCmd(env *cliEnv) *cobra.Command {
	return &cobra.Command{
		Use:   "logout",
		Short: "Forget the coordinator URL and token that agent login saved",
		Long: `Delete the file agent login wrote ($XDG_CONFIG_HOME/agent/config.json).
The token itself stays valid until it expires or an admin revokes it
(agent admin token revoke ID); AGENT_URL and AGENT_TOKEN, if set, still work.`,
		Example: `  agent logout`,
		Args:    usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			path, err := coordclient.ProfilePath(env.Getenv)
			if err != nil {
				return err
			}
			switch err := os.Remove(path); {
			case errors.Is(err, os.ErrNotExist):
				fmt.Fprintf(env.Stdout, "Not logged in (there is no %s).\n", path)
			case err != nil:
				return fmt.Errorf("removing the saved login: %w", err)
			default:
				fmt.Fprintf(env.Stdout, "Logged out: removed %s.\n", path)
			}
			if env.Getenv(coordclient.EnvToken) != "" {
				fmt.Fprintf(env.Stderr, "note: %s is still set in your environment; unset it to stop using that token.\n", coordclient.EnvToken)
			}
			return nil
		},
	}
}

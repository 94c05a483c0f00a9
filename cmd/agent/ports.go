package main

import (
	"encoding/json"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/forwardclient"
)

func newPortsCmd(env *cliEnv) *cobra.Command {
	var (
		cf     clientFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "ports WORKSPACE",
		Short: "List the TCP ports listening in a workspace",
		Long: `Ask the workspace's agent which TCP ports are listening there, with the
addresses they are bound to and the owning process where the agent may see
it. Every port listed can be reached with agent port-forward.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			ws, err := env.connectWorkspace(ctx, &cf, args[0])
			if err != nil {
				return err
			}
			defer ws.Close()
			hc := ws.HTTPClient()
			defer hc.CloseIdleConnections()
			ports, err := forwardclient.ListPorts(ctx, hc, "http://agent/")
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(ports)
			}
			return forwardclient.WritePortsTable(cmd.OutOrStdout(), ports)
		},
	}
	cf.register(cmd, env)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the list as JSON")
	return cmd
}

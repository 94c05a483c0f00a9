package main

import (
	"context"
	"encoding/json"
	"io"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/client/forwardclient"
)

// portsOptions is `agent ports` as parsed from its command line.
type portsOptions struct {
	cf        clientFlags
	workspace string
	json      bool
}

func newPortsCmd(env *cliEnv) *cobra.Command {
	o := &portsOptions{}
	cmd := &cobra.Command{
		Use:   "ports WORKSPACE",
		Short: "List the TCP ports listening in a workspace",
		Long: `Ask the workspace's agent which TCP ports are listening there, with the
addresses they are bound to and the owning process where the agent may see
it. Every port listed can be reached with agent port-forward.`,
		Example: `  agent ports ws1
  agent ports ws1 --json | jq '.[].port'`,
		Args: usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.workspace = args[0]
			return runPorts(cmd.Context(), env, o, cmd.OutOrStdout())
		},
	}
	o.cf.register(cmd, env)
	cmd.ValidArgsFunction = env.completeWorkspaceArg(&o.cf)
	o.cf.registerTimeout(cmd)
	cmd.Flags().BoolVar(&o.json, "json", false, "print the list as JSON")
	return cmd
}

func runPorts(ctx context.Context, env *cliEnv, o *portsOptions, out io.Writer) error {
	ctx, cancel := giveUpAfter(ctx, o.cf.timeout)
	defer cancel()
	ws, err := env.connectWorkspace(ctx, &o.cf, o.workspace)
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
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(ports)
	}
	return forwardclient.WritePortsTable(out, ports)
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/coordclient"
	"github.com/agentd/agent/protocol"
)

// listOptions is `agent list` as parsed from its command line.
type listOptions struct {
	cf   clientFlags
	json bool
}

func newListCmd(env *cliEnv) *cobra.Command {
	o := &listOptions{}
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the workspaces you may reach, whether they are online, and their network",
		Long: `Ask the coordinator which workspaces your token may reach (those you own and
those granted to you): each one's owner, whether its agent is online or since
when it is offline, and the agent's last network verdict. --json prints the
coordinator's answer as documented in docs/cli.md.`,
		Example: `  agent list
  agent list --json | jq -r '.workspaces[] | select(.online) | .name'`,
		Aliases: []string{"ls"},
		Args:    usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runList(cmd.Context(), env, o, cmd.OutOrStdout())
		},
	}
	o.cf.register(cmd, env)
	o.cf.registerTimeout(cmd)
	cmd.Flags().BoolVar(&o.json, "json", false, "print the list as JSON")
	return cmd
}

func runList(ctx context.Context, env *cliEnv, o *listOptions, out io.Writer) error {
	ws, err := env.listWorkspaces(ctx, &o.cf)
	if err != nil {
		return err
	}
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(protocol.Workspaces{Workspaces: ws})
	}
	if len(ws) == 0 {
		fmt.Fprintln(out, "No workspaces: an admin creates one (agent admin agent create NAME --owner YOU) or grants you one (agent admin grant YOU NAME).")
		return nil
	}
	return writeWorkspaceTable(out, ws, time.Now())
}

// listWorkspaces asks the coordinator, within --timeout.
func (e *cliEnv) listWorkspaces(ctx context.Context, cf *clientFlags) ([]protocol.WorkspaceInfo, error) {
	cfg, err := cf.resolve(e)
	if err != nil {
		return nil, err
	}
	hc, err := coordclient.HTTPClient(cfg.Fingerprint)
	if err != nil {
		return nil, err
	}
	ctx, cancel := giveUpAfter(ctx, cf.timeout)
	defer cancel()
	return coordclient.ListWorkspaces(ctx, hc, cfg.URL, cfg.Token)
}

func writeWorkspaceTable(out io.Writer, ws []protocol.WorkspaceInfo, now time.Time) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tOWNER\tSTATE\tNETWORK")
	for _, w := range ws {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", w.Name, w.Owner, stateText(w, now), networkText(w.Network))
	}
	return tw.Flush()
}

func stateText(w protocol.WorkspaceInfo, now time.Time) string {
	switch {
	case w.Online:
		return "online"
	case w.OfflineSince.IsZero():
		return "offline"
	}
	return fmt.Sprintf("offline since %s (%s ago)", w.OfflineSince.Local().Format("2006-01-02 15:04"), now.Sub(w.OfflineSince).Round(time.Second))
}

func networkText(v *protocol.NetworkVerdict) string {
	if v == nil {
		return "-"
	}
	if v.Status == protocol.NetworkOK || v.Summary == "" {
		return string(v.Status)
	}
	return string(v.Status) + ": " + strings.TrimSpace(v.Summary)
}

// completeWorkspaceArg completes the first argument with the names of the
// workspaces the coordinator lists, each described by its state; it stays
// silent (no files either) when the coordinator cannot be asked.
func (e *cliEnv) completeWorkspaceArg(cf *clientFlags) cobra.CompletionFunc {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		c := *cf
		c.timeout = completionTimeout
		ws, err := e.listWorkspaces(cmd.Context(), &c)
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var out []cobra.Completion
		for _, w := range ws {
			if strings.HasPrefix(w.Name, toComplete) {
				out = append(out, cobra.CompletionWithDesc(w.Name, stateText(w, time.Now())))
			}
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	}
}

// completionTimeout keeps a Tab press from hanging on an unreachable
// coordinator.
const completionTimeout = 3 * time.Second

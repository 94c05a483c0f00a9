package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

// listOptions is `agent list` as parsed from its command line.
type listOptions struct {
	cf    clientFlags
	json  bool
	paths bool
}

// listEntry is one line of `agent list --json`: the coordinator's view,
// plus the path a connection takes with --paths.
type listEntry struct {
	protocol.WorkspaceInfo
	Path *listPath `json:"path,omitempty"`
}

// listPath is how a ping to the workspace went (agent list --paths).
type listPath struct {
	// Kind is "direct" or "derp"; Error says why there is none.
	Kind       string  `json:"kind,omitempty"`
	Endpoint   string  `json:"endpoint,omitempty"`
	DERPRegion string  `json:"derp_region,omitempty"`
	LatencyMS  float64 `json:"latency_ms,omitempty"`
	Error      string  `json:"error,omitempty"`
}

// maxPathProbes bounds how many workspaces --paths connects to at once.
const maxPathProbes = 4

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
  agent list --paths                    # also connect to each online one: direct or relayed, latency
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
	cmd.Flags().BoolVar(&o.paths, "paths", false, "connect to each online workspace and show the path a connection takes (direct or DERP) and its latency")
	return cmd
}

func runList(ctx context.Context, env *cliEnv, o *listOptions, out io.Writer) error {
	ws, err := env.listWorkspaces(ctx, &o.cf)
	if err != nil {
		return err
	}
	entries := make([]listEntry, len(ws))
	for i, w := range ws {
		entries[i].WorkspaceInfo = w
	}
	if o.paths {
		env.probePaths(ctx, &o.cf, entries)
	}
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Workspaces []listEntry `json:"workspaces"`
		}{entries})
	}
	if len(ws) == 0 {
		fmt.Fprintln(out, "No workspaces: an admin creates one (agent admin agent create NAME --owner YOU) or grants you one (agent admin grant YOU NAME).")
		return nil
	}
	return writeWorkspaceTable(out, entries, o.paths, time.Now())
}

// probePaths connects to each online workspace (a few at a time, each
// within --timeout) and pings it once.
func (e *cliEnv) probePaths(ctx context.Context, cf *clientFlags, entries []listEntry) {
	sem := make(chan struct{}, maxPathProbes)
	var wg sync.WaitGroup
	for i := range entries {
		if !entries[i].Online {
			continue
		}
		wg.Add(1)
		go func(en *listEntry) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			en.Path = e.probePath(ctx, cf, en.Name)
		}(&entries[i])
	}
	wg.Wait()
}

func (e *cliEnv) probePath(ctx context.Context, cf *clientFlags, name string) *listPath {
	ctx, cancel := giveUpAfter(ctx, cf.timeout)
	defer cancel()
	// Warnings about each workspace's network are in the NETWORK column
	// already: not said again.
	quiet := &cliEnv{Stdin: e.Stdin, Stdout: e.Stdout, Stderr: io.Discard, Getenv: e.Getenv,
		logFormat: e.logFormat, logLevel: e.logLevel, logLevelExplicit: e.logLevelExplicit, verbose: e.verbose}
	ws, err := quiet.connectWorkspace(ctx, cf, name)
	if err != nil {
		return &listPath{Error: err.Error()}
	}
	defer ws.Close()
	if err := ws.AwaitReachable(ctx); err != nil {
		return &listPath{Error: err.Error()}
	}
	res, err := ws.Ping(ctx)
	if err != nil {
		return &listPath{Error: err.Error()}
	}
	p := &listPath{LatencyMS: ms(res.Latency)}
	if res.Direct() {
		p.Kind, p.Endpoint = "direct", res.Endpoint.String()
	} else {
		p.Kind, p.DERPRegion = "derp", res.DERPRegionCode
	}
	return p
}

func pathText(p *listPath) string {
	switch {
	case p == nil:
		return "-"
	case p.Error != "":
		return "unreachable"
	case p.Kind == "direct":
		return fmt.Sprintf("direct %s, %.1fms", p.Endpoint, p.LatencyMS)
	}
	return fmt.Sprintf("DERP(%s), %.1fms", p.DERPRegion, p.LatencyMS)
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

func writeWorkspaceTable(out io.Writer, ws []listEntry, paths bool, now time.Time) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	if paths {
		fmt.Fprintln(tw, "NAME\tOWNER\tSTATE\tPATH\tNETWORK")
	} else {
		fmt.Fprintln(tw, "NAME\tOWNER\tSTATE\tNETWORK")
	}
	for _, w := range ws {
		if paths {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", w.Name, w.Owner, stateText(w.WorkspaceInfo, now), pathText(w.Path), networkText(w.Network))
		} else {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", w.Name, w.Owner, stateText(w.WorkspaceInfo, now), networkText(w.Network))
		}
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

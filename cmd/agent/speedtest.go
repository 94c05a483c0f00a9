package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/speedtest"
)

// speedtestOptions is `agent speedtest` as parsed from its command line.
type speedtestOptions struct {
	cf        clientFlags
	workspace string
	duration  time.Duration
	json      bool
}

// speedtestReport is what `agent speedtest --json` prints (docs/cli.md).
type speedtestReport struct {
	Workspace string `json:"workspace"`
	// Path is "direct" or "derp" as the last ping before the test saw it,
	// Endpoint or DERPRegion says where.
	Path       string          `json:"path"`
	Endpoint   string          `json:"endpoint,omitempty"`
	DERPRegion string          `json:"derp_region,omitempty"`
	Download   speedtestResult `json:"download"`
	Upload     speedtestResult `json:"upload"`
}

type speedtestResult struct {
	Bytes      int64   `json:"bytes"`
	Seconds    float64 `json:"seconds"`
	BitsPerSec float64 `json:"bits_per_second"`
}

func newSpeedtestCmd(env *cliEnv) *cobra.Command {
	o := &speedtestOptions{}
	cmd := &cobra.Command{
		Use:   "speedtest WORKSPACE",
		Short: "Measure throughput to and from a workspace over the tailnet",
		Long: `Send data to the workspace's agent and back for --duration each way, over the
tailnet path a connection would take (direct UDP or the DERP relay, shown
first), and print the throughput of each direction. The agent's side is a
service on its tailnet port 3, reachable only over the tailnet.`,
		Example: `  agent speedtest ws1
  agent speedtest ws1 --duration 10s --json`,
		Args: usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.workspace = args[0]
			return runSpeedtest(cmd.Context(), env, o, cmd.OutOrStdout())
		},
	}
	o.cf.register(cmd, env)
	cmd.ValidArgsFunction = env.completeWorkspaceArg(&o.cf)
	o.cf.registerTimeout(cmd)
	cmd.Flags().DurationVarP(&o.duration, "duration", "d", 5*time.Second, fmt.Sprintf("how long each direction runs (at most %s)", speedtest.MaxDuration))
	cmd.Flags().BoolVar(&o.json, "json", false, "print the result as JSON")
	return cmd
}

func runSpeedtest(ctx context.Context, env *cliEnv, o *speedtestOptions, out io.Writer) error {
	if o.duration <= 0 || o.duration > speedtest.MaxDuration {
		return usageErrorf("--duration %s: want more than 0 and at most %s", o.duration, speedtest.MaxDuration)
	}
	cctx, cancel := giveUpAfter(ctx, o.cf.timeout)
	defer cancel()
	ws, err := env.connectWorkspace(cctx, &o.cf, o.workspace)
	if err != nil {
		return err
	}
	defer ws.Close()
	if err := ws.AwaitReachable(cctx); err != nil {
		return err
	}
	rep := speedtestReport{Workspace: ws.Name()}
	pctx, pcancel := context.WithTimeout(cctx, 5*time.Second)
	pong, err := ws.Ping(pctx)
	pcancel()
	switch {
	case err != nil:
		rep.Path = "unknown"
	case pong.Direct():
		rep.Path, rep.Endpoint = "direct", pong.Endpoint.String()
	default:
		rep.Path, rep.DERPRegion = "derp", pong.DERPRegionCode
	}
	if !o.json {
		switch rep.Path {
		case "direct":
			fmt.Fprintf(out, "path: direct, %s\n", rep.Endpoint)
		case "derp":
			fmt.Fprintf(out, "path: relayed through DERP(%s)\n", rep.DERPRegion)
		}
	}
	for _, dir := range []speedtest.Direction{speedtest.Download, speedtest.Upload} {
		c, err := ws.DialTCP(cctx, protocol.PortSpeedtest)
		if err != nil {
			return fmt.Errorf("the speed test service of workspace %q (an older agent has none): %w", ws.Name(), err)
		}
		res, err := speedtest.Run(ctx, c, dir, o.duration)
		if err != nil {
			return fmt.Errorf("%s test with workspace %q: %w", dir, ws.Name(), err)
		}
		r := speedtestResult{Bytes: res.Bytes, Seconds: res.Duration.Seconds(), BitsPerSec: res.BitsPerSecond()}
		label := "download (workspace to here)"
		if dir == speedtest.Upload {
			rep.Upload = r
			label = "upload   (here to workspace)"
		} else {
			rep.Download = r
		}
		if !o.json {
			fmt.Fprintf(out, "%s: %7.1f Mbit/s  (%.1f MiB in %.1fs)\n", label, r.BitsPerSec/1e6, float64(r.Bytes)/(1<<20), r.Seconds)
		}
	}
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return nil
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
)

// pingOptions is `agent ping` as parsed from its command line.
type pingOptions struct {
	cf          clientFlags
	workspace   string
	count       int
	interval    time.Duration
	pongTimeout time.Duration
	untilDirect bool
	json        bool
}

// pingReport is what `agent ping --json` prints: one JSON document when the
// pings are done (documented in docs/cli.md; keep fields stable).
type pingReport struct {
	Workspace string `json:"workspace"`
	Address   string `json:"address"`
	// ConnectMS is how long the tunnel took to come up.
	ConnectMS float64    `json:"connect_ms"`
	Pongs     []pingPong `json:"pongs"`
	Sent      int        `json:"sent"`
	Received  int        `json:"received"`
	// FirstPongMS and FirstDirectMS count from the start of the command;
	// absent when there was none.
	FirstPongMS   *float64 `json:"first_pong_ms,omitempty"`
	FirstDirectMS *float64 `json:"first_direct_ms,omitempty"`
	// WhyNotDirect, with --until-direct and no direct pong, explains from
	// each side's evidence why the path stayed relayed.
	WhyNotDirect []string `json:"why_not_direct,omitempty"`
}

// pingPong is one ping: its path and latency, or why no pong came.
type pingPong struct {
	Seq int `json:"seq"`
	// Path is "direct" or "derp"; absent when the ping was lost.
	Path       string  `json:"path,omitempty"`
	Endpoint   string  `json:"endpoint,omitempty"`
	DERPRegion string  `json:"derp_region,omitempty"`
	LatencyMS  float64 `json:"latency_ms,omitempty"`
	Error      string  `json:"error,omitempty"`
}

func newPingCmd(env *cliEnv) *cobra.Command {
	o := &pingOptions{}
	cmd := &cobra.Command{
		Use:   "ping WORKSPACE",
		Short: "Ping a workspace over the tailnet and show each pong's path and latency",
		Long: `Send disco pings to a workspace's agent and print, for each pong, whether it
came over a direct UDP path (and from which address) or through a DERP relay
(and which region), with its latency. The last line says how long the first
pong (and the first direct one) took.

--timeout bounds the wait for the coordinator and the workspace; each ping
then waits --pong-timeout for its pong. With --json, one JSON document is
printed at the end (see docs/cli.md).`,
		Example: `  agent ping ws1
  agent ping ws1 -c 0                   # until interrupted
  agent ping ws1 --until-direct -c 40 -i 250ms
  agent ping ws1 -c 3 --json | jq '.pongs[].latency_ms'`,
		Args: usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.workspace = args[0]
			return runPing(cmd.Context(), env, o, cmd.OutOrStdout())
		},
	}
	o.cf.register(cmd, env)
	cmd.ValidArgsFunction = env.completeWorkspaceArg(&o.cf)
	o.cf.registerTimeout(cmd)
	f := cmd.Flags()
	f.IntVarP(&o.count, "count", "c", 10, "number of pings; 0 pings until interrupted")
	f.DurationVarP(&o.interval, "interval", "i", time.Second, "time between pings")
	f.DurationVarP(&o.pongTimeout, "pong-timeout", "W", 5*time.Second, "how long to wait for each pong")
	f.BoolVar(&o.untilDirect, "until-direct", false, "stop at the first direct pong; exit 1 if none came")
	f.BoolVar(&o.json, "json", false, "print one JSON document with every pong at the end")
	return cmd
}

func (o *pingOptions) validate() error {
	switch {
	case o.count < 0:
		return usageErrorf("--count %d: want 0 (until interrupted) or more", o.count)
	case o.interval <= 0:
		return usageErrorf("--interval %s: want a positive duration such as 1s", o.interval)
	case o.pongTimeout <= 0:
		return usageErrorf("--pong-timeout %s: want a positive duration such as 5s", o.pongTimeout)
	case o.json && o.count == 0:
		return usageErrorf("--json prints at the end: give --count, e.g. -c 5")
	}
	return nil
}

func runPing(ctx context.Context, env *cliEnv, o *pingOptions, out io.Writer) error {
	if err := o.validate(); err != nil {
		return err
	}
	start := time.Now()
	cctx, cancel := giveUpAfter(ctx, o.cf.timeout)
	ws, err := env.connectWorkspace(cctx, &o.cf, o.workspace)
	cancel()
	if err != nil {
		return err
	}
	defer ws.Close()
	rep := pingReport{Workspace: ws.Name(), Address: ws.Addr().String(), ConnectMS: ms(time.Since(start)), Pongs: []pingPong{}}
	text := out
	if o.json {
		text = io.Discard
	}
	var firstPong, firstDirect time.Duration
	for i := 0; o.count <= 0 || i < o.count; i++ {
		if i > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(o.interval):
			}
		}
		if ctx.Err() != nil {
			break
		}
		pctx, cancel := context.WithTimeout(ctx, o.pongTimeout)
		res, err := ws.Ping(pctx)
		cancel()
		if ctx.Err() != nil {
			break
		}
		rep.Sent++
		p := pingPong{Seq: i + 1}
		if err != nil {
			p.Error = err.Error()
			rep.Pongs = append(rep.Pongs, p)
			fmt.Fprintf(text, "no pong from %s within %v: %v\n", ws.Name(), o.pongTimeout, err)
			continue
		}
		rep.Received++
		if firstPong == 0 {
			firstPong = time.Since(start)
		}
		p.LatencyMS = ms(res.Latency)
		if res.Direct() {
			if firstDirect == 0 {
				firstDirect = time.Since(start)
			}
			p.Path, p.Endpoint = "direct", res.Endpoint.String()
			fmt.Fprintf(text, "pong from %s (%s) via %s in %v\n", ws.Name(), ws.Addr(), res.Endpoint, res.Latency.Round(time.Microsecond))
		} else {
			p.Path, p.DERPRegion = "derp", res.DERPRegionCode
			fmt.Fprintf(text, "pong from %s (%s) via DERP(%s) in %v\n", ws.Name(), ws.Addr(), res.DERPRegionCode, res.Latency.Round(time.Microsecond))
		}
		rep.Pongs = append(rep.Pongs, p)
		if o.untilDirect && res.Direct() {
			break
		}
	}
	if firstPong > 0 {
		v := ms(firstPong)
		rep.FirstPongMS = &v
		fmt.Fprintf(text, "first pong after %v", firstPong.Round(time.Millisecond))
		if firstDirect > 0 {
			v := ms(firstDirect)
			rep.FirstDirectMS = &v
			fmt.Fprintf(text, ", first direct pong after %v", firstDirect.Round(time.Millisecond))
		}
		fmt.Fprintln(text)
	}
	if o.untilDirect && firstDirect == 0 {
		rep.WhyNotDirect = ws.WhyNotDirect(ctx)
	}
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	}
	if o.untilDirect && firstDirect == 0 {
		fmt.Fprintf(text, "no direct path to %s: traffic is relayed through DERP. Why:\n", ws.Name())
		for _, line := range rep.WhyNotDirect {
			fmt.Fprintf(text, "  %s\n", line)
		}
		return &exitError{code: 1}
	}
	if rep.Sent > 0 && rep.Received == 0 {
		return &exitError{code: 1}
	}
	return nil
}

// ms is a duration in milliseconds, to the microsecond.
func ms(d time.Duration) float64 {
	return float64(d.Round(time.Microsecond)) / float64(time.Millisecond)
}

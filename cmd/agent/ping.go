package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"
)

func newPingCmd(env *cliEnv) *cobra.Command {
	var (
		cf          clientFlags
		count       int
		interval    time.Duration
		timeout     time.Duration
		untilDirect bool
	)
	cmd := &cobra.Command{
		Use:   "ping WORKSPACE",
		Short: "Ping a workspace over the tailnet and show each pong's path and latency",
		Long: `Send disco pings to a workspace's agent and print, for each pong, whether it
came over a direct UDP path (and from which address) or through a DERP relay
(and which region), with its latency. The first line says how long the tunnel
took to come up.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			start := time.Now()
			ws, err := env.connectWorkspace(ctx, &cf, args[0])
			if err != nil {
				return err
			}
			defer ws.Close()
			out := cmd.OutOrStdout()
			var firstPong, firstDirect time.Duration
			lost := 0
			for i := 0; count <= 0 || i < count; i++ {
				if i > 0 {
					select {
					case <-ctx.Done():
						return nil
					case <-time.After(interval):
					}
				}
				pctx, cancel := context.WithTimeout(ctx, timeout)
				res, err := ws.Ping(pctx)
				cancel()
				if ctx.Err() != nil {
					return nil
				}
				if err != nil {
					lost++
					fmt.Fprintf(out, "no pong from %s within %v: %v\n", ws.Name(), timeout, err)
					continue
				}
				if firstPong == 0 {
					firstPong = time.Since(start)
				}
				if res.Direct() {
					if firstDirect == 0 {
						firstDirect = time.Since(start)
					}
					fmt.Fprintf(out, "pong from %s (%s) via %s in %v\n", ws.Name(), ws.Addr(), res.Endpoint, res.Latency.Round(time.Microsecond))
				} else {
					fmt.Fprintf(out, "pong from %s (%s) via DERP(%s) in %v\n", ws.Name(), ws.Addr(), res.DERPRegionCode, res.Latency.Round(time.Microsecond))
				}
				if untilDirect && res.Direct() {
					break
				}
			}
			if firstPong > 0 {
				fmt.Fprintf(out, "first pong after %v", firstPong.Round(time.Millisecond))
				if firstDirect > 0 {
					fmt.Fprintf(out, ", first direct pong after %v", firstDirect.Round(time.Millisecond))
				}
				fmt.Fprintln(out)
			}
			if untilDirect && firstDirect == 0 {
				fmt.Fprintf(out, "no direct path to %s: traffic is relayed through DERP. Why:\n", ws.Name())
				for _, line := range ws.WhyNotDirect(ctx) {
					fmt.Fprintf(out, "  %s\n", line)
				}
				return &exitError{code: 1}
			}
			if lost > 0 && firstPong == 0 {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	cf.register(cmd, env)
	f := cmd.Flags()
	f.IntVarP(&count, "count", "c", 10, "number of pings; 0 pings until interrupted")
	f.DurationVarP(&interval, "interval", "i", time.Second, "time between pings")
	f.DurationVarP(&timeout, "timeout", "t", 5*time.Second, "how long to wait for each pong")
	f.BoolVar(&untilDirect, "until-direct", false, "stop at the first direct pong; exit 1 if none came")
	return cmd
}

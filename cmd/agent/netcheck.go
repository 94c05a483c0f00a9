package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/agentd/agent/agent/netcheck"
	"github.com/agentd/agent/agent/netcheck/node"
	"github.com/agentd/agent/metrics"
	"github.com/spf13/cobra"
)

// netcheckOptions is `agent netcheck` as parsed from its command line.
type netcheckOptions struct {
	opts         netcheck.Options
	nodeOpts     node.Options
	host         bool
	jsonOut      bool
	watch        bool
	interval     time.Duration
	fix          bool
	dryRun       bool
	guardPattern []string
	metricsAddr  string
}

func newNetcheckCmd(env *cliEnv) *cobra.Command {
	return newNetcheckCmdWith(env, runNetcheck)
}

// newNetcheckCmdWith builds the command around runF, so tests can check
// what the command line and the environment parse to without probing.
func newNetcheckCmdWith(env *cliEnv, runF func(context.Context, *cliEnv, *netcheckOptions) error) *cobra.Command {
	o := &netcheckOptions{}
	cmd := &cobra.Command{
		Use:   "netcheck",
		Short: "Diagnose this workspace's network (or a node's, with --host): what is broken, where, and the fix",
		Long: `netcheck checks the network from the inside with active probes: interface and
carrier, addresses, default route, a round trip to the gateway, path MTU with
don't-fragment probes, DNS, the proxy, HTTPS to the coordinator (certificate
and clock), the DERP relay and UDP/STUN.

With --host it checks the node instead: container bridges, veth attachment,
systemd-networkd and udev configuration and state; --fix writes the
configuration that keeps networkd and udev off container interfaces.

Exit status: 0 healthy, 1 degraded, 2 broken. See docs/netcheck.md.`,
		// Wrong options exit 1, not 2: 2 is the verdict "broken".
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (o.fix || o.dryRun) && !o.host {
				return fmt.Errorf("--fix and --dry-run change the node's networkd configuration: add --host")
			}
			if o.fix && o.watch {
				return fmt.Errorf("--fix and --watch do not combine: fix first, then watch")
			}
			if o.metricsAddr != "" && !o.watch {
				return fmt.Errorf("--metrics-addr serves the watch loop's results: add --watch")
			}
			return runF(cmd.Context(), env, o)
		},
	}
	// Not the root's usage error: exit status 2 is the verdict "broken".
	cmd.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return fmt.Errorf("%w; see %q", err, cmd.CommandPath()+" --help")
	})
	f := cmd.Flags()
	// In a workspace the agent's own AGENT_URL and AGENT_FINGERPRINT are
	// already set, so a person debugging there needs no flags at all.
	f.StringVar(&o.opts.CoordinatorURL, "coordinator-url", envOr(env, "AGENT_COORDINATOR_URL", env.Getenv("AGENT_URL")), "coordinator base URL, https://HOST[:PORT] (env AGENT_COORDINATOR_URL; else AGENT_URL)")
	f.StringVar(&o.opts.Fingerprint, "fingerprint", envOr(env, "AGENT_COORDINATOR_FINGERPRINT", env.Getenv("AGENT_FINGERPRINT")), "pin the coordinator's certificate: hex SHA-256 of its DER form (env AGENT_COORDINATOR_FINGERPRINT; else AGENT_FINGERPRINT)")
	f.IntVar(&o.opts.STUNPort, "stun-port", 3478, "the coordinator's STUN (UDP) port")
	f.StringVar(&o.opts.Interface, "interface", "", "interface to check (default: the default route's)")
	f.DurationVar(&o.opts.Timeout, "timeout", 1800*time.Millisecond, "time limit for the active probes of one run")
	f.BoolVar(&o.jsonOut, "json", false, "print the report as JSON (schema in docs/netcheck.md)")
	f.BoolVar(&o.watch, "watch", false, "keep checking; print a report whenever the status changes (with --json: one JSON document per line)")
	f.StringVar(&o.metricsAddr, "metrics-addr", "", "with --watch: serve Prometheus metrics of the results on ADDR (e.g. :9153) at /metrics")
	f.DurationVar(&o.interval, "interval", time.Second, "with --watch: how often to probe")
	f.BoolVar(&o.host, "host", false, "check the node (bridges, veths, systemd-networkd, udev) instead of the workspace")
	f.StringVar(&o.nodeOpts.Root, "root", "/", "with --host: where the node's file tree is (a DaemonSet mounts it at /host)")
	f.StringSliceVar(&o.nodeOpts.Bridges, "bridge", nil, "with --host: a bridge that must exist, be up and addressed (repeatable; CNI and Docker bridges are found automatically)")
	f.BoolVar(&o.fix, "fix", false, "with --host: write networkd/udev configuration that keeps them off container interfaces")
	f.BoolVar(&o.dryRun, "dry-run", false, "with --host: show what --fix would write, change nothing")
	f.StringSliceVar(&o.guardPattern, "pattern", nil, "with --fix: extra interface-name glob to mark unmanaged (refused if it matches the uplink)")
	return cmd
}

// runNetcheck checks the workspace (or, with --host, the node) once or,
// with --watch, until ctx ends; the exit status is the verdict.
func runNetcheck(ctx context.Context, env *cliEnv, o *netcheckOptions) error {
	o.opts.Logger = env.Logger()
	o.opts.Getenv = env.Getenv
	o.nodeOpts.Logger = env.Logger()
	if err := o.opts.Validate(); err != nil {
		return err
	}
	if o.fix || o.dryRun {
		return runGuard(ctx, env, o.nodeOpts, o.guardPattern, o.dryRun, o.jsonOut)
	}
	run := func(ctx context.Context) *netcheck.Report { return netcheck.Run(ctx, o.opts) }
	watchFn := func(ctx context.Context, w netcheck.WatchOptions, fn func(*netcheck.Report)) error {
		return netcheck.Watch(ctx, o.opts, w, fn)
	}
	if o.host {
		run = func(ctx context.Context) *netcheck.Report { return node.Run(ctx, o.nodeOpts) }
		watchFn = func(ctx context.Context, w netcheck.WatchOptions, fn func(*netcheck.Report)) error {
			return node.Watch(ctx, o.nodeOpts, w, fn)
		}
	}
	if o.watch {
		var exp *netcheck.Exporter
		if o.metricsAddr != "" {
			exp = netcheck.NewExporter(nil)
			stop, err := serveNetcheckMetrics(env, o.metricsAddr, exp)
			if err != nil {
				return err
			}
			defer stop()
		}
		// One document (or text report) per change: the periodic
		// full report that says the same again is left out.
		lastKey := ""
		err := watchFn(ctx, netcheck.WatchOptions{Interval: o.interval}, func(r *netcheck.Report) {
			if exp != nil {
				exp.Observe(r)
			}
			k := r.ChangeKey()
			if k == lastKey {
				return
			}
			lastKey = k
			if o.jsonOut {
				_ = r.WriteJSONLine(env.Stdout)
				return
			}
			fmt.Fprintf(env.Stdout, "%s ", time.Now().Format(time.RFC3339))
			_ = r.WriteText(env.Stdout)
			fmt.Fprintln(env.Stdout)
		})
		if err != nil && ctx.Err() == nil {
			return err
		}
		return nil
	}
	r := run(ctx)
	if o.jsonOut {
		if err := r.WriteJSON(env.Stdout); err != nil {
			return err
		}
	} else if err := r.WriteText(env.Stdout); err != nil {
		return err
	}
	return verdictExit(r)
}

// runGuard plans the networkd guard, shows it, and writes it unless this is
// a dry run; afterwards it checks the node again.
func runGuard(ctx context.Context, env *cliEnv, opts node.Options, patterns []string, dryRun, jsonOut bool) error {
	plan, err := node.PlanGuard(opts, node.GuardOptions{Patterns: patterns})
	if err != nil {
		return err
	}
	if dryRun {
		if jsonOut {
			return writeJSON(env, plan)
		}
		if err := plan.WriteText(env.Stdout); err != nil {
			return err
		}
		if plan.Changed() {
			fmt.Fprintln(env.Stdout, "\ndry run: nothing written; run again with --fix (without --dry-run) to apply")
		} else {
			fmt.Fprintln(env.Stdout, "\nthe guard is already in place")
		}
		return nil
	}
	changed := plan.Changed()
	if err := plan.Apply(); err != nil {
		return err
	}
	r := node.Run(ctx, opts)
	if jsonOut {
		if err := writeJSON(env, struct {
			Plan   *node.GuardPlan  `json:"plan"`
			Report *netcheck.Report `json:"report"`
		}{plan, r}); err != nil {
			return err
		}
		return verdictExit(r)
	}
	if err := plan.WriteText(env.Stdout); err != nil {
		return err
	}
	if changed {
		fmt.Fprintln(env.Stdout, "\nwritten. Make the running services read it:\n  networkctl reload\n  udevadm control --reload")
	} else {
		fmt.Fprintln(env.Stdout, "\nthe guard was already in place; nothing written")
	}
	fmt.Fprintln(env.Stdout)
	if err := r.WriteText(env.Stdout); err != nil {
		return err
	}
	return verdictExit(r)
}

// verdictExit is the exit status for a report: after --fix, the verdict on
// the node as it is now, so a fix that did not heal it does not exit 0.
func verdictExit(r *netcheck.Report) error {
	if code := r.ExitCode(); code != 0 {
		return &exitError{code: code}
	}
	return nil
}

func writeJSON(env *cliEnv, v any) error {
	enc := json.NewEncoder(env.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// serveNetcheckMetrics serves exp (and the process metrics) at
// http://addr/metrics until stop is called.
func serveNetcheckMetrics(env *cliEnv, addr string, exp *netcheck.Exporter) (stop func(), err error) {
	reg := metrics.NewRegistry()
	if err := reg.Register(exp); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", reg.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	env.Logger().Info("serving netcheck metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}, nil
}

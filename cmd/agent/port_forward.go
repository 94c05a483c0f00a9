package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/client"
	"github.com/agentd/agent/client/forwardclient"
)

// portForwardOptions is `agent port-forward` as parsed from its command
// line.
type portForwardOptions struct {
	cf        clientFlags
	workspace string
	specs     []string // positional TCP mappings
	tcp, udp  []string
	binds     []string
	udpIdle   time.Duration
}

func newPortForwardCmd(env *cliEnv) *cobra.Command {
	o := &portForwardOptions{}
	cmd := &cobra.Command{
		Use:   "port-forward WORKSPACE MAPPING... [--udp MAPPING]...",
		Short: "Listen on local ports and carry connections to ports in a workspace",
		Long: `Listen on local ports and carry each connection (or UDP flow) over the
tailnet to the same or another port on the workspace's localhost, so a
development server bound to 127.0.0.1 in the workspace is reachable here.

A MAPPING is one of:
  5432                    local 5432 to workspace 5432
  8080:3000               local 8080 to workspace 3000
  8000-8010               a range, same ports on both sides
  18000-18010:8000-8010   a range onto another range of the same length
  127.0.0.1:9000:9000     listen on this address only
  [::1]:9000:9000         an IPv6 address, in brackets
  0:3000                  any free local port (printed when listening)

Positional mappings and --tcp are TCP; --udp mappings are UDP. Local ports
listen on 127.0.0.1, and on ::1 too when this machine has IPv6 loopback,
unless --bind or the mapping names an address. Workspace ports 1-9 belong
to the agent and cannot be forwarded.

It runs until interrupted. While the coordinator or the workspace is out of
reach it says so once and keeps trying; connections already carried keep
working.`,
		Example: `  agent port-forward ws1 8080:3000 5432 8000-8010 127.0.0.1:9000:9000 --udp 5353:53`,
		Args:    usageArgs(cobra.MinimumNArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.workspace, o.specs = args[0], args[1:]
			return runPortForward(cmd.Context(), env, o, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	o.cf.register(cmd, env)
	cmd.ValidArgsFunction = env.completeWorkspaceArg(&o.cf)
	fs := cmd.Flags()
	fs.StringArrayVar(&o.tcp, "tcp", nil, "a TCP mapping, like the positional ones (repeatable)")
	fs.StringArrayVar(&o.udp, "udp", nil, "a UDP mapping, e.g. 5353:53 (repeatable)")
	fs.StringSliceVar(&o.binds, "bind", nil, "local address to listen on (repeatable; default 127.0.0.1 and ::1 when available)")
	fs.DurationVar(&o.udpIdle, "udp-idle", 60*time.Second, "end a UDP flow after this long without a datagram")
	return cmd
}

// parse turns the mappings and --bind into what forwardclient takes; what
// cannot work is a usage error.
func (o *portForwardOptions) parse() ([]forwardclient.Mapping, []netip.Addr, error) {
	tcpSpecs := append(append([]string{}, o.specs...), o.tcp...)
	mappings, err := forwardclient.ParseMappings("tcp", tcpSpecs)
	if err != nil {
		return nil, nil, &usageError{err: err}
	}
	udpMappings, err := forwardclient.ParseMappings("udp", o.udp)
	if err != nil {
		return nil, nil, &usageError{err: err}
	}
	mappings = append(mappings, udpMappings...)
	if len(mappings) == 0 {
		return nil, nil, usageErrorf("no ports given: name at least one mapping, for example `agent port-forward %s 8080:3000`", o.workspace)
	}
	if o.udpIdle <= 0 {
		return nil, nil, usageErrorf("--udp-idle %s: want a positive duration such as 60s", o.udpIdle)
	}
	bindAddrs, err := parseBinds(o.binds)
	if err != nil {
		return nil, nil, &usageError{err: err}
	}
	return mappings, bindAddrs, nil
}

func runPortForward(ctx context.Context, env *cliEnv, o *portForwardOptions, out, stderr io.Writer) error {
	mappings, bindAddrs, err := o.parse()
	if err != nil {
		return err
	}
	// Bind first, so a busy local port is reported before the (slower)
	// tunnel is set up.
	dialer := &workspaceDialer{}
	fwd, err := forwardclient.Listen(forwardclient.Options{
		Dialer:         dialer,
		Logger:         env.ClientLogger().With("component", "port-forward"),
		Bind:           bindAddrs,
		UDPIdleTimeout: o.udpIdle,
		Notify:         func(msg string) { fmt.Fprintln(stderr, msg) },
	}, mappings)
	if err != nil {
		return err
	}
	defer fwd.Close()

	ws, err := env.connectWorkspace(ctx, &o.cf, o.workspace, connectOptions{keepRetrying: true})
	if err != nil {
		return err
	}
	defer ws.Close()
	dialer.ws = ws

	for _, a := range fwd.Active() {
		fmt.Fprintf(out, "Forwarding %s\n", a)
	}
	return untilAccessEnds(ctx, ws, func(ctx context.Context) error {
		if err := fwd.Serve(ctx); err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
		return nil
	})
}

func parseBinds(binds []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, b := range binds {
		b = strings.Trim(strings.TrimSpace(b), "[]")
		if b == "localhost" {
			out = append(out, netip.MustParseAddr("127.0.0.1"))
			continue
		}
		a, err := netip.ParseAddr(b)
		if err != nil {
			return nil, fmt.Errorf("--bind %q is not an IP address: use for example 127.0.0.1, ::1 or 0.0.0.0", b)
		}
		out = append(out, a)
	}
	return out, nil
}

// workspaceDialer reaches the workspace once the tunnel is up; listeners are
// bound before that, but nothing is accepted until Serve runs.
type workspaceDialer struct{ ws *client.Workspace }

func (d *workspaceDialer) DialTCP(ctx context.Context, port uint16) (net.Conn, error) {
	return d.ws.DialTCP(ctx, port)
}

func (d *workspaceDialer) DialUDP(ctx context.Context, port uint16) (net.Conn, error) {
	return d.ws.DialUDP(ctx, port)
}

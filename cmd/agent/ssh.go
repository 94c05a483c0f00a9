package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/agentd/agent/client"
	"github.com/agentd/agent/client/sshclient"
	"github.com/agentd/agent/protocol"
)

// sshOptions is `agent ssh` as parsed from its command line.
type sshOptions struct {
	cf           clientFlags
	workspace    string
	command      []string
	stdio        bool
	knownHosts   bool
	forwardAgent bool
	noEscapes    bool
	session      string
}

func newSSHCmd(env *cliEnv) *cobra.Command {
	o := &sshOptions{}
	cmd := &cobra.Command{
		Use:   "ssh WORKSPACE [-- COMMAND...]",
		Short: "Open a shell or run a command in a workspace, or carry OpenSSH's traffic (--stdio)",
		Long: `Open an interactive shell in a workspace, or run a command there and exit with
its exit status. Authorization comes from the tailnet: no password or key.

With --stdio, copy raw SSH traffic between standard input/output and the
workspace's SSH server, for OpenSSH's ProxyCommand (` + "`agent config-ssh`" + ` writes
that into ~/.ssh/config for you). It exits when OpenSSH closes its standard
input or exits, and prints nothing but one line when it fails.

An interactive shell (a terminal, no command, no -A) is a reconnecting
session: it keeps running in the workspace when the connection is lost
(network outage, laptop asleep). The client says so in one line, keeps
reconnecting, and on its return shows what was printed meanwhile (up to
1 MiB) and has the screen redrawn. Each session has a name (--session, or
one made up and shown when the connection is lost); --session NAME
attaches to that session from any terminal, or starts it. A session with
no client attached ends after the agent's --session-idle-timeout (1h).

In a terminal session, ~. at the start of a line ends the connection (the
way out when the network is gone; a reconnecting session keeps running)
and ~? lists the escapes, as in ssh.

(` + "`agent config-ssh`" + ` writes that into ~/.ssh/config for you).

Without --stdio, the workspace's SSH host key must be the one the
coordinator vouches for (pinned when the workspace's agent first
registered). With --known-hosts, print that key as a known_hosts line for
OpenSSH's KnownHostsCommand, so OpenSSH checks it too:

  KnownHostsCommand agent ssh --known-hosts %H

--timeout bounds the wait for the coordinator and the workspace; then the
connection to the workspace's SSH server and the SSH handshake go on while
the workspace keeps sending, and end once it has been silent for
--timeout. A session that is up runs as long as it likes.`,
		Example: `  agent ssh ws1
  agent ssh ws1 -- uname -a
  agent ssh ws1 --session build         # attach to (or start) the session "build"
  agent ssh -A ws1                      # forward the local ssh-agent
  ssh -o ProxyCommand='agent ssh --stdio %n' ws1.agent
  agent ssh --known-hosts ws1.agent     # the vouched host key, for KnownHostsCommand`,
		Args: usageArgs(cobra.MinimumNArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.workspace, o.command = args[0], args[1:]
			if o.knownHosts {
				return printKnownHost(cmd.Context(), env, &o.cf, args)
			}
			return runSSH(cmd.Context(), env, o)
		},
	}
	o.cf.register(cmd, env)
	cmd.ValidArgsFunction = env.completeWorkspaceArg(&o.cf)
	o.cf.registerTimeout(cmd)
	cmd.Flags().BoolVar(&o.stdio, "stdio", false, "carry raw SSH traffic on stdin/stdout (for OpenSSH's ProxyCommand)")
	cmd.Flags().BoolVar(&o.knownHosts, "known-hosts", false, "print the workspace's vouched SSH host key as a known_hosts line (for OpenSSH's KnownHostsCommand)")
	cmd.Flags().BoolVarP(&o.forwardAgent, "forward-agent", "A", false, "forward the local SSH agent (SSH_AUTH_SOCK) into the session")
	cmd.Flags().StringVar(&o.session, "session", "", "attach to the reconnecting terminal session NAME in the workspace, starting it if there is none")
	cmd.Flags().BoolVar(&o.noEscapes, "no-escapes", false, "in a terminal session, pass ~. and ~? to the workspace instead of reading them as escapes")
	return cmd
}

// printKnownHost prints the known_hosts line for the host name OpenSSH
// looks up (args[0], as KnownHostsCommand's %H gives it): that name and the
// key the coordinator vouches for. A workspace with no vouched key prints
// nothing, so OpenSSH with StrictHostKeyChecking refuses it.
func printKnownHost(ctx context.Context, env *cliEnv, cf *clientFlags, args []string) error {
	if len(args) != 1 {
		return usageErrorf("--known-hosts takes one host name (OpenSSH's %%H), got %d arguments", len(args))
	}
	ctx, cancel := giveUpAfter(ctx, cf.timeout)
	defer cancel()
	key, err := env.vouchedHostKey(ctx, cf, args[0])
	if err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "%s %s\n", args[0], key)
	return nil
}

func (o *sshOptions) validate() error {
	if o.stdio && len(o.command) > 0 {
		return usageErrorf("--stdio carries an SSH connection and takes no command (got %q)", strings.Join(o.command, " "))
	}
	if o.stdio && o.forwardAgent {
		return usageErrorf("--stdio carries OpenSSH's own connection: ask ssh for agent forwarding (ssh -A), not agent ssh --stdio")
	}
	if o.session != "" {
		if err := protocol.ValidSessionName(o.session); err != nil {
			return usageErrorf("--session: %v", err)
		}
		switch {
		case o.stdio:
			return usageErrorf("--session attaches a terminal; --stdio carries OpenSSH's connection: use one of them")
		case len(o.command) > 0:
			return usageErrorf("--session attaches to a shell session and takes no command (got %q)", strings.Join(o.command, " "))
		case o.forwardAgent:
			return usageErrorf("--session keeps the shell across connections, and a forwarded ssh-agent belongs to one connection: drop -A or --session")
		}
	}
	return nil
}

func runSSH(ctx context.Context, env *cliEnv, o *sshOptions) error {
	if err := o.validate(); err != nil {
		return err
	}
	if o.stdio {
		return runSSHStdio(ctx, env, o)
	}
	cctx, cancel := giveUpAfter(ctx, o.cf.timeout)
	defer cancel()
	ws, err := env.connectWorkspace(cctx, &o.cf, o.workspace)
	if err != nil {
		return err
	}
	defer ws.Close()
	// With --stdio OpenSSH checks the key itself (config-ssh's
	// KnownHostsCommand); here we do. Asked once the workspace is online,
	// so a freshly started agent has proved its key.
	vouched, err := env.vouchedHostKey(cctx, &o.cf, o.workspace)
	if err != nil {
		return err
	}
	var code int
	isTerminal := term.IsTerminal(int(os.Stdin.Fd()))
	if o.session != "" && !isTerminal {
		return errors.New("--session needs a terminal on standard input (it attaches an interactive shell)")
	}
	if len(o.command) == 0 && !o.forwardAgent && isTerminal {
		name := o.session
		if name == "" {
			name = newSessionName()
		}
		err = untilAccessEnds(ctx, ws, func(ctx context.Context) error {
			env.rawTerminal.Store(true)
			defer env.rawTerminal.Store(false)
			code, err = sshclient.RunSession(ctx, sshclient.SessionOptions{
				InteractiveOptions: sshclient.InteractiveOptions{Stderr: env.Stderr, NoEscapes: o.noEscapes},
				Name:               name,
				Workspace:          ws.Name(),
				Dial: func(dctx context.Context, first bool) (net.Conn, error) {
					return dialSessionSSH(dctx, o.cf.timeout, first, ws, vouched)
				},
			})
			return err
		})
		if errors.Is(err, sshclient.ErrEscapeDisconnect) {
			fmt.Fprintf(env.Stderr, "Connection to %s closed; session %q keeps running there until the agent's idle timeout: agent ssh %s --session %s attaches again.\n", ws.Name(), name, ws.Name(), name)
			return &exitError{code: 255}
		}
		if !errors.Is(err, sshclient.ErrSessionsUnsupported) || o.session != "" {
			return sshResult(ws, o.cf.timeout, code, err)
		}
		// An older agent: a plain session, as before.
	}
	err = untilAccessEnds(ctx, ws, func(ctx context.Context) error {
		dctx, cancel := ws.GiveUpWhenSilent(ctx, o.cf.timeout)
		defer cancel()
		conn, done, err := dialSSH(ctx, dctx, ws)
		if err != nil {
			return err
		}
		defer done()
		conn = client.BoundHandshake(dctx, cancel, conn)
		if vouched != "" {
			if conn, err = sshclient.ExpectHostKey(conn, vouched); err != nil {
				return err
			}
		}
		if len(o.command) > 0 && !o.forwardAgent {
			code, err = sshclient.RunCommand(ctx, conn, strings.Join(o.command, " "), env.Stdin, env.Stdout, env.Stderr)
			return err
		}
		opts := sshclient.InteractiveOptions{Stderr: env.Stderr, ForwardAgent: o.forwardAgent, NoEscapes: o.noEscapes}
		if len(o.command) > 0 {
			opts.Command = strings.Join(o.command, " ")
		}
		if term.IsTerminal(int(os.Stdin.Fd())) {
			env.rawTerminal.Store(true)
		}
		code, err = sshclient.RunInteractive(ctx, conn, opts)
		env.rawTerminal.Store(false)
		return err
	})
	if errors.Is(err, sshclient.ErrEscapeDisconnect) {
		fmt.Fprintf(env.Stderr, "Connection to %s closed.\n", ws.Name())
		return &exitError{code: 255}
	}
	return sshResult(ws, o.cf.timeout, code, err)
}

// sshResult turns a session's end into agent ssh's error and exit code.
func sshResult(ws *client.Workspace, timeout time.Duration, code int, err error) error {
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("waiting for the SSH handshake with workspace %q: it sent nothing for %s (--timeout)", ws.Name(), timeout)
		}
		return err
	}
	if code != 0 {
		return &exitError{code: code}
	}
	return nil
}

// dialSessionSSH connects to the workspace's SSH server for a reconnecting
// session: the first time until the workspace has been silent for
// --timeout (the handshake too), later within ctx (one reconnect attempt's
// bound), and expecting the vouched host key.
func dialSessionSSH(ctx context.Context, timeout time.Duration, first bool, ws *client.Workspace, vouched string) (net.Conn, error) {
	if first {
		sctx, cancel := ws.GiveUpWhenSilent(ctx, timeout)
		conn, err := ws.DialTCP(sctx, protocol.PortSSH)
		if err != nil {
			cancel()
			return nil, silentCause(sctx, err)
		}
		return expectVouched(client.BoundHandshake(sctx, cancel, conn), vouched)
	}
	conn, err := ws.DialTCP(ctx, protocol.PortSSH)
	if err != nil {
		return nil, err
	}
	if d, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	return expectVouched(conn, vouched)
}

// expectVouched makes the SSH handshake on conn insist on the vouched host
// key, if there is one.
func expectVouched(conn net.Conn, vouched string) (net.Conn, error) {
	if vouched == "" {
		return conn, nil
	}
	ec, err := sshclient.ExpectHostKey(conn, vouched)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return ec, nil
}

// newSessionName names a session the user did not name.
func newSessionName() string {
	return "ssh-" + strings.ToLower(rand.Text()[:8])
}

// dialSSH connects to the workspace's SSH server within dialCtx. When
// access ends while ctx runs, the connection is hung up at once rather than
// waiting for the workspace's close, which can no longer arrive. done
// closes the connection.
func dialSSH(ctx, dialCtx context.Context, ws *client.Workspace) (conn net.Conn, done func(), err error) {
	conn, err = ws.DialTCP(dialCtx, protocol.PortSSH)
	if err != nil {
		return nil, nil, silentCause(dialCtx, err)
	}
	stop := context.AfterFunc(ctx, func() {
		if ws.Err() != nil {
			conn.Close()
		}
	})
	return conn, func() { stop(); conn.Close() }, nil
}

// silentCause names the workspace's silence when that ended a dial, rather
// than a bare "context canceled".
func silentCause(ctx context.Context, err error) error {
	var silent *client.ErrWorkspaceSilent
	if cause := context.Cause(ctx); errors.As(cause, &silent) && !strings.Contains(err.Error(), cause.Error()) {
		return fmt.Errorf("%w (%w)", err, cause)
	}
	return err
}

var (
	errStdinClosed = errors.New("OpenSSH closed standard input (it gave up or was stopped)")
	errParentGone  = errors.New("the process that started agent ssh --stdio exited")
)

// runSSHStdio is OpenSSH's ProxyCommand. It must never outlive the ssh
// that started it: it ends when its parent dies (SIGTERM from the kernel,
// and a poll of the parent's PID for parents that are threads) and when
// its standard input closes, even while it is still connecting.
func runSSHStdio(ctx context.Context, env *cliEnv, o *sshOptions) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopWatching := watchParent(ctx, func() { cancel(errParentGone) })
	defer stopWatching()

	in := newEarlyReader(env.Stdin)
	cctx, cancelConnect := context.WithCancelCause(ctx)
	defer cancelConnect(nil)
	go func() {
		select {
		case <-in.Closed():
			cancelConnect(errStdinClosed)
		case <-cctx.Done():
		}
	}()
	tctx, cancelTimeout := giveUpAfter(cctx, o.cf.timeout)
	defer cancelTimeout()

	ws, err := env.connectWorkspace(tctx, &o.cf, o.workspace)
	if err != nil {
		return err
	}
	defer ws.Close()
	err = untilAccessEnds(ctx, ws, func(ctx context.Context) error {
		// The connection gets its own --timeout; the handshake is
		// OpenSSH's to bound (its ConnectTimeout).
		dctx, cancel := ws.GiveUpWhenSilent(cctx, o.cf.timeout)
		defer cancel()
		conn, done, err := dialSSH(ctx, dctx, ws)
		if err != nil {
			return err
		}
		defer done()
		return sshclient.ProxyStdio(ctx, conn, in, env.Stdout)
	})
	if cause := context.Cause(ctx); cause != nil && errors.Is(err, context.Canceled) {
		return cause
	}
	return err
}

// parentPollInterval is how often runSSHStdio checks that its parent lives.
const parentPollInterval = time.Second

// watchParent calls gone once this process's parent has exited: the kernel
// sends SIGTERM then (PR_SET_PDEATHSIG; main turns it into a cancelled
// context), and a poll of getppid catches a parent that died before that
// was set up or a parent thread's exit that the kernel's signal misreads.
func watchParent(ctx context.Context, gone func()) (stop func()) {
	ppid := os.Getppid()
	setParentDeathSignal()
	if os.Getppid() != ppid {
		gone()
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(parentPollInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if os.Getppid() != ppid {
					gone()
					return
				}
			}
		}
	}()
	return cancel
}

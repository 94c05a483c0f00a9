package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/agentd/agent/client"
	"github.com/agentd/agent/sshclient"
)

// sshOptions is `agent ssh` as parsed from its command line.
type sshOptions struct {
	cf           clientFlags
	workspace    string
	command      []string
	stdio        bool
	forwardAgent bool
	noEscapes    bool
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

In a terminal session, ~. at the start of a line ends the connection (the
way out when the network is gone) and ~? lists the escapes, as in ssh.

--timeout bounds the wait for the coordinator, the workspace and the SSH
handshake; a session that is up runs as long as it likes.`,
		Example: `  agent ssh ws1
  agent ssh ws1 -- uname -a
  agent ssh -A ws1                      # forward the local ssh-agent
  ssh -o ProxyCommand='agent ssh --stdio %n' ws1.agent`,
		Args: usageArgs(cobra.MinimumNArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.workspace, o.command = args[0], args[1:]
			return runSSH(cmd.Context(), env, o)
		},
	}
	o.cf.register(cmd, env)
	cmd.ValidArgsFunction = env.completeWorkspaceArg(&o.cf)
	o.cf.registerTimeout(cmd)
	cmd.Flags().BoolVar(&o.stdio, "stdio", false, "carry raw SSH traffic on stdin/stdout (for OpenSSH's ProxyCommand)")
	cmd.Flags().BoolVarP(&o.forwardAgent, "forward-agent", "A", false, "forward the local SSH agent (SSH_AUTH_SOCK) into the session")
	cmd.Flags().BoolVar(&o.noEscapes, "no-escapes", false, "in a terminal session, pass ~. and ~? to the workspace instead of reading them as escapes")
	return cmd
}

func (o *sshOptions) validate() error {
	if o.stdio && len(o.command) > 0 {
		return usageErrorf("--stdio carries an SSH connection and takes no command (got %q)", strings.Join(o.command, " "))
	}
	if o.stdio && o.forwardAgent {
		return usageErrorf("--stdio carries OpenSSH's own connection: ask ssh for agent forwarding (ssh -A), not agent ssh --stdio")
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
	conn, err := ws.DialTCP(cctx, client.PortSSH)
	if err != nil {
		return err
	}
	defer conn.Close()
	// The deadline bounds the SSH handshake; sshclient clears it once the
	// session is up.
	if d, ok := cctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	var code int
	if len(o.command) > 0 && !o.forwardAgent {
		code, err = sshclient.RunCommand(ctx, conn, strings.Join(o.command, " "), env.Stdin, env.Stdout, env.Stderr)
	} else {
		opts := sshclient.InteractiveOptions{Stderr: env.Stderr, ForwardAgent: o.forwardAgent, NoEscapes: o.noEscapes}
		if len(o.command) > 0 {
			opts.Command = strings.Join(o.command, " ")
		}
		if term.IsTerminal(int(os.Stdin.Fd())) {
			env.rawTerminal.Store(true)
		}
		code, err = sshclient.RunInteractive(ctx, conn, opts)
		env.rawTerminal.Store(false)
	}
	if errors.Is(err, sshclient.ErrEscapeDisconnect) {
		fmt.Fprintf(env.Stderr, "Connection to %s closed.\n", ws.Name())
		return &exitError{code: 255}
	}
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("waiting for the SSH handshake with workspace %q: %w", ws.Name(), context.Cause(cctx))
		}
		return err
	}
	if code != 0 {
		return &exitError{code: code}
	}
	return nil
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
	conn, err := ws.DialTCP(tctx, client.PortSSH)
	if err != nil {
		return err
	}
	err = sshclient.ProxyStdio(ctx, conn, in, env.Stdout)
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

package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/client"
	"github.com/agentd/agent/coordinator/coordclient"
)

// defaultTimeout bounds how long a one-shot client command waits for the
// coordinator, the workspace and the first answer over the tailnet.
const defaultTimeout = 30 * time.Second

// clientFlags say how a laptop-side command reaches the coordinator. Each
// field falls back to the environment, then to what `agent login` saved.
type clientFlags struct {
	url, token, fingerprint   string
	blockDirect, insecureHTTP bool
	// timeout is --timeout of one-shot commands (0: wait without bound).
	timeout time.Duration
}

func (f *clientFlags) register(cmd *cobra.Command, env *cliEnv) {
	fs := cmd.Flags()
	fs.StringVar(&f.url, "url", "", "coordinator URL (env AGENT_URL; default: what 'agent login' saved)")
	fs.StringVar(&f.token, "token", "", "user token (env AGENT_TOKEN; default: what 'agent login' saved)")
	fs.StringVar(&f.fingerprint, "fingerprint", "", "pinned coordinator certificate fingerprint (env AGENT_FINGERPRINT)")
	fs.BoolVar(&f.insecureHTTP, "insecure-http", false, "allow an http:// coordinator URL: the token travels in cleartext (env AGENT_INSECURE_HTTP=1)")
	fs.BoolVar(&f.blockDirect, "derp-only", false, "relay everything through the coordinator's DERP server (no direct UDP path)")
}

// registerTimeout adds --timeout to a one-shot command.
func (f *clientFlags) registerTimeout(cmd *cobra.Command) {
	cmd.Flags().DurationVar(&f.timeout, "timeout", defaultTimeout, "give up when the coordinator or the workspace has not answered after this long (0 waits without bound)")
}

func (f *clientFlags) resolve(env *cliEnv) (coordclient.Config, error) {
	// Flags win over the environment, which wins over `agent login`'s
	// saved profile; LoadProfile applies the last two.
	getenv := func(name string) string {
		switch name {
		case coordclient.EnvURL:
			if f.url != "" {
				return f.url
			}
		case coordclient.EnvToken:
			if f.token != "" {
				return f.token
			}
		case coordclient.EnvFingerprint:
			if f.fingerprint != "" {
				return f.fingerprint
			}
		case coordclient.EnvInsecureHTTP:
			if f.insecureHTTP {
				return "1"
			}
		}
		return env.Getenv(name)
	}
	p, err := coordclient.LoadProfile(getenv)
	if err != nil {
		return coordclient.Config{}, err
	}
	if _, err := coordclient.ParseURL(p.URL, p.Fingerprint, p.InsecureHTTP); err != nil {
		return coordclient.Config{}, err
	}
	return coordclient.Config{URL: p.URL, Token: p.Token, Fingerprint: p.Fingerprint, InsecureHTTP: p.InsecureHTTP, Software: "agent-client"}, nil
}

// giveUpAfter bounds ctx by d (the --timeout); the cause it ends with says
// so, and becomes part of the one line the command fails with.
func giveUpAfter(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if d <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeoutCause(ctx, d, fmt.Errorf("gave up after %s (--timeout)", d))
}

// connectOptions tune connectWorkspace for the command at hand.
type connectOptions struct {
	// keepRetrying: the command runs until interrupted (port-forward);
	// it says once when the coordinator is out of reach and once when it
	// is back, instead of failing.
	keepRetrying bool
}

// connectWorkspace opens a tunnel to a workspace. The name may carry the
// ".agent" suffix that `agent config-ssh` uses for OpenSSH host names.
func (e *cliEnv) connectWorkspace(ctx context.Context, f *clientFlags, name string, opts ...connectOptions) (*client.Workspace, error) {
	var o connectOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	cfg, err := f.resolve(e)
	if err != nil {
		return nil, err
	}
	name = strings.TrimSuffix(name, ".agent")
	ccfg := client.Config{
		Coordinator:     cfg,
		Logger:          e.ClientLogger(),
		BlockDirect:     f.blockDirect,
		Notify:          e.notice,
		AnnounceRetries: o.keepRetrying,
		// --timeout bounds a one-shot command's wait, and its error names
		// the workspace's state; port-forward waits for an offline
		// workspace as long as it runs (each forwarded connection's dial
		// has its own timeout).
		UnhealthyWait: -1,
	}
	return client.Connect(ctx, ccfg, name)
}

// vouchedHostKey is the SSH host key the coordinator vouches for the
// workspace (the name may carry the ".agent" suffix); a workspace whose
// agent never proved one is an error naming the fix.
func (e *cliEnv) vouchedHostKey(ctx context.Context, f *clientFlags, name string) (string, error) {
	cfg, err := f.resolve(e)
	if err != nil {
		return "", err
	}
	name = strings.TrimSuffix(name, ".agent")
	key, err := client.VouchedHostKey(ctx, cfg, name)
	if err != nil {
		return "", err
	}
	if key == "" {
		return "", fmt.Errorf("the coordinator vouches for no SSH host key for workspace %q yet: its agent has not registered since identity pinning (upgrade the agent and start it)", name)
	}
	return key, nil
}

// accessState is what untilAccessEnds watches of a *client.Workspace: Done
// is closed once access ended, and Err says why.
type accessState interface {
	Done() <-chan struct{}
	Err() error
}

// untilAccessEnds runs fn with a context that also ends when access to the
// workspace ends (a revoked or expired token, a withdrawn grant, a deleted
// user or workspace); then the access decision is the command's error, one
// line naming the reason, whatever fn returned.
func untilAccessEnds(ctx context.Context, ws accessState, fn func(context.Context) error) error {
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-ws.Done():
			cancel()
		case <-fctx.Done():
		}
	}()
	err := fn(fctx)
	if err != nil && ws.Err() == nil && ctx.Err() == nil {
		// The workspace hangs up at the same moment the coordinator
		// tells us why; give the reason a moment to arrive. Not when
		// we are the ones going away (interrupted, or OpenSSH gone):
		// that wait kept ssh via ProxyCommand 1 s longer whenever
		// OpenSSH hung up before the workspace closed.
		select {
		case <-ws.Done():
		case <-time.After(time.Second):
		}
	}
	if aerr := ws.Err(); aerr != nil {
		return aerr
	}
	return err
}

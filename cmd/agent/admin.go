package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/coordinator/store/pgstore"
)

// adminOptions are the flags every admin subcommand shares.
type adminOptions struct {
	dataDir     string
	postgresURL string
	getenv      func(string) string
	json        bool
	// remote is the admin API over HTTPS (--url), used instead of the
	// data directory or the database when set.
	remote adminRemote
}

// adminRemote is how `agent admin --url` reaches a coordinator replica.
type adminRemote struct {
	url, token, tokenFile, fingerprint string
	insecureHTTP                       bool
}

// open reaches the coordinator's admin API: over HTTPS with --url, else
// over its socket when it runs, otherwise straight on the store file (or
// the database). The returned function releases it.
func (f *adminOptions) open(ctx context.Context) (admin.Ops, func(), error) {
	if f.remote.url == "" {
		f.remote.url = f.getenv("AGENT_ADMIN_URL")
	}
	if f.remote.url != "" {
		return f.openRemote()
	}
	if f.postgresURL == "" {
		f.postgresURL = f.getenv("AGENT_POSTGRES_URL") // not the flag default: --help would show the password
	}
	if f.postgresURL != "" {
		return f.openPostgres(ctx)
	}
	info, err := os.Stat(f.dataDir)
	if errors.Is(err, fs.ErrPermission) {
		return nil, nil, adminAccessError(f.dataDir, nil)
	}
	if err != nil || !info.IsDir() {
		return nil, nil, fmt.Errorf("data directory %s does not exist; pass the coordinator's --data-dir (or set AGENT_COORDINATOR_DATA_DIR)", f.dataDir)
	}
	// The admin socket and the store are the owner's alone; say so
	// instead of failing on whichever file is touched first.
	if sys, ok := info.Sys().(*syscall.Stat_t); ok && os.Geteuid() != 0 && int(sys.Uid) != os.Geteuid() {
		return nil, nil, adminAccessError(f.dataDir, sys)
	}
	sock := admin.SocketPath(f.dataDir)
	dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	c, err := admin.DialSocket(dctx, sock)
	cancel()
	if err == nil {
		return c, func() {}, nil
	}
	if errors.Is(err, fs.ErrPermission) {
		return nil, nil, adminAccessError(f.dataDir, nil)
	}
	st, err := store.Open(f.dataDir)
	if errors.Is(err, store.ErrLocked) {
		return nil, nil, fmt.Errorf("a coordinator holds %s but its admin socket %s does not answer; is it running as another user?", f.dataDir, sock)
	}
	if errors.Is(err, fs.ErrPermission) {
		return nil, nil, adminAccessError(f.dataDir, nil)
	}
	if err != nil {
		return nil, nil, err
	}
	dataDir := f.dataDir
	local := &admin.Local{Store: st, InfoFn: func() admin.Info {
		fp, _ := coordinator.ReadFingerprint(dataDir)
		return admin.Info{Running: false, DataDir: dataDir, Fingerprint: fp}
	}}
	return local, func() { st.Close() }, nil
}

// openPostgres reaches a replicated coordinator's store: through the local
// coordinator's socket when one runs here, otherwise in the database itself
// (running replicas learn of changes from the database at once).
func (f *adminOptions) openPostgres(ctx context.Context) (admin.Ops, func(), error) {
	if st, err := os.Stat(f.dataDir); err == nil && st.IsDir() {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := admin.DialSocket(dctx, admin.SocketPath(f.dataDir))
		cancel()
		if err == nil {
			return c, func() {}, nil
		}
	}
	st, err := pgstore.Open(ctx, f.postgresURL, pgstore.Options{})
	if err != nil {
		return nil, nil, err
	}
	local := &admin.Local{Store: st, InfoFn: func() admin.Info {
		return admin.Info{Running: false, DataDir: "(PostgreSQL " + st.Target() + ")"}
	}}
	return local, func() { st.Close() }, nil
}

// openRemote is the admin API of the coordinator at --url, with an admin
// token from --token-file, --token or AGENT_ADMIN_TOKEN.
func (f *adminOptions) openRemote() (admin.Ops, func(), error) {
	r := f.remote
	if r.fingerprint == "" {
		r.fingerprint = f.getenv(coordclient.EnvFingerprint)
	}
	if !r.insecureHTTP {
		r.insecureHTTP = coordclient.InsecureHTTPFromEnv(f.getenv(coordclient.EnvInsecureHTTP))
	}
	u, err := coordclient.ParseURL(r.url, r.fingerprint, r.insecureHTTP)
	if err != nil {
		return nil, nil, err
	}
	tok := r.token
	switch {
	case r.tokenFile != "" && tok != "":
		return nil, nil, usageErrorf("pass either --token or --token-file, not both")
	case r.tokenFile != "":
		// The admin token is the whole deployment: no override.
		if st, err := os.Stat(r.tokenFile); err == nil && st.Mode().Perm()&0o004 != 0 {
			return nil, nil, fmt.Errorf("the admin token file %s is readable by every local user (mode %04o): anyone on this machine could administer the coordinator; run chmod 600 %s", r.tokenFile, st.Mode().Perm(), r.tokenFile)
		}
		data, err := os.ReadFile(r.tokenFile)
		if err != nil {
			return nil, nil, fmt.Errorf("reading the admin token file: %w", err)
		}
		tok = string(data)
	case tok == "":
		tok = f.getenv("AGENT_ADMIN_TOKEN")
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return nil, nil, errors.New("--url needs an admin token: pass --token-file FILE (or set AGENT_ADMIN_TOKEN) with a token from 'agent admin token create --admin USER', run on the coordinator's machine")
	}
	hc, err := coordclient.HTTPClient(r.fingerprint)
	if err != nil {
		return nil, nil, err
	}
	return admin.NewHTTPSClient(u.String(), tok, hc), func() { hc.CloseIdleConnections() }, nil
}

// with runs one admin operation between opening and closing the admin API.
func (f *adminOptions) with(ctx context.Context, env *cliEnv, args []string, fn func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error) error {
	ops, done, err := f.open(ctx)
	if err != nil {
		return err
	}
	defer done()
	return fn(ctx, ops, env.Stdout, args)
}

// emit prints v as JSON with --json, else runs text.
func (f *adminOptions) emit(out io.Writer, v any, text func()) error {
	if f.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	text()
	return nil
}

// adminAccessError says who may run agent admin on dataDir.
func adminAccessError(dataDir string, owner *syscall.Stat_t) error {
	me := strconv.Itoa(os.Geteuid())
	if u, err := user.Current(); err == nil {
		me = u.Username + " (uid " + me + ")"
	}
	if owner == nil {
		return fmt.Errorf("agent admin needs root or the owner of the coordinator's data directory %s, and you (%s) are neither: run it as the user that runs the coordinator (sudo -u THAT-USER agent admin ...) or as root", dataDir, me)
	}
	uid := strconv.Itoa(int(owner.Uid))
	who, sudoAs := "uid "+uid, "'#"+uid+"'"
	if u, err := user.LookupId(uid); err == nil {
		who, sudoAs = u.Username+" (uid "+uid+")", u.Username
	}
	return fmt.Errorf("agent admin needs root or the owner of the coordinator's data directory %s, which is %s; you are %s: run it as that user (sudo -u %s agent admin ...) or as root", dataDir, who, me, sudoAs)
}

func newAdminCmd(env *cliEnv) *cobra.Command {
	f := &adminOptions{getenv: env.Getenv}
	cmd := &cobra.Command{
		Use:   "admin",
		Short: "Administer the coordinator: users, agents, grants, tokens",
		Long: `Administer the coordinator's users, agents, grants and tokens.

Run it on the coordinator's machine, as the user that runs the coordinator.
While the coordinator runs, changes go through its admin socket in the data
directory and take effect at once (revoking a token or a grant disconnects
what it allowed); otherwise the store file is changed directly.

From anywhere else, pass --url with an admin token (made on the coordinator's
machine with 'agent admin token create --admin USER'); any replica answers,
and with PostgreSQL every replica applies the change at once. With
--postgres-url it changes the replicated store in the database itself.

Tokens are shown once, when created; only their hashes are kept.`,
		Example: `  sudo -u agent agent admin user create alice
  agent admin --url https://coord.example.com --token-file ~/.agent-admin-token list`,
	}
	cmd.PersistentFlags().StringVar(&f.postgresURL, "postgres-url", "", "the replicated coordinator's PostgreSQL URL, to administer its store without a local coordinator (env AGENT_POSTGRES_URL)")
	cmd.PersistentFlags().StringVar(&f.dataDir, "data-dir", envOr(env, "AGENT_COORDINATOR_DATA_DIR", defaultCoordinatorDataDir), "the coordinator's data directory (env AGENT_COORDINATOR_DATA_DIR)")
	cmd.PersistentFlags().BoolVar(&f.json, "json", false, "print JSON")
	cmd.PersistentFlags().StringVar(&f.remote.url, "url", "", "administer the coordinator (any replica) at this URL over HTTPS, with an admin token (env AGENT_ADMIN_URL)")
	cmd.PersistentFlags().StringVar(&f.remote.tokenFile, "token-file", "", "file holding the admin token for --url")
	cmd.PersistentFlags().StringVar(&f.remote.token, "token", "", "admin token for --url (env AGENT_ADMIN_TOKEN; prefer --token-file)")
	cmd.PersistentFlags().StringVar(&f.remote.fingerprint, "fingerprint", "", "pinned certificate fingerprint of the coordinator at --url (env AGENT_FINGERPRINT)")
	cmd.PersistentFlags().BoolVar(&f.remote.insecureHTTP, "insecure-http", false, "allow an http:// --url: the admin token travels in cleartext (env AGENT_INSECURE_HTTP=1)")

	// run wraps an operation with opening and closing the admin API.
	run := func(fn func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, args []string) error {
			return f.with(cmd.Context(), env, args, fn)
		}
	}
	emit := f.emit

	user := &cobra.Command{Use: "user", Short: "Create or delete users"}
	user.AddCommand(&cobra.Command{
		Use: "create NAME", Short: "Create a user", Args: usageArgs(cobra.ExactArgs(1)),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error {
			u, err := ops.CreateUser(ctx, args[0])
			if err != nil {
				return err
			}
			return emit(out, u, func() {
				fmt.Fprintf(out, "created user %s\nnext: agent admin token create --user %s\n", u.Name, u.Name)
			})
		}),
	}, &cobra.Command{
		Use: "delete NAME", Short: "Delete a user with their grants and tokens", Args: usageArgs(cobra.ExactArgs(1)),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error {
			if err := ops.DeleteUser(ctx, args[0]); err != nil {
				return err
			}
			return emit(out, map[string]string{"deleted": args[0]}, func() { fmt.Fprintf(out, "deleted user %s\n", args[0]) })
		}),
	})

	ac := &adminAgentCreateOptions{}
	agentCreate := &cobra.Command{
		Use: "create NAME --owner USER", Short: "Create an agent and print its token", Args: usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			ac.name = args[0]
			if ac.owner == "" {
				return usageErrorf("--owner is required: the user who owns the agent (and may reach it without a grant)")
			}
			return f.with(cmd.Context(), env, args, func(ctx context.Context, ops admin.Ops, out io.Writer, _ []string) error {
				return runAdminAgentCreate(ctx, ops, out, f, ac)
			})
		},
	}
	agentCreate.Flags().StringVar(&ac.owner, "owner", "", "user who owns the agent")
	agentCmd := &cobra.Command{Use: "agent", Short: "Create or delete agents, or reset a workspace's pinned identity"}
	agentCmd.AddCommand(agentCreate, &cobra.Command{
		Use:   "reset-identity NAME",
		Short: "Forget the SSH host key pinned for an agent, so its next registration pins a new one",
		Long: `The coordinator pins an agent's SSH host key at the first registration with
each agent token and refuses any other key with that token. When a workspace
lost its data directory (and with it its host key), or was rebuilt, run this
so the agent can register again; the next agent to register with the token
pins its key, and clients are told to expect it. Check first that the new
agent is the workspace's own: anyone holding the token could register.`,
		Args: usageArgs(cobra.ExactArgs(1)),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error {
			if err := ops.ResetIdentity(ctx, args[0]); err != nil {
				return err
			}
			return emit(out, map[string]string{"reset_identity": args[0]}, func() {
				fmt.Fprintf(out, "forgot the host key pinned for agent %s; the next agent to register with its token pins its own\n", args[0])
			})
		}),
	}, &cobra.Command{
		Use: "delete NAME", Short: "Delete an agent with its grants and tokens", Args: usageArgs(cobra.ExactArgs(1)),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error {
			if err := ops.DeleteAgent(ctx, args[0]); err != nil {
				return err
			}
			return emit(out, map[string]string{"deleted": args[0]}, func() { fmt.Fprintf(out, "deleted agent %s\n", args[0]) })
		}),
	})

	grant := &cobra.Command{
		Use: "grant USER AGENT", Short: "Let a user reach an agent", Args: usageArgs(cobra.ExactArgs(2)),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error {
			g, err := ops.AddGrant(ctx, args[0], args[1])
			if err != nil {
				return err
			}
			return emit(out, g, func() { fmt.Fprintf(out, "%s may now reach %s\n", g.User, g.Agent) })
		}),
	}
	ungrant := &cobra.Command{
		Use: "ungrant USER AGENT", Short: "Withdraw a grant (open tunnels close at once)", Args: usageArgs(cobra.ExactArgs(2)),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error {
			if err := ops.RemoveGrant(ctx, args[0], args[1]); err != nil {
				return err
			}
			return emit(out, map[string]string{"user": args[0], "agent": args[1]}, func() {
				fmt.Fprintf(out, "%s may no longer reach %s\n", args[0], args[1])
			})
		}),
	}

	tc := &adminTokenCreateOptions{}
	tokenCreate := &cobra.Command{
		Use: "create (--user USER | --agent AGENT | --admin USER) [--expires 720h]", Short: "Create a token and print it", Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if n := btoi(tc.user != "") + btoi(tc.agent != "") + btoi(tc.admin != ""); n != 1 {
				return usageErrorf("pass exactly one of --user USER, --agent AGENT or --admin USER")
			}
			expires, err := parseExpiry(tc.expires, time.Now())
			if err != nil {
				return err
			}
			return f.with(cmd.Context(), env, nil, func(ctx context.Context, ops admin.Ops, out io.Writer, _ []string) error {
				return runAdminTokenCreate(ctx, ops, out, f, tc, expires)
			})
		},
	}
	tokenCreate.Flags().StringVar(&tc.user, "user", "", "user the token authenticates")
	tokenCreate.Flags().StringVar(&tc.agent, "agent", "", "agent the token authenticates")
	tokenCreate.Flags().StringVar(&tc.admin, "admin", "", "user who holds a new admin token, for 'agent admin --url' (not with --url itself)")
	tokenCreate.Flags().StringVar(&tc.expires, "expires", "", `lifetime ("720h", "30d") or date (RFC 3339); default: never`)
	token := &cobra.Command{Use: "token", Short: "Create or revoke tokens"}
	token.AddCommand(tokenCreate, &cobra.Command{
		Use: "revoke ID|TOKEN", Short: "Revoke a token (by its ID from 'list', or the token itself)", Args: usageArgs(cobra.ExactArgs(1)),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, args []string) error {
			t, err := ops.RevokeToken(ctx, args[0])
			if err != nil {
				return err
			}
			return emit(out, t, func() { fmt.Fprintf(out, "revoked %s token %s of %s\n", t.Kind, t.ID, t.Subject) })
		}),
	})

	list := &cobra.Command{
		Use: "list", Short: "List users, agents, grants and tokens", Args: usageArgs(cobra.NoArgs),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, _ []string) error {
			s, err := ops.List(ctx)
			if err != nil {
				return err
			}
			return emit(out, s, func() { printSnapshot(out, s, time.Now()) })
		}),
	}
	info := &cobra.Command{
		Use: "info", Short: "Show the coordinator's URL, certificate fingerprint and connected peers", Args: usageArgs(cobra.NoArgs),
		RunE: run(func(ctx context.Context, ops admin.Ops, out io.Writer, _ []string) error {
			i, err := ops.Info(ctx)
			if err != nil {
				return err
			}
			return emit(out, i, func() { printInfo(out, i) })
		}),
	}

	cmd.AddCommand(user, agentCmd, grant, ungrant, token, list, info)
	return cmd
}

// adminAgentCreateOptions is `agent admin agent create`.
type adminAgentCreateOptions struct {
	name, owner string
}

func runAdminAgentCreate(ctx context.Context, ops admin.Ops, out io.Writer, f *adminOptions, o *adminAgentCreateOptions) error {
	a, err := ops.CreateAgent(ctx, o.name, o.owner)
	if err != nil {
		return err
	}
	return f.emit(out, a, func() {
		fmt.Fprintf(out, "created agent %s (owner %s, id %d, address %s)\n", a.Agent.Name, a.Agent.Owner, a.Agent.ID, a.Address.Addr())
		fmt.Fprintf(out, "agent token (shown once; give it to the workspace, e.g. in a file for agent run --token-file):\n%s\n", a.Secret)
	})
}

// adminTokenCreateOptions is `agent admin token create`: exactly one of
// user, agent and admin is set.
type adminTokenCreateOptions struct {
	user, agent, admin, expires string
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func runAdminTokenCreate(ctx context.Context, ops admin.Ops, out io.Writer, f *adminOptions, o *adminTokenCreateOptions, expires time.Time) error {
	kind, subject := store.KindUser, o.user
	switch {
	case o.agent != "":
		kind, subject = store.KindAgent, o.agent
	case o.admin != "":
		kind, subject = store.KindAdmin, o.admin
	}
	tc, err := ops.CreateToken(ctx, kind, subject, expires)
	if err != nil {
		return err
	}
	return f.emit(out, tc, func() {
		exp := "never expires"
		if !tc.Token.Expires.IsZero() {
			exp = "expires " + tc.Token.Expires.Local().Format(time.RFC3339)
		}
		fmt.Fprintf(out, "created %s token %s for %s (%s)\n", tc.Token.Kind, tc.Token.ID, tc.Token.Subject, exp)
		fmt.Fprintf(out, "token (shown once):\n%s\n", tc.Secret)
	})
}

// parseExpiry reads "720h", "30d" or an RFC 3339 date; "" means never.
func parseExpiry(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if days, ok := strings.CutSuffix(s, "d"); ok {
		if n, err := strconv.Atoi(days); err == nil && n > 0 {
			return now.Add(time.Duration(n) * 24 * time.Hour), nil
		}
	}
	if d, err := time.ParseDuration(s); err == nil {
		if d <= 0 {
			return time.Time{}, fmt.Errorf("--expires %s: must be positive", s)
		}
		return now.Add(d), nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	if t, err := time.ParseInLocation(time.DateOnly, s, time.Local); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf(`--expires %q: want a lifetime ("720h", "30d") or a date ("2027-01-31" or RFC 3339)`, s)
}

func printSnapshot(out io.Writer, s store.Snapshot, now time.Time) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "USERS\tCREATED")
	for _, u := range s.Users {
		fmt.Fprintf(tw, "%s\t%s\n", u.Name, u.Created.Local().Format(time.DateTime))
	}
	fmt.Fprintln(tw, "\nAGENTS\tOWNER\tID\tCREATED")
	for _, a := range s.Agents {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", a.Name, a.Owner, a.ID, a.Created.Local().Format(time.DateTime))
	}
	fmt.Fprintln(tw, "\nGRANTS (user -> agent; owners need none)\t\t")
	for _, g := range s.Grants {
		fmt.Fprintf(tw, "%s -> %s\t\t\n", g.User, g.Agent)
	}
	fmt.Fprintln(tw, "\nTOKENS\tKIND\tFOR\tSTATE")
	for _, t := range s.Tokens {
		state := "valid"
		switch {
		case !t.Revoked.IsZero():
			state = "revoked " + t.Revoked.Local().Format(time.DateTime)
		case !t.Expires.IsZero() && !now.Before(t.Expires):
			state = "expired " + t.Expires.Local().Format(time.DateTime)
		case !t.Expires.IsZero():
			state = "valid until " + t.Expires.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.ID, t.Kind, t.Subject, state)
	}
	tw.Flush()
}

func printInfo(out io.Writer, i admin.Info) {
	state := "not running (read from the data directory)"
	if i.Running {
		state = "running"
	}
	fmt.Fprintf(out, "coordinator: %s\n", state)
	if i.URL != "" {
		fmt.Fprintf(out, "url: %s\n", i.URL)
	}
	if i.Fingerprint != "" {
		fmt.Fprintf(out, "certificate fingerprint (sha256): %s\n", i.Fingerprint)
	}
	if i.STUN != "" {
		fmt.Fprintf(out, "stun: udp %s\n", i.STUN)
	}
	fmt.Fprintf(out, "data: %s\n", i.DataDir)
	if !i.Running {
		return
	}
	fmt.Fprintf(out, "connected peers: %d\n", len(i.Peers))
	if len(i.Peers) == 0 {
		return
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROLE\tNAME\tUSER\tNODE\tDERP\tNETWORK\tSINCE\tREMOTE\tTUNNELS")
	for _, p := range i.Peers {
		node := "no node yet"
		if p.HasNode {
			node = fmt.Sprintf("%d endpoints", p.Endpoints)
		}
		// Agents report their network self-check; clients do not.
		network := "-"
		if p.Network != nil {
			network = string(p.Network.Status)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", p.Role, p.Name, p.User, node, p.HomeDERP, network,
			p.Since.Local().Format(time.DateTime), p.Remote, strings.Join(p.Tunnels, ","))
	}
	tw.Flush()
}

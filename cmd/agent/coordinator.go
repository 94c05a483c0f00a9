package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/metrics"
)

// defaultCoordinatorDataDir is where a packaged coordinator keeps its state.
const defaultCoordinatorDataDir = "/var/lib/agent-coordinator"

// coordinatorOptions is `agent coordinator` as parsed from its command line.
type coordinatorOptions struct {
	cfg         coordinator.Config
	metricsAddr string
	memoryLimit string
}

func newCoordinatorCmd(env *cliEnv) *cobra.Command {
	return newCoordinatorCmdWith(env, runCoordinator)
}

// newCoordinatorCmdWith builds the command around runF, so tests can check
// what the command line and the environment parse to without serving.
func newCoordinatorCmdWith(env *cliEnv, runF func(context.Context, *cliEnv, *coordinatorOptions) error) *cobra.Command {
	o := &coordinatorOptions{}
	cfg := &o.cfg
	cmd := &cobra.Command{
		Use:   "coordinator",
		Short: "Run the coordinator: node exchange, auth, DERP relay and STUN",
		Long: `Run the coordinator, the meeting point of agents and clients.

It serves HTTPS on --listen with a self-signed certificate generated once in
--data-dir (clients pin its fingerprint), relays node information only between
a user and the agents the user may reach, embeds a DERP relay (/derp) that
admits only registered node keys, and answers STUN on --stun-addr (UDP).
Administer it with "agent admin" while it runs (over a unix socket in the
data directory).

The store is a file in --data-dir by default. With --postgres-url it lives
in PostgreSQL instead, and several coordinators given the same URL serve as
replicas of one deployment; the schema is created or upgraded at start.
Give them the same --mesh-key so their DERP relays forward to each other,
each its own --mesh-url, and the same --tls-cert/--tls-key so clients see
one certificate whichever replica answers.`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.PostgresURL == "" {
				// Read here, not as the flag's default, so --help never
				// prints the password.
				cfg.PostgresURL = env.Getenv("AGENT_POSTGRES_URL")
			}
			if cfg.MeshKey == "" {
				cfg.MeshKey = env.Getenv("AGENT_MESH_KEY") // a secret, like the URL
			}
			if cfg.STUNAddr2 == "off" {
				cfg.STUNAddr2 = ""
			}
			if cfg.STUNAddr == "off" {
				cfg.STUNAddr = ""
			}
			return runF(cmd.Context(), env, o)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&cfg.DataDir, "data-dir", envOr(env, "AGENT_COORDINATOR_DATA_DIR", defaultCoordinatorDataDir), "directory for the store, the TLS certificate and the admin socket (env AGENT_COORDINATOR_DATA_DIR)")
	fs.StringVar(&cfg.Listen, "listen", ":8443", "HTTPS listen address")
	fs.StringVar(&cfg.STUNAddr, "stun-addr", ":3478", `STUN UDP listen address ("off" to disable)`)
	fs.StringVar(&cfg.STUNAddr2, "stun-addr2", "off", `second STUN UDP listen address, e.g. ":3479", so network checks can tell a NAT's mapping behaviour ("off" for none)`)
	fs.BoolVar(&cfg.InsecureHTTP, "insecure-http", false, "serve plain HTTP instead of HTTPS (tests only: tokens travel in the clear)")
	fs.StringVar(&o.memoryLimit, "memory-limit", envOr(env, "AGENT_COORDINATOR_MEMORY_LIMIT", defaultCoordinatorMemoryLimit), memoryLimitFlagUsage("AGENT_COORDINATOR_MEMORY_LIMIT"))
	fs.StringVar(&o.metricsAddr, "metrics-addr", envOr(env, "AGENT_COORDINATOR_METRICS_ADDR", "127.0.0.1:2114"), `serve Prometheus /metrics here, plain HTTP ("" disables; env AGENT_COORDINATOR_METRICS_ADDR)`)
	fs.StringVar(&cfg.PostgresURL, "postgres-url", "", "keep the store in PostgreSQL, e.g. postgres://USER:PASSWORD@HOST:5432/DATABASE, shared by every coordinator replica (env AGENT_POSTGRES_URL; default: a file in --data-dir)")
	fs.StringVar(&cfg.MeshKey, "mesh-key", "", "with --postgres-url: secret shared by all replicas (64 hex digits, e.g. openssl rand -hex 32) that meshes their DERP relays (env AGENT_MESH_KEY)")
	fs.StringVar(&cfg.MeshURL, "mesh-url", envOr(env, "AGENT_MESH_URL", ""), "URL the other replicas use to reach this one's relay, e.g. https://POD_IP:8443 (env AGENT_MESH_URL; default: --access-url, or one built from --listen)")
	fs.StringVar(&cfg.TLSCertFile, "tls-cert", envOr(env, "AGENT_TLS_CERT", ""), "PEM certificate to serve instead of the self-signed one in --data-dir; give every replica the same one (env AGENT_TLS_CERT)")
	fs.StringVar(&cfg.TLSKeyFile, "tls-key", envOr(env, "AGENT_TLS_KEY", ""), "PEM private key of --tls-cert (env AGENT_TLS_KEY)")
	l := &cfg.Limits
	fs.IntVar(&l.MaxSessionsPerToken, "max-sessions-per-token", coordinator.DefaultMaxSessionsPerToken, "coordination sessions one token may hold open at once (each agent ssh / port-forward holds one)")
	fs.IntVar(&l.MaxSessionsPerAddress, "max-sessions-per-address", coordinator.DefaultMaxSessionsPerAddress, "coordination sessions one client IP address may hold open at once (behind a reverse proxy, every client has its address)")
	fs.Float64Var(&l.SessionRatePerToken, "session-rate-per-token", coordinator.DefaultSessionRatePerToken, "new coordination sessions per second one token may open, after --session-burst-per-token")
	fs.IntVar(&l.SessionBurstPerToken, "session-burst-per-token", coordinator.DefaultSessionBurstPerToken, "new coordination sessions one token may open at once")
	fs.Float64Var(&l.SessionRatePerAddress, "session-rate-per-address", coordinator.DefaultSessionRatePerAddress, "new coordination sessions per second one client IP address may open, after --session-burst-per-address (counted before the token is checked)")
	fs.IntVar(&l.SessionBurstPerAddress, "session-burst-per-address", coordinator.DefaultSessionBurstPerAddr, "new coordination sessions one client IP address may open at once")
	fs.DurationVar(&l.HTTPIdleTimeout, "http-idle-timeout", coordinator.DefaultHTTPIdleTimeout, "close keep-alive HTTP connections idle this long (coordination and DERP connections keep their own pings)")
	fs.DurationVar(&l.HTTPHeaderTimeout, "http-header-timeout", coordinator.DefaultHTTPHeaderTimeout, "close connections that take longer to send a request's headers")
	fs.IntVar(&l.MaxHandshakes, "max-tls-handshakes", 0, "TLS handshakes doing their key exchange at once; more wait in arrival order (default 2 per CPU)")
	fs.DurationVar(&l.HandshakeQueueWait, "tls-handshake-queue-wait", coordinator.DefaultHandshakeQueueWait, "refuse a TLS handshake still waiting for its turn this long after its connection arrived (at most half --http-header-timeout); the peer retries after its backoff")
	fs.StringVar(&cfg.AccessURL, "access-url", "", "URL peers use to reach this coordinator, e.g. https://coord.example.com:8443 (shown in instructions; added to the certificate's names on first start)")
	return cmd
}

// runCoordinator serves the coordinator (and its metrics) until ctx ends.
func runCoordinator(ctx context.Context, env *cliEnv, o *coordinatorOptions) error {
	cfg := o.cfg
	cfg.Logger = env.Logger()
	// The flag always has a value; an in-process caller that gives none
	// leaves its own runtime's limit alone.
	if o.memoryLimit != "" {
		limit, err := applyMemoryLimit(env, o.memoryLimit)
		if err != nil {
			return err
		}
		if limit > 0 {
			cfg.Logger.Debug("soft memory limit", "bytes", limit)
		}
	}
	var metricsLn net.Listener
	if o.metricsAddr != "" {
		cfg.Metrics = metrics.NewRegistry()
		var err error
		if metricsLn, err = net.Listen("tcp", o.metricsAddr); err != nil {
			return fmt.Errorf("metrics listener: %w (use --metrics-addr, or \"\" to disable)", err)
		}
		defer metricsLn.Close()
	}
	srv, err := coordinator.New(cfg)
	if err != nil {
		return err
	}
	if metricsLn != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", cfg.Metrics.Handler())
		ms := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
			WriteTimeout: 30 * time.Second, IdleTimeout: cfg.Limits.HTTPIdleTimeout}
		go ms.Serve(metricsLn)
		defer ms.Close()
	}
	metricsURL := ""
	if metricsLn != nil {
		metricsURL = "http://" + metricsLn.Addr().String() + "/metrics"
	}
	printCoordinatorBanner(env.Stdout, srv, cfg, metricsURL)
	return srv.Serve(ctx)
}

func printCoordinatorBanner(w io.Writer, srv *coordinator.Server, cfg coordinator.Config, metricsURL string) {
	u := srv.URL()
	fmt.Fprintf(w, "agent coordinator serving %s\n", u)
	if fp := srv.Fingerprint(); fp != "" {
		fmt.Fprintf(w, "  certificate fingerprint (sha256): %s\n", fp)
	} else {
		fmt.Fprintf(w, "  WARNING: plain HTTP (--insecure-http): tokens and node information travel unencrypted\n")
	}
	if a := srv.STUNAddr(); a != nil {
		fmt.Fprintf(w, "  STUN: udp %s\n", a)
	}
	if metricsURL != "" {
		fmt.Fprintf(w, "  metrics: %s\n", metricsURL)
	}
	fmt.Fprintf(w, "  store: %s\n", srv.StoreDescription())
	fmt.Fprintf(w, "  data: %s (admin socket %s)\n", cfg.DataDir, admin.SocketPath(cfg.DataDir))
	if !srv.FirstStart() {
		return
	}
	adm := "agent admin"
	if cfg.DataDir != defaultCoordinatorDataDir {
		adm += " --data-dir " + shellQuote(cfg.DataDir)
	}
	pin := ""
	if fp := srv.Fingerprint(); fp != "" {
		pin = " --fingerprint " + fp
	}
	if host := hostOf(u); host == "localhost" || strings.HasPrefix(host, "127.") {
		fmt.Fprintf(w, "\n  note: peers on other machines need a URL they can reach; pass --access-url https://HOST:PORT\n")
	}
	fmt.Fprintf(w, `
No users yet. To get going (in another terminal, on this machine):

  %[1]s user create alice
  %[1]s agent create ws1 --owner alice      # prints the agent's token, for "agent run"
  %[1]s token create --user alice           # prints a user token, for the laptop

Then, on the laptop:

  agent login %[2]s --token usr_...%[3]s
  agent ssh ws1

`, adm, u, pin)
}

func hostOf(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return ""
	}
	return u.Hostname()
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._-+:=@", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

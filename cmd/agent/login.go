package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// loginOptions is `agent login` as parsed from its command line.
type loginOptions struct {
	url          string
	token        string
	tokenFile    string
	fingerprint  string
	insecureHTTP bool
}

func newLoginCmd(env *cliEnv) *cobra.Command {
	return newLoginCmdWith(env, runLogin)
}

// newLoginCmdWith builds the command around runF, so tests can check what
// the command line parses to without a coordinator.
func newLoginCmdWith(env *cliEnv, runF func(context.Context, *cliEnv, *loginOptions) error) *cobra.Command {
	o := &loginOptions{}
	cmd := &cobra.Command{
		Use:   "login URL --token TOKEN [--fingerprint HEX]",
		Short: "Save the coordinator URL and your user token for the client commands",
		Long: `Check a user token against the coordinator and save the URL, the token and
the certificate fingerprint in $XDG_CONFIG_HOME/agent/config.json (mode 0600),
for agent ssh, port-forward, ping and config-ssh. AGENT_URL, AGENT_TOKEN and
AGENT_FINGERPRINT override the saved values.

A coordinator with a self-signed certificate needs --fingerprint: an admin
prints it with "agent admin info" (the coordinator also prints it at start).
The token may come from --token, --token-file, or standard input (--token -).
An http:// URL is refused unless --insecure-http says the token may travel in
cleartext; a pinned fingerprint always needs https://.`,
		Example: `  agent login https://coord.example.com:8443 --token-file ~/agent-token
  agent login https://192.0.2.10:8443 --token - --fingerprint 3f2a...e1 < token.txt`,
		Args: usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.url = strings.TrimRight(strings.TrimSpace(args[0]), "/")
			o.insecureHTTP = o.insecureHTTP || coordclient.InsecureHTTPFromEnv(env.Getenv(coordclient.EnvInsecureHTTP))
			return runF(cmd.Context(), env, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.token, "token", "", `user token ("-" reads it from standard input; visible in the process list otherwise: prefer --token-file)`)
	f.StringVar(&o.tokenFile, "token-file", "", "file holding the user token")
	f.StringVar(&o.fingerprint, "fingerprint", "", "SHA-256 fingerprint of the coordinator's certificate to pin (agent admin info shows it)")
	f.BoolVar(&o.insecureHTTP, "insecure-http", false, "allow an http:// coordinator URL: the token travels in cleartext (env AGENT_INSECURE_HTTP=1); saved for later commands")
	return cmd
}

// runLogin checks the token against the coordinator and saves the profile.
func runLogin(ctx context.Context, env *cliEnv, o *loginOptions) error {
	base, fingerprint := o.url, o.fingerprint
	if fingerprint != "" {
		var err error
		if fingerprint, err = coordclient.NormalizeFingerprint(fingerprint); err != nil {
			return err
		}
	}
	u, err := coordclient.ParseURL(base, fingerprint, o.insecureHTTP)
	if err != nil {
		return err
	}
	tok, err := readLoginToken(env, o.token, o.tokenFile)
	if err != nil {
		return err
	}
	hc, err := coordclient.HTTPClient(fingerprint)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	who, err := coordclient.WhoAmI(ctx, hc, base, fingerprint, o.insecureHTTP, tok)
	if err != nil {
		var unknownCA x509.UnknownAuthorityError
		if fingerprint == "" && u.Scheme == "https" && errors.As(err, &unknownCA) {
			return untrustedCertError(ctx, u, base)
		}
		return err
	}
	if who.Role != protocol.RoleClient {
		return fmt.Errorf("this is the token of agent %s (for agent run); log in with a user token (agent admin token create --user NAME)", who.Name)
	}
	path, err := coordclient.SaveProfile(env.Getenv, coordclient.Profile{URL: base, Token: tok, Fingerprint: fingerprint, InsecureHTTP: o.insecureHTTP})
	if err != nil {
		return err
	}
	exp := ""
	if !who.Expires.IsZero() {
		exp = ", token valid until " + who.Expires.Local().Format(time.RFC3339)
	}
	fmt.Fprintf(env.Stdout, "logged in to %s as %s%s\nsaved to %s\n", base, who.User, exp, path)
	return nil
}

func readLoginToken(env *cliEnv, token, file string) (string, error) {
	switch {
	case file != "" && token != "":
		return "", usageErrorf("pass either --token or --token-file, not both")
	case file != "":
		data, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("reading the token file: %w", err)
		}
		token = string(data)
	case token == "-":
		line, err := bufio.NewReader(env.Stdin).ReadString('\n')
		if err != nil && line == "" {
			return "", fmt.Errorf("reading the token from standard input: %w", err)
		}
		token = line
	case token == "":
		token = env.Getenv(coordclient.EnvToken)
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return "", errors.New("no token: pass --token (or --token-file) with the user token an admin created (agent admin token create --user NAME)")
	}
	return token, nil
}

// untrustedCertError explains what to do about a self-signed certificate,
// showing its fingerprint for the user to compare with the admin's.
func untrustedCertError(ctx context.Context, u *url.URL, base string) error {
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "443")
	}
	d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}} // only to read the fingerprint; nothing is sent
	conn, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return fmt.Errorf("the coordinator's certificate is not signed by a trusted authority; pass --fingerprint (agent admin info shows it)")
	}
	defer conn.Close()
	fp := tailnet.CertFingerprint(conn.(*tls.Conn).ConnectionState().PeerCertificates[0].Raw)
	return fmt.Errorf("the coordinator's certificate is self-signed (not from a trusted authority); its fingerprint is\n  %s\ncompare it with the one \"agent admin info\" shows on the coordinator, then run:\n  agent login %s --token <token> --fingerprint %s", fp, base, fp)
}

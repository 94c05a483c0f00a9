package pgstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ParseURL parses a PostgreSQL URL (or keyword=value string). Its error
// never repeats the input, which holds the password.
func ParseURL(rawURL string) (*pgxpool.Config, error) {
	if strings.TrimSpace(rawURL) == "" {
		return nil, errors.New("no PostgreSQL URL; pass --postgres-url postgres://USER:PASSWORD@HOST:5432/DATABASE (or set AGENT_POSTGRES_URL)")
	}
	cfg, err := pgxpool.ParseConfig(rawURL)
	if err != nil {
		why := "it does not parse"
		var ue *url.Error
		if errors.As(err, &ue) {
			why = ue.Err.Error()
		}
		return nil, fmt.Errorf("the PostgreSQL URL is not valid (%s); want postgres://USER:PASSWORD@HOST:5432/DATABASE", why)
	}
	return cfg, nil
}

// Target names a server and database for messages, without the
// password: "user@host:port database db".
func Target(c *pgx.ConnConfig) string {
	addr := net.JoinHostPort(c.Host, fmt.Sprint(c.Port))
	if strings.HasPrefix(c.Host, "/") {
		addr = fmt.Sprintf("%s/.s.PGSQL.%d", c.Host, c.Port)
	}
	return fmt.Sprintf("%s@%s database %s", c.User, addr, c.Database)
}

// redactedPassword stands where a password was, as net/url's
// URL.Redacted writes it.
const redactedPassword = "xxxxx"

// Redact returns a PostgreSQL URL or keyword=value string with its
// password replaced, for logs and banners.
func Redact(rawURL string) string {
	if u, err := url.Parse(rawURL); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), redactedPassword)
		}
		q := u.Query()
		if q.Has("password") {
			q.Set("password", redactedPassword)
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	if strings.Contains(rawURL, "://") {
		return "(unparsable PostgreSQL URL)"
	}
	return kvPassword.ReplaceAllString(rawURL, "password="+redactedPassword)
}

var kvPassword = regexp.MustCompile(`password\s*=\s*('(\\.|[^'])*'|\S*)`)

// describedError is a database failure worded for a person, keeping the
// driver's error for errors.Is/As.
type describedError struct {
	msg string
	err error
}

func (e *describedError) Error() string { return e.msg }
func (e *describedError) Unwrap() error { return e.err }

// connectError says in one line why the database could not be used.
func connectError(target string, err error) error {
	var de *describedError
	if errors.As(err, &de) {
		return err
	}
	msg := ""
	var pe *pgconn.PgError
	var ne net.Error
	var oe *net.OpError
	switch {
	case errors.As(err, &pe) && pe.Code == "28P01":
		msg = "wrong password for the user in the PostgreSQL URL"
	case errors.As(err, &pe) && pe.Code == "28000":
		msg = "the server refuses this user from here (pg_hba.conf): " + pe.Message
	case errors.As(err, &pe) && pe.Code == "3D000":
		msg = "the database does not exist; create it (createdb) or fix the database name in the URL"
	case errors.As(err, &pe) && (pe.Code == "57P03" || pe.Code == "57P01" || pe.Code == "57P02"):
		msg = "the server is starting up or shutting down"
	case errors.As(err, &pe) && pe.Code == "53300":
		msg = "the server has no free connection slots (max_connections)"
	case errors.As(err, &pe):
		msg = pe.Message + " (SQLSTATE " + pe.Code + ")"
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
		msg = "no answer in time (is the server up, and the host and port right?)"
	case errors.As(err, &oe):
		msg = "cannot reach the server: " + oe.Err.Error()
	default:
		msg = oneLine(err)
	}
	return &describedError{msg: "PostgreSQL " + target + ": " + msg, err: err}
}

// isUnavailable tells a database that cannot be reached, or stopped
// answering, from one that answered with an error about the request.
func isUnavailable(err error) bool {
	if err == nil {
		return false
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		// Class 08: connection exceptions; 57P: operator intervention
		// (shutdown, crash recovery); 53300: too many connections.
		return strings.HasPrefix(pe.Code, "08") || strings.HasPrefix(pe.Code, "57P") || pe.Code == "53300"
	}
	var ce *pgconn.ConnectError
	var ne net.Error
	return errors.As(err, &ce) || errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded) ||
		pgconn.SafeToRetry(err) || errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "conn closed") ||
		strings.Contains(err.Error(), "unexpected EOF")
}

func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

// Package pgstore keeps the coordinator's store in PostgreSQL, so that
// several coordinator replicas share one set of users, agents, grants and
// tokens. It keeps the contract of store.Backend (checked by the same
// tests as the bbolt store). The schema is versioned SQL embedded in the
// binary and applied at Open under an advisory lock, so replicas starting
// together migrate once.
package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// EventsChannel is the NOTIFY channel coordinator replicas listen on.
// Payloads are "<origin> <kind> <args...>"; the store itself sends
// "- access" when a change may take access away (a revoked token, a
// removed grant, a deleted user or agent), in the same transaction.
const EventsChannel = "coord_events"

// notifyAccess tells every replica to re-check access, at commit.
func notifyAccess(ctx context.Context, tx pgx.Tx) error {
	_, err := tx.Exec(ctx, `SELECT pg_notify($1, '- access')`, EventsChannel)
	return err
}

// Options tune a Store. Zero values take defaults.
type Options struct {
	Logger *slog.Logger
	// Now is the clock for token expiry and record times (default: the
	// local clock, UTC), so every replica judges expiry the same way the
	// bbolt store does.
	Now func() time.Time
	// OpTimeout bounds one store operation whose context has no deadline,
	// so a database that stopped answering fails requests instead of
	// hanging them (default 10s).
	OpTimeout time.Duration
	// ConnectTimeout bounds one connection attempt when the URL sets none
	// (default 5s).
	ConnectTimeout time.Duration
}

// Store is a store.Backend on PostgreSQL. It is safe for concurrent use by
// one process, and for several processes sharing the database.
type Store struct {
	pool    *pgxpool.Pool
	logger  *slog.Logger
	now     func() time.Time
	timeout time.Duration
	// target names the server for messages, without the password.
	target string
	// down is set after an operation failed to reach the database, so the
	// outage and the recovery are each logged once, not per request.
	down atomic.Bool
}

var _ store.Backend = (*Store)(nil)

// Open connects, checks the database answers, and brings its schema up to
// this binary's version. Every error is one line naming the cause: a
// malformed URL, an unreachable server, a wrong password, a missing
// database, or a schema newer than this binary.
func Open(ctx context.Context, rawURL string, o Options) (*Store, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = func() time.Time { return time.Now().UTC() }
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = 10 * time.Second
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 5 * time.Second
	}
	cfg, err := ParseURL(rawURL)
	if err != nil {
		return nil, err
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = o.ConnectTimeout
	}
	if !strings.Contains(rawURL, "pool_max_conns") {
		// pgx's default (4 on small machines) is too few for a replica
		// authenticating many peers while it also replicates.
		cfg.MaxConns = 16
	}
	target := Target(cfg.ConnConfig)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, connectError(target, err)
	}
	s := &Store{pool: pool, logger: o.Logger, now: o.Now, timeout: o.OpTimeout, target: target}
	pctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout+o.OpTimeout)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		return nil, connectError(target, err)
	}
	if err := migrate(pctx, pool, o.Logger); err != nil {
		pool.Close()
		if isUnavailable(err) {
			return nil, connectError(target, err)
		}
		return nil, fmt.Errorf("PostgreSQL %s: %w", target, err)
	}
	return s, nil
}

// Close releases the connections.
func (s *Store) Close() error {
	s.pool.Close()
	return nil
}

// Pool is the connection pool, for replica coordination that shares the
// database (package coordinator).
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Describe words a database error in one line, as Open's errors are.
func (s *Store) Describe(err error) string {
	if isUnavailable(err) {
		return connectError(s.target, err).Error()
	}
	return oneLine(err)
}

// Target names the database server for messages, without the password.
func (s *Store) Target() string { return s.target }

// op runs one operation under the caller's context and turns database
// failures into errors a person can act on. A context without a deadline
// gets the operation timeout, so a database that stopped answering fails
// the request instead of hanging it.
func (s *Store) op(ctx context.Context, name string, fn func(ctx context.Context) error) error {
	octx := ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		octx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	err := fn(octx)
	if err != nil && errors.Is(ctx.Err(), context.Canceled) {
		// The caller gave up: that says nothing about the database.
		return fmt.Errorf("%s: %w", name, context.Cause(ctx))
	}
	if err == nil || !isUnavailable(err) {
		if s.down.CompareAndSwap(true, false) {
			s.logger.Info("PostgreSQL answers again", "db", s.target)
		}
		return err
	}
	if s.down.CompareAndSwap(false, true) {
		s.logger.Error("PostgreSQL is unreachable; requests needing the store fail until it is back", "db", s.target, "op", name, "err", oneLine(connectError(s.target, err)))
	}
	return fmt.Errorf("%s: %w: %w", name, store.ErrUnavailable, connectError(s.target, err))
}

// tx runs fn in a transaction, committed if fn returns nil.
func (s *Store) tx(ctx context.Context, name string, fn func(ctx context.Context, tx pgx.Tx) error) error {
	return s.op(ctx, name, func(ctx context.Context) error {
		return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return fn(ctx, tx) })
	})
}

// CreateUser adds a user.
func (s *Store) CreateUser(ctx context.Context, name string) (store.User, error) {
	if err := protocol.ValidUserName(name); err != nil {
		return store.User{}, err
	}
	u := store.User{Name: name, Created: s.now()}
	err := s.op(ctx, "creating a user", func(ctx context.Context) error {
		tag, err := s.pool.Exec(ctx, `INSERT INTO users (name, doc) VALUES ($1, $2) ON CONFLICT DO NOTHING`, name, doc(u))
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("user %q %w", name, store.ErrExists)
		}
		return nil
	})
	return u, err
}

// CreateAgent adds an agent owned by an existing user, with a fresh stable
// ID, and returns it with its first token's secret, all in one
// transaction.
func (s *Store) CreateAgent(ctx context.Context, name, owner string) (store.Agent, string, store.Token, error) {
	if err := protocol.ValidAgentName(name); err != nil {
		return store.Agent{}, "", store.Token{}, err
	}
	var a store.Agent
	var secret string
	var tok store.Token
	for range 8 {
		id, err := store.RandomNodeID()
		if err != nil {
			return store.Agent{}, "", store.Token{}, err
		}
		a = store.Agent{Name: name, Owner: owner, ID: id, Created: s.now()}
		err = s.tx(ctx, "creating an agent", func(ctx context.Context, tx pgx.Tx) error {
			if err := exists(ctx, tx, fmt.Errorf("owner: user %q %w; create the user first", owner, store.ErrNotFound), `SELECT 1 FROM users WHERE name = $1 FOR SHARE`, owner); err != nil {
				return err
			}
			if err := absent(ctx, tx, fmt.Errorf("agent %q %w", name, store.ErrExists), `SELECT 1 FROM agents WHERE name = $1`, name); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO agents (name, id, owner, doc) VALUES ($1, $2, $3, $4)`, name, int64(id), owner, doc(a)); err != nil {
				return err
			}
			var err error
			secret, tok, err = s.createTokenTx(ctx, tx, store.KindAgent, name, time.Time{})
			return err
		})
		switch {
		case isUnique(err, "agents_pkey"):
			// Created by someone else since we looked.
			return store.Agent{}, "", store.Token{}, fmt.Errorf("agent %q %w", name, store.ErrExists)
		case isUnique(err, "agents_id_key"):
			continue // a 1 in 2^62 clash: draw again
		case err != nil:
			return store.Agent{}, "", store.Token{}, err
		}
		return a, secret, tok, nil
	}
	return store.Agent{}, "", store.Token{}, errors.New("could not pick a free agent id")
}

// DeleteAgent removes an agent, its grants and its tokens.
func (s *Store) DeleteAgent(ctx context.Context, name string) error {
	return s.tx(ctx, "deleting an agent", func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `DELETE FROM agents WHERE name = $1`, name)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("agent %q %w", name, store.ErrNotFound)
		}
		if _, err = tx.Exec(ctx, `DELETE FROM tokens WHERE kind = $1 AND subject = $2`, string(store.KindAgent), name); err != nil {
			return err
		}
		return notifyAccess(ctx, tx)
	})
}

// DeleteUser removes a user, their grants and tokens. A user who still
// owns agents cannot be deleted.
func (s *Store) DeleteUser(ctx context.Context, name string) error {
	return s.tx(ctx, "deleting a user", func(ctx context.Context, tx pgx.Tx) error {
		if err := exists(ctx, tx, fmt.Errorf("user %q %w", name, store.ErrNotFound), `SELECT 1 FROM users WHERE name = $1 FOR UPDATE`, name); err != nil {
			return err
		}
		owned, err := strings1(ctx, tx, `SELECT name FROM agents WHERE owner = $1 ORDER BY name COLLATE "C"`, name)
		if err != nil {
			return err
		}
		if len(owned) > 0 {
			return fmt.Errorf("user %q still owns agents %s; delete those first", name, strings.Join(owned, ", "))
		}
		if _, err := tx.Exec(ctx, `DELETE FROM users WHERE name = $1`, name); err != nil {
			return err
		}
		if _, err = tx.Exec(ctx, `DELETE FROM tokens WHERE kind IN ($1, $2) AND subject = $3`, string(store.KindUser), string(store.KindAdmin), name); err != nil {
			return err
		}
		return notifyAccess(ctx, tx)
	})
}

// AddGrant lets user reach agent.
func (s *Store) AddGrant(ctx context.Context, user, agent string) (store.Grant, error) {
	g := store.Grant{User: user, Agent: agent, Created: s.now()}
	err := s.tx(ctx, "adding a grant", func(ctx context.Context, tx pgx.Tx) error {
		if err := exists(ctx, tx, fmt.Errorf("user %q %w", user, store.ErrNotFound), `SELECT 1 FROM users WHERE name = $1 FOR SHARE`, user); err != nil {
			return err
		}
		if err := exists(ctx, tx, fmt.Errorf("agent %q %w", agent, store.ErrNotFound), `SELECT 1 FROM agents WHERE name = $1 FOR SHARE`, agent); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `INSERT INTO grants (user_name, agent, doc) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING`, user, agent, doc(g))
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("grant %s -> %s %w", user, agent, store.ErrExists)
		}
		return nil
	})
	return g, err
}

// RemoveGrant withdraws a grant.
func (s *Store) RemoveGrant(ctx context.Context, user, agent string) error {
	return s.tx(ctx, "removing a grant", func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `DELETE FROM grants WHERE user_name = $1 AND agent = $2`, user, agent)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("grant %s -> %s %w", user, agent, store.ErrNotFound)
		}
		return notifyAccess(ctx, tx)
	})
}

// MayReach returns the agent if user owns it or holds a grant for it.
func (s *Store) MayReach(ctx context.Context, user, agent string) (store.Agent, error) {
	var a store.Agent
	err := s.op(ctx, "checking access", func(ctx context.Context) error {
		var granted bool
		err := s.pool.QueryRow(ctx, `SELECT a.doc, EXISTS (SELECT 1 FROM grants g WHERE g.user_name = $1 AND g.agent = a.name)
			FROM agents a WHERE a.name = $2`, user, agent).Scan(&a, &granted)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("agent %q %w", agent, store.ErrNotFound)
		}
		if err != nil {
			return err
		}
		if a.Owner == user || granted {
			return nil
		}
		return fmt.Errorf("user %q may not reach agent %q: %w", user, agent, store.ErrForbidden)
	})
	return a, err
}

// AgentByID finds an agent by its stable ID.
func (s *Store) AgentByID(ctx context.Context, id tailnet.NodeID) (store.Agent, error) {
	var a store.Agent
	err := s.op(ctx, "finding an agent", func(ctx context.Context) error {
		err := s.pool.QueryRow(ctx, `SELECT doc FROM agents WHERE id = $1`, int64(id)).Scan(&a)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("agent id %d %w", id, store.ErrNotFound)
		}
		return err
	})
	return a, err
}

// IsAgentID reports whether id belongs to a stored agent; true when the
// database cannot tell, so the ID is not handed to a client.
func (s *Store) IsAgentID(ctx context.Context, id tailnet.NodeID) bool {
	found := true
	s.op(ctx, "checking an agent id", func(ctx context.Context) error {
		return s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM agents WHERE id = $1)`, int64(id)).Scan(&found)
	})
	return found
}

// CreateToken makes a new token for an existing user or agent. A zero
// expires means it never expires.
func (s *Store) CreateToken(ctx context.Context, kind store.TokenKind, subject string, expires time.Time) (string, store.Token, error) {
	var secret string
	var tok store.Token
	err := s.tx(ctx, "creating a token", func(ctx context.Context, tx pgx.Tx) error {
		var err error
		secret, tok, err = s.createTokenTx(ctx, tx, kind, subject, expires)
		return err
	})
	return secret, tok, err
}

func (s *Store) createTokenTx(ctx context.Context, tx pgx.Tx, kind store.TokenKind, subject string, expires time.Time) (string, store.Token, error) {
	var prefix string
	switch kind {
	case store.KindAgent:
		prefix = store.AgentTokenPrefix
		if err := exists(ctx, tx, fmt.Errorf("agent %q %w", subject, store.ErrNotFound), `SELECT 1 FROM agents WHERE name = $1 FOR SHARE`, subject); err != nil {
			return "", store.Token{}, err
		}
	case store.KindUser, store.KindAdmin:
		prefix = store.UserTokenPrefix
		if kind == store.KindAdmin {
			prefix = store.AdminTokenPrefix
		}
		if err := exists(ctx, tx, fmt.Errorf("user %q %w", subject, store.ErrNotFound), `SELECT 1 FROM users WHERE name = $1 FOR SHARE`, subject); err != nil {
			return "", store.Token{}, err
		}
	default:
		return "", store.Token{}, fmt.Errorf("unknown token kind %q", kind)
	}
	secret, tok, err := store.MintToken(prefix, kind, subject, s.now(), expires)
	if err != nil {
		return "", store.Token{}, err
	}
	_, err = tx.Exec(ctx, `INSERT INTO tokens (id, hash, kind, subject, doc) VALUES ($1, $2, $3, $4, $5)`,
		tok.ID, tok.Hash, string(tok.Kind), tok.Subject, doc(tok))
	if err != nil {
		return "", store.Token{}, err
	}
	return secret, tok, nil
}

// RevokeToken revokes a token named by its ID or by its secret.
func (s *Store) RevokeToken(ctx context.Context, idOrSecret string) (store.Token, error) {
	var tok store.Token
	err := s.tx(ctx, "revoking a token", func(ctx context.Context, tx pgx.Tx) error {
		q, arg := `SELECT doc FROM tokens WHERE id = $1 FOR UPDATE`, idOrSecret
		bySecret := store.IsTokenSecret(idOrSecret)
		if bySecret {
			q, arg = `SELECT doc FROM tokens WHERE hash = $1 FOR UPDATE`, store.HashToken(idOrSecret)
		}
		err := tx.QueryRow(ctx, q, arg).Scan(&tok)
		if errors.Is(err, pgx.ErrNoRows) {
			if bySecret {
				return fmt.Errorf("token %w", store.ErrNotFound)
			}
			return fmt.Errorf("token %q %w", idOrSecret, store.ErrNotFound)
		}
		if err != nil || !tok.Revoked.IsZero() {
			return err
		}
		tok.Revoked = s.now()
		if _, err = tx.Exec(ctx, `UPDATE tokens SET doc = $2 WHERE id = $1`, tok.ID, doc(tok)); err != nil {
			return err
		}
		return notifyAccess(ctx, tx)
	})
	return tok, err
}

// PinHostKey pins hostKey for an agent token at its first use (trust on
// first use) and records it as the agent's vouched key. With a different
// key already pinned it changes nothing and returns the pinned key with
// ErrIdentityMismatch. Row locks make two replicas racing to pin the same
// token agree on one key.
func (s *Store) PinHostKey(ctx context.Context, tokenID, hostKey string) (string, error) {
	var pinned string
	err := s.tx(ctx, "pinning a host key", func(ctx context.Context, tx pgx.Tx) error {
		var t store.Token
		err := tx.QueryRow(ctx, `SELECT doc FROM tokens WHERE id = $1 FOR UPDATE`, tokenID).Scan(&t)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("token %q %w", tokenID, store.ErrNotFound)
		}
		if err != nil {
			return err
		}
		if t.Kind != store.KindAgent {
			return fmt.Errorf("token %q is not an agent token", tokenID)
		}
		if t.HostKey != "" && t.HostKey != hostKey {
			pinned = t.HostKey
			return store.ErrIdentityMismatch
		}
		var a store.Agent
		err = tx.QueryRow(ctx, `SELECT doc FROM agents WHERE name = $1 FOR UPDATE`, t.Subject).Scan(&a)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("agent %q %w", t.Subject, store.ErrNotFound)
		}
		if err != nil {
			return err
		}
		pinned = hostKey
		if t.HostKey == "" {
			t.HostKey = hostKey
			if _, err := tx.Exec(ctx, `UPDATE tokens SET doc = $2 WHERE id = $1`, t.ID, doc(t)); err != nil {
				return err
			}
		}
		if a.HostKey != hostKey {
			a.HostKey = hostKey
			if _, err := tx.Exec(ctx, `UPDATE agents SET doc = $2 WHERE name = $1`, a.Name, doc(a)); err != nil {
				return err
			}
		}
		return nil
	})
	return pinned, err
}

// ResetIdentity forgets the host key pinned for the agent's tokens, so the
// next registration pins a new one. The agent's vouched key stays until
// then: a connected agent keeps being reachable.
func (s *Store) ResetIdentity(ctx context.Context, agent string) error {
	return s.tx(ctx, "resetting an agent's identity", func(ctx context.Context, tx pgx.Tx) error {
		if err := exists(ctx, tx, fmt.Errorf("agent %q %w", agent, store.ErrNotFound), `SELECT 1 FROM agents WHERE name = $1`, agent); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE tokens SET doc = doc - 'host_key' WHERE kind = $1 AND subject = $2`, string(store.KindAgent), agent)
		return err
	})
}

// principalQuery reads a token with the agent and user it stands for.
const principalQuery = `SELECT t.doc, a.doc, u.doc
	FROM tokens t
	LEFT JOIN agents a ON t.kind = 'agent' AND a.name = t.subject
	LEFT JOIN users u ON u.name = CASE WHEN t.kind = 'agent' THEN a.owner ELSE t.subject END
	WHERE `

// Authenticate returns who a token secret belongs to, or ErrTokenInvalid,
// ErrTokenExpired or ErrTokenRevoked.
func (s *Store) Authenticate(ctx context.Context, secret string) (store.Principal, error) {
	var p store.Principal
	err := s.op(ctx, "checking a token", func(ctx context.Context) error {
		var err error
		p, err = s.principal(ctx, principalQuery+`t.hash = $1`, store.HashToken(secret), store.ErrTokenInvalid)
		return err
	})
	return p, err
}

// CheckToken re-validates a token by ID, for sessions that outlive a
// revocation or an expiry.
func (s *Store) CheckToken(ctx context.Context, id string) error {
	return s.op(ctx, "re-checking a token", func(ctx context.Context) error {
		_, err := s.principal(ctx, principalQuery+`t.id = $1`, id, store.ErrTokenRevoked)
		return err
	})
}

func (s *Store) principal(ctx context.Context, q, arg string, missing error) (store.Principal, error) {
	var p store.Principal
	var agent *store.Agent
	var u *store.User
	err := s.pool.QueryRow(ctx, q, arg).Scan(&p.Token, &agent, &u)
	if errors.Is(err, pgx.ErrNoRows) {
		return p, missing
	}
	if err != nil {
		return p, err
	}
	t := p.Token
	if !t.Revoked.IsZero() {
		return p, store.ErrTokenRevoked
	}
	if !t.Expires.IsZero() && !s.now().Before(t.Expires) {
		return p, store.ErrTokenExpired
	}
	if t.Kind == store.KindAgent {
		if agent == nil {
			return p, store.ErrTokenRevoked
		}
		p.Agent = agent
	}
	if u == nil {
		return p, store.ErrTokenRevoked
	}
	p.User = *u
	return p, nil
}

// List returns everything, sorted as the bbolt store sorts it.
func (s *Store) List(ctx context.Context) (store.Snapshot, error) {
	var snap store.Snapshot
	err := s.op(ctx, "listing the store", func(ctx context.Context) error {
		// One snapshot of the database, as bbolt's read transaction is.
		return pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
			var err error
			if snap.Users, err = docs[store.User](ctx, tx, `SELECT doc FROM users ORDER BY name COLLATE "C"`); err != nil {
				return err
			}
			if snap.Agents, err = docs[store.Agent](ctx, tx, `SELECT doc FROM agents ORDER BY name COLLATE "C"`); err != nil {
				return err
			}
			if snap.Grants, err = docs[store.Grant](ctx, tx, `SELECT doc FROM grants ORDER BY user_name COLLATE "C", agent COLLATE "C"`); err != nil {
				return err
			}
			snap.Tokens, err = docs[store.Token](ctx, tx, `SELECT doc FROM tokens ORDER BY id COLLATE "C"`)
			return err
		})
	})
	slices.SortStableFunc(snap.Tokens, func(a, b store.Token) int {
		if c := strings.Compare(a.Subject, b.Subject); c != 0 {
			return c
		}
		return a.Created.Compare(b.Created)
	})
	return snap, err
}

// Secret returns the named random secret, creating it on first use; every
// replica gets the same one.
func (s *Store) Secret(ctx context.Context, name string) ([]byte, error) {
	fresh, err := store.RandomSecret()
	if err != nil {
		return nil, err
	}
	var secret []byte
	err = s.op(ctx, "reading a secret", func(ctx context.Context) error {
		if _, err := s.pool.Exec(ctx, `INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING`, name, fresh); err != nil {
			return err
		}
		return s.pool.QueryRow(ctx, `SELECT value FROM secrets WHERE name = $1`, name).Scan(&secret)
	})
	return secret, err
}

// doc is a record as its JSON document column.
func doc(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("pgstore: encoding %T: %v", v, err)) // records are plain structs
	}
	return b
}

// exists reports whether q returns a row; errNotFound (a message naming
// what is missing) when it does not.
func exists(ctx context.Context, tx pgx.Tx, missing error, q string, args ...any) error {
	var one int
	err := tx.QueryRow(ctx, q, args...).Scan(&one)
	if errors.Is(err, pgx.ErrNoRows) {
		return missing
	}
	return err
}

// absent is the opposite of exists: present names what is in the way.
func absent(ctx context.Context, tx pgx.Tx, present error, q string, args ...any) error {
	var one int
	err := tx.QueryRow(ctx, q, args...).Scan(&one)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return nil
	case err == nil:
		return present
	}
	return err
}

func strings1(ctx context.Context, tx pgx.Tx, q string, args ...any) ([]string, error) {
	rows, _ := tx.Query(ctx, q, args...)
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

func docs[T any](ctx context.Context, tx pgx.Tx, q string) ([]T, error) {
	rows, _ := tx.Query(ctx, q)
	out, err := pgx.CollectRows(rows, pgx.RowTo[T])
	if len(out) == 0 {
		out = nil // as the bbolt store: empty lists are nil
	}
	return out, err
}

func isUnique(err error, constraint string) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505" && pe.ConstraintName == constraint
}

// Package store keeps the coordinator's users, agents, grants and tokens.
// Backend is the contract; Store, in this package, keeps them in one bbolt
// file (the default), and package pgstore in PostgreSQL. Tokens are random, shown once, and stored only as SHA-256
// hashes. bbolt holds an exclusive lock on the file, so only one process
// (the running coordinator, or the admin CLI when none runs) opens it.
package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// FileName is the store's file inside the coordinator's data directory.
const FileName = "coordinator.db"

// Token prefixes, so that people (and secret scanners) can tell tokens apart.
const (
	AgentTokenPrefix = "agt_"
	UserTokenPrefix  = "usr_"
	AdminTokenPrefix = "adm_"
)

// IsTokenSecret reports whether s looks like a token secret rather than a
// token ID, by its prefix.
func IsTokenSecret(s string) bool {
	return strings.HasPrefix(s, AgentTokenPrefix) || strings.HasPrefix(s, UserTokenPrefix) || strings.HasPrefix(s, AdminTokenPrefix)
}

// tokenBytes is the amount of randomness in a token.
const tokenBytes = 32

// Errors callers tell apart.
var (
	ErrLocked       = errors.New("the store is locked by another process (is the coordinator running?)")
	ErrExists       = errors.New("already exists")
	ErrNotFound     = errors.New("not found")
	ErrTokenInvalid = errors.New("token is not valid")
	ErrTokenExpired = errors.New("token has expired")
	ErrTokenRevoked = errors.New("token has been revoked")
	ErrForbidden    = errors.New("no grant")
)

var (
	bucketMeta       = []byte("meta")
	bucketUsers      = []byte("users")
	bucketAgents     = []byte("agents")
	bucketAgentIDs   = []byte("agent_ids")
	bucketGrants     = []byte("grants")
	bucketTokens     = []byte("tokens")
	bucketTokenIndex = []byte("token_hashes")
)

// User is a person who reaches agents with a client.
type User struct {
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
}

// Agent is a workspace agent. Its ID, and so its tailnet address, never
// changes.
type Agent struct {
	Name    string         `json:"name"`
	Owner   string         `json:"owner"`
	ID      tailnet.NodeID `json:"id"`
	Created time.Time      `json:"created"`
	// HostKey is the SSH host key (authorized_keys format) the agent last
	// proved holding: the one clients are told to expect. Empty until the
	// agent first registers, and after ResetIdentity.
	HostKey string `json:"host_key,omitempty"`
}

// Grant lets a user reach an agent. The owner of an agent needs none.
type Grant struct {
	User    string    `json:"user"`
	Agent   string    `json:"agent"`
	Created time.Time `json:"created"`
}

// TokenKind says whom a token authenticates.
type TokenKind string

const (
	KindAgent TokenKind = "agent"
	KindUser  TokenKind = "user"
	// KindAdmin administers the coordinator over HTTPS (agent admin
	// --url); its subject is the user who holds it. It cannot join the
	// tailnet.
	KindAdmin TokenKind = "admin"
)

// Token describes a token; the secret itself is never stored.
type Token struct {
	// ID names the token for listing and revocation; it is not secret.
	ID      string    `json:"id"`
	Kind    TokenKind `json:"kind"`
	Subject string    `json:"subject"` // agent or user name (the holder, for admin tokens)
	Created time.Time `json:"created"`
	// Expires is zero for a token that does not expire.
	Expires time.Time `json:"expires,omitzero"`
	Revoked time.Time `json:"revoked,omitzero"`
	Hash    string    `json:"hash"` // hex SHA-256 of the secret
	// HostKey, for agent tokens, is the SSH host key pinned at the
	// token's first use: the token is good only with that key.
	HostKey string `json:"host_key,omitempty"`
}

// Principal is who a valid token belongs to.
type Principal struct {
	Token Token
	// User is the user (user tokens) or the agent's owner (agent tokens).
	User  User
	Agent *Agent // agent tokens only
}

// Store is the opened database.
type Store struct {
	db  *bolt.DB
	now func() time.Time
}

// Open opens (creating if needed) the store file in dataDir. It fails fast
// with ErrLocked when another process holds the file.
func Open(dataDir string) (*Store, error) {
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data directory: %w", err)
	}
	path := filepath.Join(dataDir, FileName)
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("opening %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketUsers, bucketAgents, bucketAgentIDs, bucketGrants, bucketTokens, bucketTokenIndex} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising %s: %w", path, err)
	}
	return &Store{db: db, now: func() time.Time { return time.Now().UTC() }}, nil
}

// Close releases the file.
func (s *Store) Close() error { return s.db.Close() }

// update and view run a bbolt transaction unless ctx is already done:
// bbolt cannot stop one midway, and none runs long.
func (s *Store) update(ctx context.Context, fn func(*bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.Update(fn)
}

func (s *Store) view(ctx context.Context, fn func(*bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.View(fn)
}

// CreateUser adds a user.
func (s *Store) CreateUser(ctx context.Context, name string) (User, error) {
	if err := protocol.ValidUserName(name); err != nil {
		return User{}, err
	}
	u := User{Name: name, Created: s.now()}
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketUsers)
		if b.Get([]byte(name)) != nil {
			return fmt.Errorf("user %q %w", name, ErrExists)
		}
		return putJSON(b, name, u)
	})
	return u, err
}

// CreateAgent adds an agent owned by an existing user, with a fresh stable
// ID, and returns it with its first token's secret.
func (s *Store) CreateAgent(ctx context.Context, name, owner string) (Agent, string, Token, error) {
	if err := protocol.ValidAgentName(name); err != nil {
		return Agent{}, "", Token{}, err
	}
	var a Agent
	var secret string
	var tok Token
	err := s.update(ctx, func(tx *bolt.Tx) error {
		if tx.Bucket(bucketUsers).Get([]byte(owner)) == nil {
			return fmt.Errorf("owner: user %q %w; create the user first", owner, ErrNotFound)
		}
		b := tx.Bucket(bucketAgents)
		if b.Get([]byte(name)) != nil {
			return fmt.Errorf("agent %q %w", name, ErrExists)
		}
		ids := tx.Bucket(bucketAgentIDs)
		for {
			id, err := RandomNodeID()
			if err != nil {
				return err
			}
			if ids.Get(idKey(id)) == nil {
				a = Agent{Name: name, Owner: owner, ID: id, Created: s.now()}
				break
			}
		}
		if err := ids.Put(idKey(a.ID), []byte(name)); err != nil {
			return err
		}
		if err := putJSON(b, name, a); err != nil {
			return err
		}
		var err error
		secret, tok, err = s.createTokenTx(tx, KindAgent, name, time.Time{})
		return err
	})
	if err != nil {
		return Agent{}, "", Token{}, err
	}
	return a, secret, tok, nil
}

// DeleteAgent removes an agent, its grants and its tokens.
func (s *Store) DeleteAgent(ctx context.Context, name string) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		var a Agent
		if err := getJSON(tx.Bucket(bucketAgents), name, &a); err != nil {
			return fmt.Errorf("agent %q %w", name, err)
		}
		if err := tx.Bucket(bucketAgents).Delete([]byte(name)); err != nil {
			return err
		}
		if err := tx.Bucket(bucketAgentIDs).Delete(idKey(a.ID)); err != nil {
			return err
		}
		if err := deleteWhere(tx.Bucket(bucketGrants), func(v []byte) bool {
			var g Grant
			return json.Unmarshal(v, &g) == nil && g.Agent == name
		}); err != nil {
			return err
		}
		return s.deleteTokensTx(tx, KindAgent, name)
	})
}

// DeleteUser removes a user, their grants and tokens. A user who still owns
// agents cannot be deleted.
func (s *Store) DeleteUser(ctx context.Context, name string) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		if tx.Bucket(bucketUsers).Get([]byte(name)) == nil {
			return fmt.Errorf("user %q %w", name, ErrNotFound)
		}
		var owned []string
		tx.Bucket(bucketAgents).ForEach(func(_, v []byte) error {
			var a Agent
			if json.Unmarshal(v, &a) == nil && a.Owner == name {
				owned = append(owned, a.Name)
			}
			return nil
		})
		if len(owned) > 0 {
			return fmt.Errorf("user %q still owns agents %s; delete those first", name, strings.Join(owned, ", "))
		}
		if err := tx.Bucket(bucketUsers).Delete([]byte(name)); err != nil {
			return err
		}
		if err := deleteWhere(tx.Bucket(bucketGrants), func(v []byte) bool {
			var g Grant
			return json.Unmarshal(v, &g) == nil && g.User == name
		}); err != nil {
			return err
		}
		if err := s.deleteTokensTx(tx, KindAdmin, name); err != nil {
			return err
		}
		return s.deleteTokensTx(tx, KindUser, name)
	})
}

// AddGrant lets user reach agent.
func (s *Store) AddGrant(ctx context.Context, user, agent string) (Grant, error) {
	g := Grant{User: user, Agent: agent, Created: s.now()}
	err := s.update(ctx, func(tx *bolt.Tx) error {
		if tx.Bucket(bucketUsers).Get([]byte(user)) == nil {
			return fmt.Errorf("user %q %w", user, ErrNotFound)
		}
		if tx.Bucket(bucketAgents).Get([]byte(agent)) == nil {
			return fmt.Errorf("agent %q %w", agent, ErrNotFound)
		}
		b := tx.Bucket(bucketGrants)
		if b.Get(grantKey(user, agent)) != nil {
			return fmt.Errorf("grant %s -> %s %w", user, agent, ErrExists)
		}
		return putJSON(b, string(grantKey(user, agent)), g)
	})
	return g, err
}

// RemoveGrant withdraws a grant.
func (s *Store) RemoveGrant(ctx context.Context, user, agent string) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketGrants)
		if b.Get(grantKey(user, agent)) == nil {
			return fmt.Errorf("grant %s -> %s %w", user, agent, ErrNotFound)
		}
		return b.Delete(grantKey(user, agent))
	})
}

// MayReach returns the agent if user owns it or holds a grant for it.
func (s *Store) MayReach(ctx context.Context, user, agent string) (Agent, error) {
	var a Agent
	err := s.view(ctx, func(tx *bolt.Tx) error {
		if err := getJSON(tx.Bucket(bucketAgents), agent, &a); err != nil {
			return fmt.Errorf("agent %q %w", agent, err)
		}
		if a.Owner == user || tx.Bucket(bucketGrants).Get(grantKey(user, agent)) != nil {
			return nil
		}
		return fmt.Errorf("user %q may not reach agent %q: %w", user, agent, ErrForbidden)
	})
	return a, err
}

// AgentByID finds an agent by its stable ID.
func (s *Store) AgentByID(ctx context.Context, id tailnet.NodeID) (Agent, error) {
	var a Agent
	err := s.view(ctx, func(tx *bolt.Tx) error {
		name := tx.Bucket(bucketAgentIDs).Get(idKey(id))
		if name == nil {
			return fmt.Errorf("agent id %d %w", id, ErrNotFound)
		}
		return getJSON(tx.Bucket(bucketAgents), string(name), &a)
	})
	return a, err
}

// CreateToken makes a new token for an existing user or agent. A zero
// expires means it never expires.
func (s *Store) CreateToken(ctx context.Context, kind TokenKind, subject string, expires time.Time) (string, Token, error) {
	var secret string
	var tok Token
	err := s.update(ctx, func(tx *bolt.Tx) error {
		var err error
		secret, tok, err = s.createTokenTx(tx, kind, subject, expires)
		return err
	})
	return secret, tok, err
}

func (s *Store) createTokenTx(tx *bolt.Tx, kind TokenKind, subject string, expires time.Time) (string, Token, error) {
	var prefix string
	switch kind {
	case KindAgent:
		prefix = AgentTokenPrefix
		if tx.Bucket(bucketAgents).Get([]byte(subject)) == nil {
			return "", Token{}, fmt.Errorf("agent %q %w", subject, ErrNotFound)
		}
	case KindUser, KindAdmin:
		prefix = UserTokenPrefix
		if kind == KindAdmin {
			prefix = AdminTokenPrefix
		}
		if tx.Bucket(bucketUsers).Get([]byte(subject)) == nil {
			return "", Token{}, fmt.Errorf("user %q %w", subject, ErrNotFound)
		}
	default:
		return "", Token{}, fmt.Errorf("unknown token kind %q", kind)
	}
	secret, tok, err := MintToken(prefix, kind, subject, s.now(), expires)
	if err != nil {
		return "", Token{}, err
	}
	if err := putJSON(tx.Bucket(bucketTokens), tok.ID, tok); err != nil {
		return "", Token{}, err
	}
	if err := tx.Bucket(bucketTokenIndex).Put([]byte(tok.Hash), []byte(tok.ID)); err != nil {
		return "", Token{}, err
	}
	return secret, tok, nil
}

// RevokeToken revokes a token named by its ID or by its secret.
func (s *Store) RevokeToken(ctx context.Context, idOrSecret string) (Token, error) {
	var tok Token
	err := s.update(ctx, func(tx *bolt.Tx) error {
		id := idOrSecret
		if IsTokenSecret(idOrSecret) {
			v := tx.Bucket(bucketTokenIndex).Get([]byte(HashToken(idOrSecret)))
			if v == nil {
				return fmt.Errorf("token %w", ErrNotFound)
			}
			id = string(v)
		}
		b := tx.Bucket(bucketTokens)
		if err := getJSON(b, id, &tok); err != nil {
			return fmt.Errorf("token %q %w", id, err)
		}
		if !tok.Revoked.IsZero() {
			return nil
		}
		tok.Revoked = s.now()
		return putJSON(b, tok.ID, tok)
	})
	return tok, err
}

// Authenticate returns who a token secret belongs to, or ErrTokenInvalid,
// ErrTokenExpired or ErrTokenRevoked.
func (s *Store) Authenticate(ctx context.Context, secret string) (Principal, error) {
	var p Principal
	err := s.view(ctx, func(tx *bolt.Tx) error {
		id := tx.Bucket(bucketTokenIndex).Get([]byte(HashToken(secret)))
		if id == nil {
			return ErrTokenInvalid
		}
		if err := getJSON(tx.Bucket(bucketTokens), string(id), &p.Token); err != nil {
			return ErrTokenInvalid
		}
		return s.principalTx(tx, &p)
	})
	return p, err
}

// CheckToken re-validates a token by ID, for sessions that outlive a
// revocation or an expiry.
func (s *Store) CheckToken(ctx context.Context, id string) error {
	return s.view(ctx, func(tx *bolt.Tx) error {
		var p Principal
		if err := getJSON(tx.Bucket(bucketTokens), id, &p.Token); err != nil {
			return ErrTokenRevoked
		}
		return s.principalTx(tx, &p)
	})
}

func (s *Store) principalTx(tx *bolt.Tx, p *Principal) error {
	t := p.Token
	if !t.Revoked.IsZero() {
		return ErrTokenRevoked
	}
	if !t.Expires.IsZero() && !s.now().Before(t.Expires) {
		return ErrTokenExpired
	}
	userName := t.Subject
	if t.Kind == KindAgent {
		var a Agent
		if err := getJSON(tx.Bucket(bucketAgents), t.Subject, &a); err != nil {
			return ErrTokenRevoked
		}
		p.Agent = &a
		userName = a.Owner
	}
	if err := getJSON(tx.Bucket(bucketUsers), userName, &p.User); err != nil {
		return ErrTokenRevoked
	}
	return nil
}

// ErrIdentityMismatch: an agent token was used with a host key other than
// the one pinned for it.
var ErrIdentityMismatch = errors.New("host key differs from the pinned one")

// PinHostKey pins hostKey for an agent token at its first use (trust on
// first use) and records it as the agent's vouched key. With a different
// key already pinned it changes nothing and returns the pinned key with
// ErrIdentityMismatch.
func (s *Store) PinHostKey(ctx context.Context, tokenID, hostKey string) (pinned string, err error) {
	// The common case, a known agent reconnecting, needs no write.
	done := false
	err = s.view(ctx, func(tx *bolt.Tx) error {
		var t Token
		var a Agent
		if getJSON(tx.Bucket(bucketTokens), tokenID, &t) != nil || t.Kind != KindAgent || t.HostKey == "" {
			return nil
		}
		if t.HostKey != hostKey {
			pinned, done = t.HostKey, true
			return ErrIdentityMismatch
		}
		if getJSON(tx.Bucket(bucketAgents), t.Subject, &a) == nil && a.HostKey == hostKey {
			pinned, done = hostKey, true
		}
		return nil
	})
	if done {
		return pinned, err
	}
	err = s.update(ctx, func(tx *bolt.Tx) error {
		var t Token
		if err := getJSON(tx.Bucket(bucketTokens), tokenID, &t); err != nil {
			return fmt.Errorf("token %q %w", tokenID, err)
		}
		if t.Kind != KindAgent {
			return fmt.Errorf("token %q is not an agent token", tokenID)
		}
		if t.HostKey != "" && t.HostKey != hostKey {
			pinned = t.HostKey
			return ErrIdentityMismatch
		}
		var a Agent
		if err := getJSON(tx.Bucket(bucketAgents), t.Subject, &a); err != nil {
			return fmt.Errorf("agent %q %w", t.Subject, err)
		}
		pinned = hostKey
		if t.HostKey == "" {
			t.HostKey = hostKey
			if err := putJSON(tx.Bucket(bucketTokens), t.ID, t); err != nil {
				return err
			}
		}
		if a.HostKey != hostKey {
			a.HostKey = hostKey
			return putJSON(tx.Bucket(bucketAgents), a.Name, a)
		}
		return nil
	})
	return pinned, err
}

// ResetIdentity forgets the host key pinned for the agent's tokens, so the
// next registration pins a new one. The agent's vouched key stays until
// then: a connected agent keeps being reachable.
func (s *Store) ResetIdentity(ctx context.Context, agent string) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		if tx.Bucket(bucketAgents).Get([]byte(agent)) == nil {
			return fmt.Errorf("agent %q %w", agent, ErrNotFound)
		}
		var toks []Token
		tx.Bucket(bucketTokens).ForEach(func(_, v []byte) error {
			var t Token
			if json.Unmarshal(v, &t) == nil && t.Kind == KindAgent && t.Subject == agent && t.HostKey != "" {
				toks = append(toks, t)
			}
			return nil
		})
		for _, t := range toks {
			t.HostKey = ""
			if err := putJSON(tx.Bucket(bucketTokens), t.ID, t); err != nil {
				return err
			}
		}
		return nil
	})
}

// Snapshot is everything in the store, for listing.
type Snapshot struct {
	Users  []User  `json:"users"`
	Agents []Agent `json:"agents"`
	Grants []Grant `json:"grants"`
	Tokens []Token `json:"tokens"`
}

// List returns everything, sorted by name.
func (s *Store) List(ctx context.Context) (Snapshot, error) {
	var snap Snapshot
	err := s.view(ctx, func(tx *bolt.Tx) error {
		if err := allJSON(tx.Bucket(bucketUsers), &snap.Users); err != nil {
			return err
		}
		if err := allJSON(tx.Bucket(bucketAgents), &snap.Agents); err != nil {
			return err
		}
		if err := allJSON(tx.Bucket(bucketGrants), &snap.Grants); err != nil {
			return err
		}
		if err := allJSON(tx.Bucket(bucketTokens), &snap.Tokens); err != nil {
			return err
		}
		slices.SortFunc(snap.Tokens, func(a, b Token) int {
			if c := strings.Compare(a.Subject, b.Subject); c != 0 {
				return c
			}
			return a.Created.Compare(b.Created)
		})
		return nil
	})
	return snap, err
}

// Secret returns the named random secret, creating it on first use. The
// coordinator signs resume tokens with one, so they survive its restarts.
func (s *Store) Secret(ctx context.Context, name string) ([]byte, error) {
	var secret []byte
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		key := []byte("secret/" + name)
		if v := b.Get(key); v != nil {
			secret = slices.Clone(v)
			return nil
		}
		secret = make([]byte, 32)
		if _, err := rand.Read(secret); err != nil {
			return err
		}
		return b.Put(key, secret)
	})
	return secret, err
}

// IsAgentID reports whether id belongs to a stored agent.
func (s *Store) IsAgentID(ctx context.Context, id tailnet.NodeID) bool {
	found := true // as the contract says when it cannot tell
	s.view(ctx, func(tx *bolt.Tx) error {
		found = tx.Bucket(bucketAgentIDs).Get(idKey(id)) != nil
		return nil
	})
	return found
}

// MintToken makes a new token secret and its stored description. It does
// not check that the subject exists; the store does, in the same
// transaction that saves the token.
func MintToken(prefix string, kind TokenKind, subject string, now, expires time.Time) (string, Token, error) {
	if !expires.IsZero() && !expires.After(now) {
		return "", Token{}, fmt.Errorf("expiry %s is not in the future", expires.Format(time.RFC3339))
	}
	raw := make([]byte, tokenBytes)
	if _, err := rand.Read(raw); err != nil {
		return "", Token{}, fmt.Errorf("reading randomness: %w", err)
	}
	secret := prefix + base64.RawURLEncoding.EncodeToString(raw)
	idRaw := make([]byte, 6)
	if _, err := rand.Read(idRaw); err != nil {
		return "", Token{}, fmt.Errorf("reading randomness: %w", err)
	}
	return secret, Token{
		ID:      "tok_" + hex.EncodeToString(idRaw),
		Kind:    kind,
		Subject: subject,
		Created: now,
		Expires: expires.UTC(),
		Hash:    HashToken(secret),
	}, nil
}

// HashToken is the stored form of a token secret.
func HashToken(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// RandomNodeID returns a random node ID in [1, 2^62), leaving room below
// the int64 limit Tailscale's node IDs have.
func RandomNodeID() (tailnet.NodeID, error) {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, fmt.Errorf("reading randomness: %w", err)
		}
		id := tailnet.NodeID(binary.BigEndian.Uint64(b[:]) >> 2)
		if id != 0 {
			return id, nil
		}
	}
}

func (s *Store) deleteTokensTx(tx *bolt.Tx, kind TokenKind, subject string) error {
	var del []Token
	tx.Bucket(bucketTokens).ForEach(func(_, v []byte) error {
		var t Token
		if json.Unmarshal(v, &t) == nil && t.Kind == kind && t.Subject == subject {
			del = append(del, t)
		}
		return nil
	})
	for _, t := range del {
		if err := tx.Bucket(bucketTokens).Delete([]byte(t.ID)); err != nil {
			return err
		}
		if err := tx.Bucket(bucketTokenIndex).Delete([]byte(t.Hash)); err != nil {
			return err
		}
	}
	return nil
}

func idKey(id tailnet.NodeID) []byte {
	return binary.BigEndian.AppendUint64(nil, uint64(id))
}

func grantKey(user, agent string) []byte { return []byte(user + "\x00" + agent) }

func putJSON(b *bolt.Bucket, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), data)
}

func getJSON(b *bolt.Bucket, key string, v any) error {
	data := b.Get([]byte(key))
	if data == nil {
		return ErrNotFound
	}
	return json.Unmarshal(data, v)
}

func allJSON[T any](b *bolt.Bucket, out *[]T) error {
	return b.ForEach(func(_, v []byte) error {
		var item T
		if err := json.Unmarshal(v, &item); err != nil {
			return err
		}
		*out = append(*out, item)
		return nil
	})
}

func deleteWhere(b *bolt.Bucket, match func(v []byte) bool) error {
	var keys [][]byte
	b.ForEach(func(k, v []byte) error {
		if match(v) {
			keys = append(keys, slices.Clone(k))
		}
		return nil
	})
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

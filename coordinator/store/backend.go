package store

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/agentd/agent/tailnet"
)

// Backend is what the coordinator and the admin API need from a store. Two
// implementations keep the same contract (package storetest checks it):
// the embedded bbolt file (*Store, one process, the default) and
// PostgreSQL (package pgstore, shared by several coordinator replicas).
// Every operation takes the context of the request it serves: cancelling
// it abandons the operation, and its deadline bounds the wait for a
// database that stopped answering.
type Backend interface {
	CreateUser(ctx context.Context, name string) (User, error)
	DeleteUser(ctx context.Context, name string) error
	CreateAgent(ctx context.Context, name, owner string) (Agent, string, Token, error)
	DeleteAgent(ctx context.Context, name string) error
	AgentByID(ctx context.Context, id tailnet.NodeID) (Agent, error)
	// IsAgentID reports whether id belongs to a stored agent. A store that
	// cannot tell (database unreachable) says true, so the ID is not
	// handed out.
	IsAgentID(ctx context.Context, id tailnet.NodeID) bool
	AddGrant(ctx context.Context, user, agent string) (Grant, error)
	RemoveGrant(ctx context.Context, user, agent string) error
	MayReach(ctx context.Context, user, agent string) (Agent, error)
	CreateToken(ctx context.Context, kind TokenKind, subject string, expires time.Time) (string, Token, error)
	RevokeToken(ctx context.Context, idOrSecret string) (Token, error)
	Authenticate(ctx context.Context, secret string) (Principal, error)
	CheckToken(ctx context.Context, id string) error
	// PinHostKey pins an agent token's SSH host key at its first use and
	// records it as the agent's vouched key; a different key later is
	// ErrIdentityMismatch, with the pinned key returned.
	PinHostKey(ctx context.Context, tokenID, hostKey string) (pinned string, err error)
	// ResetIdentity forgets the host keys pinned for an agent's tokens.
	ResetIdentity(ctx context.Context, agent string) error
	List(ctx context.Context) (Snapshot, error)
	Secret(ctx context.Context, name string) ([]byte, error)
	Close() error
}

// ErrUnavailable wraps failures to reach the store (a database that is
// down or unreachable): the request may succeed if retried, and says
// nothing about the token or record it was about.
var ErrUnavailable = errors.New("the coordinator's database is unavailable")

var _ Backend = (*Store)(nil)

// RandomSecret returns 32 random bytes, for Secret.
func RandomSecret() ([]byte, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("reading randomness: %w", err)
	}
	return b, nil
}

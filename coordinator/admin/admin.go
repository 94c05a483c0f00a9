// Package admin is the coordinator's administration API: the operations on
// users, agents, grants and tokens, served by a running coordinator on a
// unix socket in its data directory, or run directly on the store file when
// no coordinator runs (bbolt lets only one process open it).
package admin

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// SocketName is the admin socket inside the data directory.
const SocketName = "admin.sock"

// SocketPath returns the admin socket of a data directory.
func SocketPath(dataDir string) string { return filepath.Join(dataDir, SocketName) }

// Ops is everything an admin can do.
type Ops interface {
	CreateUser(ctx context.Context, name string) (store.User, error)
	DeleteUser(ctx context.Context, name string) error
	CreateAgent(ctx context.Context, name, owner string) (AgentCreated, error)
	DeleteAgent(ctx context.Context, name string) error
	// ResetIdentity forgets the SSH host key pinned for the agent's
	// tokens; the next agent to register with one pins its own.
	ResetIdentity(ctx context.Context, name string) error
	AddGrant(ctx context.Context, user, agent string) (store.Grant, error)
	RemoveGrant(ctx context.Context, user, agent string) error
	CreateToken(ctx context.Context, kind store.TokenKind, subject string, expires time.Time) (TokenCreated, error)
	RevokeToken(ctx context.Context, idOrSecret string) (store.Token, error)
	List(ctx context.Context) (store.Snapshot, error)
	Info(ctx context.Context) (Info, error)
}

// AgentCreated is a new agent with its first token. Secret is shown once.
type AgentCreated struct {
	Agent   store.Agent  `json:"agent"`
	Address netip.Prefix `json:"address"`
	Token   store.Token  `json:"token"`
	Secret  string       `json:"secret"`
}

// TokenCreated is a new token. Secret is shown once.
type TokenCreated struct {
	Token  store.Token `json:"token"`
	Secret string      `json:"secret"`
}

// Info describes the coordinator.
type Info struct {
	// Running is true when the answer came from a running coordinator.
	Running     bool   `json:"running"`
	DataDir     string `json:"data_dir"`
	Fingerprint string `json:"fingerprint,omitempty"`
	// URL is the access URL peers use (or the listen address when none is
	// configured).
	URL   string     `json:"url,omitempty"`
	STUN  string     `json:"stun,omitempty"`
	Peers []PeerInfo `json:"peers,omitempty"`
}

// PeerInfo is one connected peer.
type PeerInfo struct {
	NodeID    tailnet.NodeID `json:"node_id"`
	Role      protocol.Role  `json:"role"`
	Name      string         `json:"name"`
	User      string         `json:"user"`
	Since     time.Time      `json:"since"`
	Remote    string         `json:"remote"`
	HasNode   bool           `json:"has_node"`
	HomeDERP  int            `json:"home_derp,omitempty"`
	Endpoints int            `json:"endpoints,omitempty"`
	Tunnels   []string       `json:"tunnels,omitempty"`
	// Network is an agent's latest network self-check verdict.
	Network *protocol.NetworkVerdict `json:"network,omitempty"`
}

// Local runs the operations on an open store. Changed, if set, is called
// after every change that can take access away, so a running coordinator
// can drop sessions and tunnels that are no longer allowed.
type Local struct {
	Store   store.Backend
	InfoFn  func() Info
	Changed func()
}

func (l *Local) changed() {
	if l.Changed != nil {
		l.Changed()
	}
}

func (l *Local) CreateUser(ctx context.Context, name string) (store.User, error) {
	return l.Store.CreateUser(ctx, name)
}

func (l *Local) DeleteUser(ctx context.Context, name string) error {
	err := l.Store.DeleteUser(ctx, name)
	if err == nil {
		l.changed()
	}
	return err
}

func (l *Local) CreateAgent(ctx context.Context, name, owner string) (AgentCreated, error) {
	a, secret, tok, err := l.Store.CreateAgent(ctx, name, owner)
	if err != nil {
		return AgentCreated{}, err
	}
	return AgentCreated{Agent: a, Address: protocol.AgentAddress(a.ID), Token: tok, Secret: secret}, nil
}

func (l *Local) DeleteAgent(ctx context.Context, name string) error {
	err := l.Store.DeleteAgent(ctx, name)
	if err == nil {
		l.changed()
	}
	return err
}

func (l *Local) ResetIdentity(ctx context.Context, name string) error {
	return l.Store.ResetIdentity(ctx, name)
}

func (l *Local) AddGrant(ctx context.Context, user, agent string) (store.Grant, error) {
	return l.Store.AddGrant(ctx, user, agent)
}

func (l *Local) RemoveGrant(ctx context.Context, user, agent string) error {
	err := l.Store.RemoveGrant(ctx, user, agent)
	if err == nil {
		l.changed()
	}
	return err
}

func (l *Local) CreateToken(ctx context.Context, kind store.TokenKind, subject string, expires time.Time) (TokenCreated, error) {
	secret, tok, err := l.Store.CreateToken(ctx, kind, subject, expires)
	if err != nil {
		return TokenCreated{}, err
	}
	return TokenCreated{Token: tok, Secret: secret}, nil
}

func (l *Local) RevokeToken(ctx context.Context, idOrSecret string) (store.Token, error) {
	t, err := l.Store.RevokeToken(ctx, idOrSecret)
	if err == nil {
		l.changed()
	}
	return t, err
}

func (l *Local) List(ctx context.Context) (store.Snapshot, error) { return l.Store.List(ctx) }

func (l *Local) Info(ctx context.Context) (Info, error) {
	if l.InfoFn == nil {
		return Info{}, errors.New("no coordinator information available")
	}
	return l.InfoFn(), nil
}

// errorKind maps a store error to a short code for the wire.
func errorKind(err error) string {
	switch {
	case errors.Is(err, store.ErrNotFound):
		return "not_found"
	case errors.Is(err, store.ErrExists):
		return "exists"
	default:
		return "invalid"
	}
}

// remoteError is an error the coordinator returned over the socket.
type remoteError struct {
	Kind    string `json:"kind"`
	Message string `json:"error"`
}

func (e *remoteError) Error() string { return e.Message }

func (e *remoteError) Unwrap() error {
	switch e.Kind {
	case "not_found":
		return store.ErrNotFound
	case "exists":
		return store.ErrExists
	}
	return nil
}

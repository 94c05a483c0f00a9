// Package coordtest starts a real coordinator in the test's process, on
// loopback, with one user and one workspace provisioned: what tests of
// either side of the tailnet need to talk to.
package coordtest

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/store"
)

// Deployment is a coordinator serving on loopback, with user "alice"
// owning agent (workspace) "ws1", and a token for each.
type Deployment struct {
	Server      *coordinator.Server
	URL         string
	Fingerprint string
	// Admin reaches the coordinator's admin socket.
	Admin admin.Ops
	// AgentToken is ws1's agent token; UserToken (with ID UserTokenID)
	// is alice's.
	AgentToken  string
	UserToken   string
	UserTokenID string
}

// Start starts the coordinator and provisions alice and ws1; the
// coordinator stops when the test ends. logger may be nil.
func Start(t testing.TB, logger *slog.Logger) *Deployment {
	t.Helper()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	dir := t.TempDir()
	srv, err := coordinator.New(coordinator.Config{
		DataDir:  dir,
		Listen:   "127.0.0.1:0",
		STUNAddr: "127.0.0.1:0",
		Logger:   logger,
	})
	if err != nil {
		t.Fatalf("coordinator: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-served
	})
	adm, err := admin.DialSocket(ctx, admin.SocketPath(dir))
	if err != nil {
		t.Fatalf("admin socket: %v", err)
	}
	_, errUser := adm.CreateUser(ctx, "alice")
	ag, errAgent := adm.CreateAgent(ctx, "ws1", "alice")
	ut, errToken := adm.CreateToken(ctx, store.KindUser, "alice", time.Time{})
	if err := errors.Join(errUser, errAgent, errToken); err != nil {
		t.Fatalf("provisioning alice and ws1: %v", err)
	}
	return &Deployment{
		Server:      srv,
		URL:         srv.URL(),
		Fingerprint: srv.Fingerprint(),
		Admin:       adm,
		AgentToken:  ag.Secret,
		UserToken:   ut.Secret,
		UserTokenID: ut.Token.ID,
	}
}

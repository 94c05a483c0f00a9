package coordinator

import (
	"context"

	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/coordinator/store/pgstore"
	"github.com/agentd/agent/protocol"
)

// openStore opens the store the configuration names: PostgreSQL when a URL
// is given (shared by replicas), otherwise the bbolt file in the data
// directory.
func openStore(cfg Config) (store.Backend, error) {
	if cfg.PostgresURL == "" {
		return store.Open(cfg.DataDir)
	}
	return pgstore.Open(context.Background(), cfg.PostgresURL, pgstore.Options{Logger: cfg.Logger.With("component", "store")})
}

// unavailableError tells a peer the store cannot be reached right now; it
// is not fatal, so the peer retries with backoff.
func unavailableError() *protocol.Error {
	return &protocol.Error{Code: protocol.CodeInternal,
		Message: "the coordinator cannot reach its database right now; retrying shortly will work once it is back"}
}

// StoreDescription names where the store lives, without secrets, for
// banners and logs.
func (s *Server) StoreDescription() string {
	if pg, ok := s.store.(*pgstore.Store); ok {
		return "PostgreSQL " + pg.Target()
	}
	return "bbolt " + s.cfg.DataDir
}

package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/store"
)

// adminHTTPS serves the admin API on the coordinator's HTTPS listener
// (admin.HTTPSPrefix), so `agent admin --url` works against any replica.
// Only an admin token (store.KindAdmin) gets in; every call is logged with
// the token's holder and ID. Changes go through the store like the
// socket's, so with PostgreSQL every replica learns of them at once.
func (s *Server) adminHTTPS() http.Handler {
	ops := remoteAdminOps{Ops: &admin.Local{Store: s.store, InfoFn: s.info, Changed: s.kickReauth}}
	inner := http.StripPrefix(admin.HTTPSPrefix, admin.NewHandler(ops))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The per-address bucket slows down guessing tokens, as on
		// the other token endpoints.
		release, le := s.edge.byAddr.admit(addrKey(r.RemoteAddr), time.Now())
		if le != nil {
			s.edge.refuse(w, le)
			return
		}
		defer release()
		p, status, msg := s.adminPrincipal(r)
		if msg != "" {
			s.logger.Warn("admin request refused", "path", r.URL.Path, "remote", r.RemoteAddr, "reason", msg)
			admin.WriteRefusal(w, status, msg)
			return
		}
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		inner.ServeHTTP(rec, r)
		s.logger.Info("admin action", "op", strings.TrimPrefix(r.URL.Path, admin.HTTPSPrefix), "by", p.User.Name,
			"token", p.Token.ID, "remote", r.RemoteAddr, "status", rec.status)
	})
}

// adminPrincipal checks that r carries a valid admin token; otherwise it
// returns the status and the one line to answer with.
func (s *Server) adminPrincipal(r *http.Request) (store.Principal, int, string) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	tok = strings.TrimSpace(tok)
	if !ok || tok == "" {
		return store.Principal{}, http.StatusUnauthorized,
			"no admin token: pass --token-file (or AGENT_ADMIN_TOKEN) with a token from 'agent admin token create --admin USER', run on the coordinator's machine"
	}
	p, err := s.store.Authenticate(r.Context(), tok)
	if err != nil {
		if errors.Is(err, store.ErrUnavailable) {
			return p, http.StatusServiceUnavailable, "the coordinator's database is unavailable; try again shortly"
		}
		return p, http.StatusUnauthorized, tokenError(err, p.Token).Message
	}
	if p.Token.Kind != store.KindAdmin {
		return p, http.StatusForbidden, fmt.Sprintf("this is a %s token, not an admin token; the admin API takes only tokens from 'agent admin token create --admin USER'", p.Token.Kind)
	}
	return p, 0, ""
}

// remoteAdminOps is what an admin token may do: everything but minting
// more admin tokens, so a leaked one, once revoked, has left no admin
// token behind. Admin tokens are made on the coordinator's machine or
// against the database.
type remoteAdminOps struct{ admin.Ops }

func (o remoteAdminOps) CreateToken(ctx context.Context, kind store.TokenKind, subject string, expires time.Time) (admin.TokenCreated, error) {
	if kind == store.KindAdmin {
		return admin.TokenCreated{}, errors.New("admin tokens are created only on the coordinator's machine (admin socket) or with --postgres-url, not with an admin token")
	}
	return o.Ops.CreateToken(ctx, kind, subject, expires)
}

// statusRecorder remembers the status a handler wrote, for the audit log.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(status int) {
	r.status = status
	r.ResponseWriter.WriteHeader(status)
}

package coordinator

import (
	"encoding/json"
	"net/http"

	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// handleWorkspaces lists the agents the token's user may reach (owned or
// granted), each with its tunnel status as a client would get it.
func (s *Server) handleWorkspaces(w http.ResponseWriter, r *http.Request) {
	p, perr := s.authenticate(r)
	if perr != nil {
		writeHTTPError(w, http.StatusUnauthorized, perr)
		return
	}
	if p.Agent != nil {
		writeHTTPError(w, http.StatusForbidden, &protocol.Error{Code: protocol.CodeForbidden,
			Message: "this is an agent token; list workspaces with a user token"})
		return
	}
	snap, err := s.store.List(r.Context())
	if err != nil {
		http.Error(w, "reading the store: "+err.Error(), http.StatusInternalServerError)
		return
	}
	granted := map[string]bool{}
	for _, g := range snap.Grants {
		if g.User == p.User.Name {
			granted[g.Agent] = true
		}
	}
	out := protocol.Workspaces{Workspaces: []protocol.WorkspaceInfo{}}
	for _, a := range snap.Agents {
		if a.Owner != p.User.Name && !granted[a.Name] {
			continue
		}
		ts := s.core.agentStatus(a.ID, a.Name)
		out.Workspaces = append(out.Workspaces, protocol.WorkspaceInfo{
			Name: a.Name, Owner: a.Owner, Online: ts.Online,
			OfflineSince: ts.OfflineSince, OfflineReason: ts.OfflineReason, Network: ts.Network,
		})
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

// agentStatus is what a client opening a tunnel to the agent would be told.
func (c *core) agentStatus(agentID tailnet.NodeID, name string) protocol.TunnelStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	return *c.tunnelStatusLocked(agentID, name).TunnelStatus
}

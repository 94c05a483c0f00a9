package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/agentd/agent/agent/portforward"
)

// Status is the agent's view of itself, served on the agent API and the
// health listener.
type Status struct {
	Name                 string       `json:"name"`
	Addresses            []string     `json:"addresses"`
	CoordinatorConnected bool         `json:"coordinator_connected"`
	CoordinatorError     string       `json:"coordinator_error,omitempty"`
	TailnetUp            bool         `json:"tailnet_up"`
	Network              string       `json:"network"`
	NetworkSummary       string       `json:"network_summary,omitempty"`
	Peers                []PeerStatus `json:"peers"`
}

// PeerStatus is one peer as the agent sees it.
type PeerStatus struct {
	Name          string    `json:"name"`
	User          string    `json:"user,omitempty"`
	Path          string    `json:"path"`
	RxBytes       int64     `json:"rx_bytes"`
	TxBytes       int64     `json:"tx_bytes"`
	LastHandshake time.Time `json:"last_handshake,omitzero"`
}

// Status reports the agent's current state.
func (a *Agent) Status() Status {
	a.mu.Lock()
	conn := a.conn
	st := Status{
		Name:                 a.hello.Name,
		CoordinatorConnected: a.connected,
		TailnetUp:            conn != nil,
		Network:              "unknown",
		Peers:                []PeerStatus{},
	}
	for _, p := range a.hello.Addresses {
		st.Addresses = append(st.Addresses, p.Addr().String())
	}
	if a.lastErr != nil {
		st.CoordinatorError = a.lastErr.Error()
	}
	names := make(map[uint64]peerInfo, len(a.peers))
	for id, p := range a.peers {
		names[uint64(id)] = *p
	}
	a.mu.Unlock()
	a.mu.Lock()
	if a.network != nil {
		st.Network, st.NetworkSummary = string(a.network.Status), a.network.Summary
	}
	a.mu.Unlock()
	if conn != nil {
		for _, ps := range conn.PeerStatus() {
			p := PeerStatus{Name: fmt.Sprint(ps.ID), Path: ps.Path, RxBytes: ps.RxBytes, TxBytes: ps.TxBytes, LastHandshake: ps.LastHandshake}
			if pi, ok := names[uint64(ps.ID)]; ok {
				p.Name, p.User = pi.peer.Name, pi.peer.User
			}
			st.Peers = append(st.Peers, p)
		}
	}
	return st
}

// apiHandler is the agent API on tailnet port 2: reachable only by peers the
// coordinator introduced.
func (a *Agent) apiHandler() http.Handler {
	mux := http.NewServeMux()
	discovery := portforward.NewDiscovery(portforward.DiscoveryOptions{Logger: a.log.With("component", "ports")})
	mux.Handle("GET /api/v1/ports", discovery)
	mux.HandleFunc("GET /api/v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Status())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	return mux
}

// serveHealth serves liveness, readiness and metrics on a local listener,
// for container probes and Prometheus. It returns a function that stops it.
func (a *Agent) serveHealth(addr string) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("health listener on %s: %w (choose another with --health-addr, or \"\" to disable)", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		// Alive: the process answers. Waiting for the coordinator is not a
		// reason to be restarted.
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		st := a.Status()
		code := http.StatusOK
		if !st.TailnetUp || st.Network == "broken" {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, st)
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Status())
	})
	mux.Handle("GET /metrics", a.reg.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("health listener stopped", "err", err)
		}
	}()
	a.log.Info("health endpoints listening", "addr", ln.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

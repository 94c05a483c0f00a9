package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/pprof"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

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
	conn := a.join.Conn()
	a.mu.Lock()
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
	if a.network != nil {
		st.Network, st.NetworkSummary = string(a.network.Status), a.network.Summary
	}
	a.mu.Unlock()
	if conn != nil {
		for _, ps := range conn.PeerStatus() {
			p := PeerStatus{Name: fmt.Sprint(ps.ID), Path: ps.Path.String(), RxBytes: ps.RxBytes, TxBytes: ps.TxBytes, LastHandshake: ps.LastHandshake}
			if pi, ok := a.join.Peer(ps.ID); ok {
				p.Name, p.User = pi.Name, pi.User
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

// StatusSocketName is the owner-only unix socket in the data directory
// that serves the agent's full status, with peer names and users.
const StatusSocketName = "status.sock"

// ReadyStatus is what /readyz on the health listener says: enough for a
// probe and an operator, and nothing about who uses the workspace.
type ReadyStatus struct {
	Name                 string `json:"name"`
	Ready                bool   `json:"ready"`
	CoordinatorConnected bool   `json:"coordinator_connected"`
	TailnetUp            bool   `json:"tailnet_up"`
	Network              string `json:"network"`
	// Details says where the full status is.
	Details string `json:"details,omitempty"`
}

// healthServer bounds every connection to the health listeners, so idle
// or slow clients cannot pile up.
func healthServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
}

// serveHealth serves liveness, readiness and metrics on a local listener,
// for container probes and Prometheus. Whoever can reach it (every local
// user; the pod network when bound to 0.0.0.0 for the kubelet) learns
// only whether the agent is up: peer names and users are on the owner-only
// status socket. It returns a function that stops it.
func (a *Agent) serveHealth(addr string) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("health listener on %s: %w (choose another with --health-addr, or \"\" to disable)", addr, err)
	}
	details := "full status: curl --unix-socket " + filepath.Join(a.opts.DataDir, StatusSocketName) + " http://agent/status (as the agent's user or root)"
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		// Alive: the process answers. Waiting for the coordinator is not a
		// reason to be restarted.
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		st := a.Status()
		rs := ReadyStatus{Name: st.Name, CoordinatorConnected: st.CoordinatorConnected, TailnetUp: st.TailnetUp, Network: st.Network, Details: details}
		rs.Ready = st.TailnetUp && st.Network != "broken"
		code := http.StatusOK
		if !rs.Ready {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, rs)
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusForbidden, map[string]string{"error": "the full status names who uses this workspace, so only its owner gets it; " + details})
	})
	// Peer names label agent_peer_path; the owner socket serves them.
	mux.Handle("GET /metrics", a.reg.HandlerWithout("agent_peer_path"))
	srv := healthServer(mux)
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

// peerUIDKey carries the uid of the process at the other end of a
// status-socket connection.
type peerUIDKey struct{}

// serveStatusSocket serves the full status and metrics on a unix socket in
// the data directory: mode 0600, and each connection's peer credentials
// must be the agent's own uid or root, so a group- or world-accessible
// data directory does not open it up. It returns a function that stops it.
func (a *Agent) serveStatusSocket() (stop func(), err error) {
	path := filepath.Join(a.opts.DataDir, StatusSocketName)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("status socket %s: removing the old one: %w", path, err)
	}
	// Created 0600 from the start, not chmodded after a window.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("status socket %s: %w", path, err)
	}
	owner := os.Getuid()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Status())
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		st := a.Status()
		code := http.StatusOK
		if !st.TailnetUp || st.Network == "broken" {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, st)
	})
	mux.Handle("GET /metrics", a.reg.Handler())
	// Every goroutine's stack, grouped (runtime/pprof's text form): what
	// holds an agent above its idle figures, without a restart in a
	// debug build. Owner-only, like the rest of this socket.
	mux.HandleFunc("GET /debug/goroutines", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if err := pprof.Lookup("goroutine").WriteTo(w, 1); err != nil {
			a.log.Warn("goroutine dump", "err", err)
		}
	})
	guard := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uid, ok := r.Context().Value(peerUIDKey{}).(int)
		if !ok || (uid != owner && uid != 0) {
			writeJSON(w, http.StatusForbidden, map[string]string{"error": fmt.Sprintf("the agent's status is only for its owner (uid %d) or root", owner)})
			return
		}
		mux.ServeHTTP(w, r)
	})
	srv := healthServer(guard)
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if uid, err := peerUID(c); err == nil {
			ctx = context.WithValue(ctx, peerUIDKey{}, uid)
		}
		return ctx
	}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("status socket stopped", "err", err)
		}
	}()
	a.log.Info("full status on the owner-only socket", "path", path)
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		os.Remove(path)
	}, nil
}

// peerUID returns the uid of the process that connected to a unix socket.
func peerUID(c net.Conn) (int, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, errors.New("not a unix socket")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
	}
	return int(cred.Uid), nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

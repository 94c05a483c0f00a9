package tailnet

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/envknob"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// derpSendQueueDepth is how many packets the relay buffers per client. The
// upstream default (32) starves a fast flow; Coder runs 512.
const derpSendQueueDepth = "512"

// DERPServer is the relay the coordinator embeds. It admits only node keys
// the admit function accepts (none until one is set).
type DERPServer struct {
	logger *slog.Logger
	srv    *derpserver.Server
	admit  *http.Server
	ln     net.Listener
	// secret is the password the relay sends with each admission call, so
	// that other local users cannot ask which node keys are registered.
	secret string

	mu      sync.RWMutex
	admitFn func(nodeKey string) bool
	// conns are the relay connections whose client key has been seen, so
	// that ClosePeer can end a revoked peer's connection at once.
	conns map[*sniffConn]struct{}

	closeOnce sync.Once
}

// NewDERPServer starts a relay with a fresh server key. Admission is checked
// by Tailscale's relay through an HTTP call; we answer it on a loopback
// listener of our own and fail closed if it cannot be reached.
//
// The per-client send queue depth is Tailscale's process-wide knob
// TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH, read when a relay is created;
// unless the environment sets it, we raise it to 512 for throughput.
func NewDERPServer(logger *slog.Logger) (*DERPServer, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if _, ok := envknob.LookupInt("TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH"); !ok {
		envknob.Setenv("TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH", derpSendQueueDepth)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("tailnet: DERP admission listener on loopback: %w", err)
	}
	var sec [32]byte
	if _, err := rand.Read(sec[:]); err != nil {
		ln.Close()
		return nil, fmt.Errorf("tailnet: DERP admission secret: %w", err)
	}
	d := &DERPServer{logger: logger, ln: ln, secret: hex.EncodeToString(sec[:]), conns: map[*sniffConn]struct{}{}}
	logf := func(format string, args ...any) {
		logger.Debug(strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "derp")
	}
	d.srv = derpserver.New(key.NewNode(), logf)
	// Upstream calls this URL with net/http's default client, which turns
	// the URL's user information into Basic authentication (and keeps the
	// password out of its error messages). Any local user can reach a
	// loopback port; only the relay knows the password.
	d.srv.SetVerifyClientURL((&url.URL{Scheme: "http", User: url.UserPassword("derp", d.secret), Host: ln.Addr().String(), Path: "/derp-admit"}).String())
	d.srv.SetVerifyClientURLFailOpen(false)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /derp-admit", d.serveAdmit)
	d.admit = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 16 << 10}
	go func() {
		if err := d.admit.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("DERP admission listener stopped", "err", err)
		}
	}()
	return d, nil
}

// SetAdmitFunc sets who may use the relay: fn gets "nodekey:<hex>" and
// reports whether the coordinator has registered it. It is asked once per
// relay connection.
func (d *DERPServer) SetAdmitFunc(fn func(nodeKey string) bool) {
	d.mu.Lock()
	d.admitFn = fn
	d.mu.Unlock()
}

func (d *DERPServer) serveAdmit(w http.ResponseWriter, r *http.Request) {
	if _, pass, ok := r.BasicAuth(); !ok || subtle.ConstantTimeCompare([]byte(pass), []byte(d.secret)) != 1 {
		d.logger.Warn("DERP admission endpoint called without the relay's password; refused (another local process probing it?)", "remote", r.RemoteAddr)
		http.Error(w, "the DERP admission endpoint answers only the coordinator's own relay", http.StatusUnauthorized)
		return
	}
	var req tailcfg.DERPAdmitClientRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 4<<10)).Decode(&req); err != nil {
		http.Error(w, "bad admission request", http.StatusBadRequest)
		return
	}
	d.mu.RLock()
	fn := d.admitFn
	d.mu.RUnlock()
	allow := fn != nil && !req.NodePublic.IsZero() && fn(req.NodePublic.String())
	if !allow {
		d.logger.Info("DERP refused an unregistered node key", "key", req.NodePublic.ShortString(), "source", req.Source)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
}

// Handler serves the relay: mount it at /derp (it also answers
// /derp/probe and /derp/latency-check). It speaks DERP over an HTTP/1.1
// Upgrade and over WebSocket; an HTTPS server in front must not negotiate
// HTTP/2 (set TLSNextProto to an empty map).
//
// Connections upgraded to DERP (not WebSocket) are tracked by the client key
// they present, so that ClosePeer can drop them.
func (d *DERPServer) Handler() http.Handler {
	inner := derpserver.AddWebSocketSupport(d.srv, derpserver.Handler(d.srv))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hj, ok := w.(http.Hijacker); ok && strings.EqualFold(r.Header.Get("Upgrade"), "derp") {
			w = &trackingWriter{ResponseWriter: w, hj: hj, d: d}
		}
		inner.ServeHTTP(w, r)
	})
}

// ClosePeer ends every relay connection of the node key ("nodekey:<hex>")
// and reports how many it ended. The coordinator calls it when a peer's
// access is withdrawn; admission then refuses the key's reconnects.
func (d *DERPServer) ClosePeer(nodeKey string) int {
	var k key.NodePublic
	if err := k.UnmarshalText([]byte(nodeKey)); err != nil || k.IsZero() {
		return 0
	}
	d.mu.Lock()
	var victims []*sniffConn
	for c := range d.conns {
		if c.key() == k {
			victims = append(victims, c)
		}
	}
	d.mu.Unlock()
	for _, c := range victims {
		c.Close()
	}
	if len(victims) > 0 {
		d.logger.Info("DERP dropped a revoked peer's connection", "key", k.ShortString(), "connections", len(victims))
	}
	return len(victims)
}

// trackingWriter hands the DERP server a connection that records the
// client key it reads.
type trackingWriter struct {
	http.ResponseWriter
	hj http.Hijacker
	d  *DERPServer
}

func (w *trackingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := w.hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	// Bytes net/http already buffered are read before the connection's own.
	buffered, _ := brw.Reader.Peek(brw.Reader.Buffered())
	sc := &sniffConn{Conn: nc, d: w.d}
	r := io.MultiReader(bytes.NewReader(bytes.Clone(buffered)), sc)
	return sc, bufio.NewReadWriter(bufio.NewReader(r), brw.Writer), nil
}

// sniffConn reads the client-info frame's header and key as they pass
// (DERP framing: one type byte, a 4-byte length, then the client's 32-byte
// public key) and registers itself under that key.
type sniffConn struct {
	net.Conn
	d *DERPServer

	head   [5 + key.NodePublicRawLen]byte
	n      int
	mu     sync.Mutex
	k      key.NodePublic
	closed bool
}

// derpFrameClientInfo is the DERP frame type carrying the client's key.
const derpFrameClientInfo = 0x02

func (c *sniffConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.n < len(c.head) && n > 0 {
		m := copy(c.head[c.n:], p[:n])
		c.n += m
		if c.n == len(c.head) && c.head[0] == derpFrameClientInfo {
			var k key.NodePublic
			k.UnmarshalText([]byte("nodekey:" + hex.EncodeToString(c.head[5:])))
			c.mu.Lock()
			c.k = k
			register := !c.closed
			c.mu.Unlock()
			if register {
				c.d.mu.Lock()
				c.d.conns[c] = struct{}{}
				c.d.mu.Unlock()
			}
		}
	}
	return n, err
}

func (c *sniffConn) key() key.NodePublic {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.k
}

func (c *sniffConn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.d.mu.Lock()
	delete(c.d.conns, c)
	c.d.mu.Unlock()
	return c.Conn.Close()
}

// Close stops the relay and its admission listener.
func (d *DERPServer) Close() error {
	var err error
	d.closeOnce.Do(func() {
		err = d.srv.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if e := d.admit.Shutdown(ctx); e != nil && err == nil {
			err = e
		}
	})
	return err
}

// SetMeshKey sets the secret the relays of one deployment share so that
// they forward packets among themselves, as Tailscale's derper does with
// --mesh-psk: 64 hex digits (e.g. from "openssl rand -hex 32"). A relay
// connecting with the key skips admission. Call it before serving.
func (d *DERPServer) SetMeshKey(k string) error {
	if err := d.srv.SetMeshKey(strings.TrimSpace(k)); err != nil {
		return fmt.Errorf("DERP mesh key: want 64 hex digits (openssl rand -hex 32): %w", err)
	}
	return nil
}

// MeshWith keeps a watch connection to the relay of another replica at
// baseURL ("https://host:port", pinning its certificate to fingerprint
// when not empty, or "http://host:port"), and forwards to it the packets
// for the clients connected there. It runs until ctx ends; onError, if
// set, hears of failures to connect or keep the connection (a mesh key
// the other relay does not share shows up there). onLink, if set, hears
// every MeshPingInterval whether the link carries a ping and its answer.
func (d *DERPServer) MeshWith(ctx context.Context, baseURL, fingerprint string, onError func(error), onLink func(up bool)) error {
	if !d.srv.HasMeshKey() {
		return errors.New("DERP mesh: no mesh key set")
	}
	u, err := url.Parse(baseURL)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return fmt.Errorf("DERP mesh peer %q: want https://host:port", baseURL)
	}
	logf := func(format string, args ...any) {
		d.logger.Debug(strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "derp-mesh", "peer", u.Host)
	}
	var c *derphttp.Client
	if u.Scheme == "http" {
		c, err = derphttp.NewClient(d.srv.PrivateKey(), "http://"+u.Host+"/derp", logf, netmon.NewStatic())
		if err != nil {
			return fmt.Errorf("DERP mesh peer %q: %w", baseURL, err)
		}
	} else {
		hostPort := u.Host
		if u.Port() == "" {
			hostPort = net.JoinHostPort(u.Hostname(), "443")
		}
		dm, err := CoordinatorDERPMap(hostPort, -1, fingerprint)
		if err != nil {
			return fmt.Errorf("DERP mesh peer %q: %w", baseURL, err)
		}
		region := dm.toTailcfg().Regions[DefaultRegionID]
		c = derphttp.NewRegionClient(d.srv.PrivateKey(), logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	}
	c.MeshKey = d.srv.MeshKey()
	c.WatchConnectionChanges = true
	go func() {
		<-ctx.Done()
		c.Close()
	}()
	add := func(m derp.PeerPresentMessage) { d.srv.AddPacketForwarder(m.Key, c) }
	remove := func(m derp.PeerGoneMessage) { d.srv.RemovePacketForwarder(m.Peer, c) }
	notify := func(err error) {
		if onError != nil && ctx.Err() == nil {
			onError(err)
		}
	}
	if onLink != nil {
		go pingMesh(ctx, c, onLink)
	}
	c.RunWatchConnectionLoop(ctx, d.srv.PublicKey(), logf, add, remove, notify)
	return nil
}

// MeshPingInterval is how often a mesh link is checked with a ping.
const MeshPingInterval = time.Second

// pingMesh pings through the mesh client c until ctx ends. A connected
// watch connection alone would not show a link whose other end hangs;
// the watch loop's reads deliver the pongs.
func pingMesh(ctx context.Context, c *derphttp.Client, onLink func(up bool)) {
	t := time.NewTicker(MeshPingInterval)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*MeshPingInterval)
		err := c.Ping(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		onLink(err == nil)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

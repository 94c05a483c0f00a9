package coordinator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/agentd/agent/tailnet"
)

// meshPeer is another replica's relay we keep a mesh connection to.
type meshPeer struct {
	url, fingerprint string
	cancel           context.CancelFunc
	// up says the link answered its last ping; downSince is when it
	// last stopped (or started) answering. Under mesh.mu.
	up, wasUp bool
	downSince time.Time
}

// mesh keeps our DERP relay meshed with every other live replica's, as
// listed in the replicas table. Used only when a mesh key is set.
type mesh struct {
	r    *replicator
	derp interface {
		MeshWith(context.Context, string, string, func(error), func(bool)) error
	}
	mu     sync.Mutex
	peers  map[string]*meshPeer // replica id ->
	failed map[string]bool      // replica id -> the last attempt failed (logged once)
	// meshed says every live replica's link has been up at once; until
	// then this replica is not ready.
	meshed bool
}

// notReady says why this replica should not take new peers because of
// its mesh, or "" if it may. Until its links to all live replicas have
// been up together it is not ready; after that, a link that worked counts
// as missing once it has been down for twice the heartbeat's dead-after
// time, long enough for a replica that died to drop out of the live list
// first, so the survivors never all turn unready together. A link to a
// replica that started later and never meshed (a wrong mesh key, say)
// leaves that replica unready, not this one.
func (m *mesh) notReady(now time.Time) string {
	reps := m.r.relays.Load()
	if reps == nil {
		return "not ready: the replicas for the DERP mesh are not listed yet"
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	allUp := true
	for _, x := range *reps {
		if x.id == m.r.id || !x.live {
			continue
		}
		p := m.peers[x.id]
		if p != nil && p.up {
			continue
		}
		allUp = false
		if m.meshed && (p == nil || !p.wasUp || now.Sub(p.downSince) < 2*m.r.deadAfter) {
			continue
		}
		return fmt.Sprintf("not ready: no DERP mesh link to replica %s at %s (same --mesh-key everywhere, and is its --mesh-url reachable from here?)", x.id, x.url)
	}
	if allUp {
		m.meshed = true
	}
	return ""
}

// replicaRelay is one replica's relay as the replicas table lists it;
// live says its heartbeat is recent.
type replicaRelay struct {
	id, url, fingerprint string
	live                 bool
}

// listRelays reads the replicas table, ours included, in a stable order.
func (r *replicator) listRelays(ctx context.Context) ([]replicaRelay, error) {
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	rows, _ := r.pool.Query(qctx, `SELECT id, url, fingerprint, heartbeat >= now() - $1::interval FROM replicas ORDER BY id`,
		fmt.Sprintf("%d milliseconds", r.deadAfter.Milliseconds()))
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (replicaRelay, error) {
		var x replicaRelay
		err := row.Scan(&x.id, &x.url, &x.fingerprint, &x.live)
		return x, err
	})
}

// liveRelays returns the relays of the replicas that heartbeat, ordered
// by URL: every replica then hands out the same DERP map for the same set
// of live replicas, so a peer that reconnects to another replica gets a map
// equal to the one it holds, and its relay connection is left alone
// (magicsock drops the connection to any region whose definition changes).
func (r *replicator) liveRelays() []replicaRelay {
	p := r.relays.Load()
	if p == nil {
		return nil
	}
	var out []replicaRelay
	for _, x := range *p {
		if x.live {
			out = append(out, x)
		}
	}
	slices.SortFunc(out, func(a, b replicaRelay) int { return strings.Compare(a.url, b.url) })
	return out
}

// sync starts mesh connections to new replicas and stops those to
// replicas that are gone or moved.
func (m *mesh) sync(ctx context.Context, reps []replicaRelay) {
	m.mu.Lock()
	defer m.mu.Unlock()
	live := map[string]bool{}
	for _, x := range reps {
		if x.id == m.r.id {
			continue
		}
		live[x.id] = true
		if p := m.peers[x.id]; p != nil && p.url == x.url && p.fingerprint == x.fingerprint {
			continue
		} else if p != nil {
			p.cancel()
		}
		pctx, pcancel := context.WithCancel(ctx)
		p := &meshPeer{url: x.url, fingerprint: x.fingerprint, cancel: pcancel, downSince: time.Now()}
		m.peers[x.id] = p
		id, url, fp := x.id, x.url, x.fingerprint
		onLink := func(up bool) {
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.peers[id] != p || p.up == up {
				return
			}
			p.up = up
			if up {
				p.wasUp = true
				delete(m.failed, id)
				m.r.logger.Info("DERP mesh link with another replica is up", "replica", id, "url", url)
			} else {
				p.downSince = time.Now()
				m.r.logger.Warn("DERP mesh link with another replica stopped answering", "replica", id, "url", url)
			}
		}
		onErr := func(err error) {
			m.mu.Lock()
			first := !m.failed[id]
			m.failed[id] = true
			m.mu.Unlock()
			if first {
				m.r.logger.Warn("DERP mesh with another replica failed; peers homed on different replicas' relays cannot reach each other over DERP until it works (do all replicas share the same --mesh-key, and can they reach each other's --mesh-url?)",
					"replica", id, "url", url, "err", err)
			}
		}
		go func() {
			if err := m.derp.MeshWith(pctx, url, fp, onErr, onLink); err != nil {
				m.r.logger.Warn("cannot mesh with another replica", "replica", id, "url", url, "err", err)
			}
		}()
		m.r.logger.Info("meshing DERP relay with another replica", "replica", id, "url", url)
	}
	for id, p := range m.peers {
		if !live[id] {
			p.cancel()
			delete(m.peers, id)
			delete(m.failed, id)
		}
	}
}

// addReplicaRelays lists every live replica's relay in the coordinator
// region of m after the node the peer dialled, so a peer whose relay's
// replica stops moves to another one. Only meshed relays are listed:
// without the mesh, peers on different relays cannot reach each other.
// A node is named after its URL, not the replica's ID, which is new at
// every restart: a restarted replica at the same URL is the same node.
func (s *Server) addReplicaRelays(m *tailnet.DERPMap) {
	if s.repl == nil || s.repl.mesh == nil {
		return
	}
	for _, x := range s.repl.liveRelays() {
		if err := m.AddRelay(relayNodeName(x.url), x.url, x.fingerprint); err != nil {
			s.logger.Debug("replica relay left out of the DERP map", "replica", x.id, "err", err)
		}
	}
}

// relayNodeName names a replica's relay node in the DERP map after its
// URL, so the name stays the same across that replica's restarts.
func relayNodeName(url string) string {
	sum := sha256.Sum256([]byte(url))
	return fmt.Sprintf("%d-%s", tailnet.DefaultRegionID, hex.EncodeToString(sum[:4]))
}

// stop ends every mesh connection.
func (m *mesh) stop() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, p := range m.peers {
		p.cancel()
		delete(m.peers, id)
	}
}

// admits reports whether any replica holds a peer with this node key, for
// DERP admission of a peer whose relay connection landed on a replica
// other than its coordination session's.
func (r *replicator) admits(nodeKey string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var ok bool
	err := r.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM peers WHERE node ->> 'key' = $1)`, nodeKey).Scan(&ok)
	if err != nil {
		r.logger.Warn("DERP admission could not ask the database; refusing", "err", r.describe(err))
		return false
	}
	return ok
}

// admitKey is the relay's admission: a node key registered here, or, with
// replicas, by any replica.
func (s *Server) admitKey(nodeKey string) bool {
	return s.core.admits(nodeKey) || (s.repl != nil && s.repl.admits(nodeKey))
}

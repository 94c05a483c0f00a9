package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/agentd/agent/coordinator/store/pgstore"
	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/tailnet"
)

// replicator carries changes between coordinator replicas sharing one
// PostgreSQL database. Each replica writes its own peers and tunnels to
// the peers and tunnels tables and names each change in a NOTIFY on
// pgstore.EventsChannel ("<origin> <what> <ids...>", far below the 8000
// byte payload limit); the others read the rows and mirror the peers
// their own peers care about as stand-ins in their core. Each replica
// heartbeats; the peers of one that stops are removed by the others and
// announced as lost.
//
// A peer that reconnects to another replica takes its row with a new
// epoch; writes from the old session carry the old epoch and change
// nothing, so a stale replica never overwrites a peer that moved.
type replicator struct {
	id        string
	url       string
	pool      *pgxpool.Pool
	core      *core
	logger    *slog.Logger
	heartbeat time.Duration
	deadAfter time.Duration
	onAccess  func()
	// onRevokedKey closes our relay connections of a node key whose peer
	// another replica cut off for an access decision.
	onRevokedKey func(nodeKey string)
	// describeErr words database errors as the store does.
	describeErr func(error) string
	// fingerprint is our certificate's, for the other replicas' mesh
	// connections; mesh is nil without a mesh key.
	fingerprint string
	mesh        *mesh
	// relays is the replicas table as of our last heartbeat (with a mesh).
	relays atomic.Pointer[[]replicaRelay]
	// oldReplicas: a live replica reads only one-ID peer events.
	oldReplicas atomic.Bool
	// lastBeat is when our heartbeat last worked (Unix nanoseconds).
	lastBeat atomic.Int64

	mu    sync.Mutex
	queue []replEvent
	kick  chan struct{}

	// Writer goroutine only.
	epochs map[*peer]int64
	// dirty says some writes were lost while the database was away, so
	// our peers must be published again.
	dirty   bool
	dirtyMu sync.Mutex
	// held stops the handling of other replicas' changes while locked:
	// tests use it to make this replica slow to notice, as a loaded one is.
	held sync.Mutex
	// stopped closes when the loops have ended (nil before start).
	stopped chan struct{}
}

func newReplicator(pool *pgxpool.Pool, c *core, url string, heartbeat, deadAfter time.Duration, logger *slog.Logger, onAccess func()) (*replicator, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("reading randomness: %w", err)
	}
	r := &replicator{
		id: "r" + hex.EncodeToString(b), url: url, pool: pool, core: c,
		logger: logger.With("component", "replicas"), heartbeat: heartbeat, deadAfter: deadAfter,
		onAccess: onAccess, kick: make(chan struct{}, 1), epochs: map[*peer]int64{},
	}
	return r, nil
}

// enqueue is the core's hook: it runs under the core's lock, so it only
// queues; the writer does the database work in order.
func (r *replicator) enqueue(ev replEvent) {
	r.mu.Lock()
	r.queue = append(r.queue, ev)
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// start registers the replica and runs its loops until ctx ends; the
// returned channel closes when they have stopped.
func (r *replicator) start(ctx context.Context) (<-chan struct{}, error) {
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := r.pool.Exec(sctx, `INSERT INTO replicas (id, url, fingerprint, events) VALUES ($1, $2, $3, $4)`, r.id, r.url, r.fingerprint, replicaEvents); err != nil {
		return nil, fmt.Errorf("registering this replica: %w", err)
	}
	r.lastBeat.Store(time.Now().UnixNano())
	if err := r.checkOldReplicas(sctx); err != nil {
		return nil, fmt.Errorf("reading the other replicas' versions: %w", err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); r.writeLoop(ctx) }()
	go func() { defer wg.Done(); r.listenLoop(ctx) }()
	go func() { defer wg.Done(); r.heartbeatLoop(ctx) }()
	go func() {
		wg.Wait()
		close(done)
	}()
	r.stopped = done
	r.logger.Info("replica registered", "replica", r.id)
	return done, nil
}

// ---- our changes, out ----

func (r *replicator) writeLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		}
		for {
			r.mu.Lock()
			q := r.queue
			if len(q) > maxWriteBatch {
				r.queue = q[maxWriteBatch:]
				q = q[:maxWriteBatch:maxWriteBatch]
			} else {
				r.queue = nil
			}
			r.mu.Unlock()
			if len(q) == 0 {
				break
			}
			if err := r.writeBatch(ctx, q); err != nil {
				if ctx.Err() != nil {
					return
				}
				r.markDirty()
				r.logger.Debug("could not publish peer changes; will publish again when the database answers", "err", err)
			}
		}
	}
}

// maxWriteBatch bounds the changes written in one transaction, so the
// first of a burst is not held back long by the rest.
const maxWriteBatch = 1000

// maxNotifyIDs is how many peer IDs one notification names: far below
// PostgreSQL's 8000-byte payload limit at 20 bytes an ID.
const maxNotifyIDs = 300

// replicaEvents is the version of the NOTIFY payloads this replica reads
// and sends (the replicas table's events column): 2 means a "peer" event
// may name up to maxNotifyIDs peers. Replicas of the first release (1)
// ignore such an event, so while one of them is live, as during a rolling
// upgrade, each peer event names one peer.
const replicaEvents = 2

// notifyIDs is how many peer IDs one "peer" event may name now.
func (r *replicator) notifyIDs() int {
	if r.oldReplicas.Load() {
		return 1
	}
	return maxNotifyIDs
}

// checkOldReplicas notes whether a live replica reads only one-ID peer
// events.
func (r *replicator) checkOldReplicas(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var old bool
	err := r.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM replicas WHERE events < $1 AND heartbeat >= now() - $2::interval)`,
		replicaEvents, fmt.Sprintf("%d milliseconds", r.deadAfter.Milliseconds())).Scan(&old)
	if err != nil {
		return err
	}
	if was := r.oldReplicas.Swap(old); was != old {
		if old {
			r.logger.Info("a replica of an older release is live; naming one peer per change notification until it is gone")
		} else {
			r.logger.Info("every live replica reads batched change notifications")
		}
	}
	return nil
}

func (r *replicator) markDirty() {
	r.dirtyMu.Lock()
	r.dirty = true
	r.dirtyMu.Unlock()
}

func (r *replicator) takeDirty() bool {
	r.dirtyMu.Lock()
	defer r.dirtyMu.Unlock()
	d := r.dirty
	r.dirty = false
	return d
}

// writeBatch writes a run of changes in at most two round trips, each one
// transaction: first the sessions that registered (their epochs guard
// every later write), then everything else in order, with one
// notification naming every peer whose row changed. A burst of N
// registrations so costs a few round trips per batch instead of several
// per registration, and the other replicas read the rows of a batch with
// one query.
func (r *replicator) writeBatch(ctx context.Context, q []replEvent) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := r.writeUps(ctx, q); err != nil {
		return err
	}
	var (
		b       pgx.Batch
		changed []tailnet.NodeID // peers whose row we wrote, for one notification
		after   []func() error   // follow-ups once the batch committed
		agents  []int64          // our agents that registered: their remote tunnels
	)
	notify := func(payload string) {
		b.Queue(`SELECT pg_notify($1, $2)`, pgstore.EventsChannel, payload)
	}
	for _, ev := range q {
		p := ev.p
		id := strconv.FormatInt(int64(p.id), 10)
		switch ev.kind {
		case evUp:
			if _, ok := r.epochs[p]; !ok {
				continue
			}
			changed = append(changed, p.id)
			if p.role == protocol.RoleAgent {
				agents = append(agents, int64(p.id))
			}
		case evDown:
			epoch, ok := r.epochs[p]
			delete(r.epochs, p)
			if !ok || ev.reason == "" {
				// Replaced here, or shutting down: say nothing; peers that
				// do not come back are reaped with this replica.
				continue
			}
			// The notifications only if the row was still this session's:
			// no row means the peer moved to another replica meanwhile.
			revoked := ev.reason == protocol.GoneRevoked
			b.Queue(`WITH d AS (DELETE FROM peers WHERE id = $1 AND epoch = $2 RETURNING coalesce(node ->> 'key', '') AS key),
				t AS (DELETE FROM tunnels WHERE client = $1 AND epoch = $2)
				SELECT 1 FROM d, LATERAL (SELECT pg_notify($3, $4)) n,
					LATERAL (SELECT CASE WHEN $5 AND d.key <> '' THEN pg_notify($3, $6 || d.key) END) k`,
				int64(p.id), epoch, pgstore.EventsChannel, r.id+" gone "+id+" "+string(ev.reason), revoked, r.id+" revokedkey ")
		case evNode, evNetwork:
			epoch, ok := r.epochs[p]
			if !ok {
				continue
			}
			col, val := "node", any(ev.node)
			if ev.kind == evNetwork {
				col, val = "network", any(ev.verdict)
			}
			data, err := json.Marshal(val)
			if err != nil {
				return err
			}
			changed = append(changed, p.id)
			b.Queue(`UPDATE peers SET `+col+` = $3, updated = now() WHERE id = $1 AND epoch = $2`, int64(p.id), epoch, data).
				Exec(func(tag pgconn.CommandTag) error {
					if tag.RowsAffected() == 0 {
						after = append(after, func() error { return r.lostRow(ctx, p) })
					}
					return nil
				})
		case evTunnel:
			epoch, ok := r.epochs[p]
			if !ok {
				continue
			}
			b.Queue(`INSERT INTO tunnels (client, agent, agent_name, replica, epoch) VALUES ($1, $2, $3, $4, $5)
				ON CONFLICT (client, agent) DO UPDATE SET agent_name = EXCLUDED.agent_name, replica = EXCLUDED.replica, epoch = EXCLUDED.epoch`,
				int64(p.id), int64(ev.agentID), ev.agentName, r.id, epoch)
			notify(fmt.Sprintf("%s tunnel %d %d", r.id, p.id, ev.agentID))
		case evUntunnel:
			// Our last tunnel to an agent elsewhere: stop mirroring it.
			r.core.dropIfUnused(ev.agentID)
			epoch, ok := r.epochs[p]
			if !ok {
				continue
			}
			reason := string(ev.reason)
			if reason == "" {
				reason = "-"
			}
			b.Queue(`WITH d AS (DELETE FROM tunnels WHERE client = $1 AND agent = $2 AND epoch = $3 RETURNING 1)
				SELECT 1 FROM d, LATERAL (SELECT pg_notify($4, $5)) n`,
				int64(p.id), int64(ev.agentID), epoch, pgstore.EventsChannel, fmt.Sprintf("%s untunnel %d %d %s", r.id, p.id, ev.agentID, reason))
		}
	}
	slices.Sort(changed) // a peer that changed twice in the batch is named once
	changed = slices.Compact(changed)
	for ids := range slices.Chunk(changed, r.notifyIDs()) {
		notify(r.id + " peer " + joinIDs(ids))
	}
	var tuns []remoteTunnel
	if len(agents) > 0 {
		// The clients on other replicas with a tunnel to our agents that
		// just registered, with their rows, read in the same transaction.
		b.Queue(remoteTunnelsQuery+`t.agent = ANY($1) AND t.replica <> $2`, agents, r.id).Query(func(rows pgx.Rows) error {
			var err error
			tuns, err = collectRemoteTunnels(rows)
			return err
		})
	}
	if b.Len() > 0 {
		if err := r.pool.SendBatch(ctx, &b).Close(); err != nil {
			return err
		}
	}
	r.mirrorTunnels(tuns)
	for _, fn := range after {
		if err := fn(); err != nil {
			return err
		}
	}
	return nil
}

// writeUps registers the sessions that came up in q and records their
// epochs, in one round trip.
func (r *replicator) writeUps(ctx context.Context, q []replEvent) error {
	var b pgx.Batch
	for _, ev := range q {
		if ev.kind != evUp {
			continue
		}
		p := ev.p
		// Tunnels of an earlier session of this client are not ours.
		b.Queue(`WITH up AS (INSERT INTO peers (id, replica, epoch, role, name, user_name)
				VALUES ($1, $2, nextval('peer_epoch'), $3, $4, $5)
				ON CONFLICT (id) DO UPDATE SET replica = EXCLUDED.replica, epoch = EXCLUDED.epoch, role = EXCLUDED.role,
					name = EXCLUDED.name, user_name = EXCLUDED.user_name, node = NULL, updated = now()
				RETURNING epoch),
			d AS (DELETE FROM tunnels WHERE client = $1 AND epoch <> (SELECT epoch FROM up))
			SELECT epoch FROM up`, int64(p.id), r.id, string(p.role), p.name, p.user).
			QueryRow(func(row pgx.Row) error {
				var epoch int64
				if err := row.Scan(&epoch); err != nil {
					return err
				}
				r.epochs[p] = epoch
				return nil
			})
	}
	if b.Len() == 0 {
		return nil
	}
	return r.pool.SendBatch(ctx, &b).Close()
}

// lostRow handles a node update that changed no row: the session's row is
// gone or another session holds it.
func (r *replicator) lostRow(ctx context.Context, p *peer) error {
	var holder string
	err := r.pool.QueryRow(ctx, `SELECT replica FROM peers WHERE id = $1`, int64(p.id)).Scan(&holder)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		// Our row is gone: the other replicas took us for dead
		// (a partition) and reaped it. Publish everything again.
		r.markDirty()
		return nil
	case err != nil:
		return err
	case holder == r.id:
		return nil // a newer session of ours replaced this one
	}
	// Another replica holds this peer now: this session is stale, and its
	// update must not reach anyone.
	r.logger.Info("dropping an update from a session another replica took over", "node_id", p.id, "name", p.name)
	p.kill(&protocol.Error{Code: protocol.CodeReplaced, Fatal: true,
		Message: "a newer connection with the same identity replaced this one"})
	return nil
}

func joinIDs(ids []tailnet.NodeID) string {
	var sb strings.Builder
	for i, id := range ids {
		if i > 0 {
			sb.WriteByte(' ')
		}
		sb.WriteString(strconv.FormatInt(int64(id), 10))
	}
	return sb.String()
}

// ---- their changes, in ----

func (r *replicator) listenLoop(ctx context.Context) {
	backoff := 100 * time.Millisecond
	first := true
	for ctx.Err() == nil {
		err := r.listen(ctx, !first)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errListenedOK) {
			backoff = 100 * time.Millisecond // it worked for a while: a new loss
		}
		if first || errors.Is(err, errListenedOK) {
			r.logger.Warn("lost the database notification stream; reconnecting", "err", r.describe(err))
		} else {
			r.logger.Debug("database notification stream still down", "err", r.describe(err))
		}
		first = false
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (r *replicator) listen(ctx context.Context, resync bool) error {
	pc, err := r.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection carries our LISTEN: never hand it back to the pool.
	conn := pc.Hijack()
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, `LISTEN `+pgstore.EventsChannel); err != nil {
		return err
	}
	if resync {
		// Notifications sent while we were away are lost: read the rows.
		if err := r.resync(ctx); err != nil {
			return err
		}
		r.logger.Info("database notification stream back; peers resynchronised")
	}
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return fmt.Errorf("%w: %w", errListenedOK, err)
		}
		r.held.Lock()
		r.held.Unlock() // only waits out a test's hold
		if err := r.handle(ctx, n.Payload); err != nil && ctx.Err() == nil {
			r.logger.Warn("could not apply a change from another replica", "event", n.Payload, "err", err)
		}
	}
}

// errListenedOK marks the end of a notification stream that was up.
var errListenedOK = errors.New("notification stream ended")

// describe words a database error for the log.
func (r *replicator) describe(err error) string {
	if r.describeErr != nil {
		return r.describeErr(err)
	}
	return err.Error()
}

// handle applies one notification from another replica.
func (r *replicator) handle(ctx context.Context, payload string) error {
	f := strings.Fields(payload)
	if len(f) < 2 {
		return errors.New("malformed event")
	}
	origin, kind, args := f[0], f[1], f[2:]
	if kind == "access" {
		// Sent from inside the store, by any replica or admin: every
		// replica re-checks its sessions and tunnels.
		r.onAccess()
		return nil
	}
	if origin == r.id {
		return nil
	}
	if kind == "revokedkey" && len(args) == 1 {
		if r.onRevokedKey != nil {
			r.onRevokedKey(args[0])
		}
		return nil
	}
	ids := make([]tailnet.NodeID, 0, 2)
	for _, a := range args {
		if v, err := strconv.ParseInt(a, 10, 64); err == nil {
			ids = append(ids, tailnet.NodeID(v))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	switch {
	case kind == "peer" && len(ids) > 0:
		return r.refreshMany(ctx, slices.DeleteFunc(ids, func(id tailnet.NodeID) bool { return !r.core.interested(id) }))
	case kind == "gone" && len(ids) == 1 && len(args) == 2:
		if p := r.core.remote(ids[0]); p != nil && p.replica == origin {
			r.core.removeRemote(ids[0], protocol.GoneReason(args[1]))
		}
	case kind == "tunnel" && len(ids) == 2:
		a := r.core.local(ids[1])
		if a == nil || a.role != protocol.RoleAgent {
			return nil
		}
		if err := r.refresh(ctx, ids[0]); err != nil {
			return err
		}
		r.core.remoteTunnel(ids[0], ids[1], a.name)
	case kind == "untunnel" && len(ids) == 2 && len(args) == 3:
		reason := protocol.GoneReason(args[2])
		if reason == "-" {
			reason = ""
		}
		if p := r.core.remote(ids[0]); p != nil && p.replica == origin {
			r.core.remoteUntunnel(ids[0], ids[1], reason)
			r.core.dropIfUnused(ids[0])
		}
	}
	return nil
}

// refresh reads a peer's row and mirrors it; a peer no replica holds is
// dropped as lost.
func (r *replicator) refresh(ctx context.Context, id tailnet.NodeID) error {
	rp, err := r.readPeer(ctx, id)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		r.core.removeRemote(id, protocol.GoneLost)
		return nil
	case err != nil:
		return err
	case rp.replica == r.id:
		return nil // ours
	}
	r.core.upsertRemote(rp)
	return nil
}

// refreshMany is refresh for several peers, with one query.
func (r *replicator) refreshMany(ctx context.Context, ids []tailnet.NodeID) error {
	switch len(ids) {
	case 0:
		return nil
	case 1:
		return r.refresh(ctx, ids[0])
	}
	want := make([]int64, len(ids))
	for i, id := range ids {
		want[i] = int64(id)
	}
	rows, _ := r.pool.Query(ctx, `SELECT id, replica, role, name, user_name, node, network FROM peers WHERE id = ANY($1)`, want)
	found, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (remotePeer, error) {
		var rp remotePeer
		var id int64
		var role string
		err := row.Scan(&id, &rp.replica, &role, &rp.name, &rp.user, &rp.node, &rp.verdict)
		rp.id, rp.role = tailnet.NodeID(id), protocol.Role(role)
		return rp, err
	})
	if err != nil {
		return err
	}
	seen := make(map[tailnet.NodeID]bool, len(found))
	for _, rp := range found {
		seen[rp.id] = true
		if rp.replica != r.id {
			r.core.upsertRemote(rp)
		}
	}
	for _, id := range ids {
		if !seen[id] {
			r.core.removeRemote(id, protocol.GoneLost)
		}
	}
	return nil
}

func (r *replicator) readPeer(ctx context.Context, id tailnet.NodeID) (remotePeer, error) {
	rp := remotePeer{id: id}
	var role string
	err := r.pool.QueryRow(ctx, `SELECT replica, role, name, user_name, node, network FROM peers WHERE id = $1`, int64(id)).
		Scan(&rp.replica, &role, &rp.name, &rp.user, &rp.node, &rp.verdict)
	rp.role = protocol.Role(role)
	return rp, err
}

// loadRemoteTunnels mirrors the clients on other replicas that hold a
// tunnel to our agent.
func (r *replicator) loadRemoteTunnels(ctx context.Context, agentID tailnet.NodeID) error {
	rows, _ := r.pool.Query(ctx, remoteTunnelsQuery+`t.agent = $1 AND t.replica <> $2`, int64(agentID), r.id)
	tuns, err := collectRemoteTunnels(rows)
	if err != nil {
		return err
	}
	r.mirrorTunnels(tuns)
	return nil
}

// remoteTunnelsQuery reads tunnels with their clients' rows; the caller
// adds the condition.
const remoteTunnelsQuery = `SELECT t.agent, t.agent_name, t.client, p.replica, p.role, p.name, p.user_name, p.node, p.network
	FROM tunnels t LEFT JOIN peers p ON p.id = t.client WHERE `

// remoteTunnel is a tunnel from a client on another replica to one of our
// agents, with the client's row (held false: no replica holds the client).
type remoteTunnel struct {
	agent     tailnet.NodeID
	agentName string
	client    remotePeer
	held      bool
}

func collectRemoteTunnels(rows pgx.Rows) ([]remoteTunnel, error) {
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (remoteTunnel, error) {
		var t remoteTunnel
		var agent, client int64
		var replica, role, name, user *string
		err := row.Scan(&agent, &t.agentName, &client, &replica, &role, &name, &user, &t.client.node, &t.client.verdict)
		t.agent, t.client.id = tailnet.NodeID(agent), tailnet.NodeID(client)
		if replica != nil && role != nil && name != nil && user != nil {
			t.held = true
			t.client.replica, t.client.role, t.client.name, t.client.user = *replica, protocol.Role(*role), *name, *user
		}
		return t, err
	})
}

// mirrorTunnels joins the clients of tuns to our agents.
func (r *replicator) mirrorTunnels(tuns []remoteTunnel) {
	for _, t := range tuns {
		switch {
		case !t.held:
			r.core.removeRemote(t.client.id, protocol.GoneLost)
			continue
		case t.client.replica == r.id:
			continue // ours after all
		}
		r.core.upsertRemote(t.client)
		r.core.remoteTunnel(t.client.id, t.agent, t.agentName)
	}
}

// prepareTunnel mirrors an agent held by another replica before one of
// our clients opens a tunnel to it, so the client's first tunnel status
// already says it is online and carries its node.
func (r *replicator) prepareTunnel(agentID tailnet.NodeID) {
	if r == nil || r.core.local(agentID) != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rp, err := r.readPeer(ctx, agentID)
	if err == nil && rp.replica != r.id {
		r.core.upsertRemote(rp)
	}
}

// resync re-reads every mirrored peer and our agents' remote tunnels.
func (r *replicator) resync(ctx context.Context) error {
	for _, p := range r.core.remotes() {
		if err := r.refresh(ctx, p.id); err != nil {
			return err
		}
	}
	for _, ev := range r.core.locals() {
		if ev.kind == evUp && ev.p.role == protocol.RoleAgent {
			if err := r.loadRemoteTunnels(ctx, ev.p.id); err != nil {
				return err
			}
		}
	}
	return nil
}

// ---- liveness ----

func (r *replicator) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(r.heartbeat)
	defer t.Stop()
	if r.mesh != nil {
		defer r.mesh.stop()
	}
	var upSince time.Time // since when our heartbeats have succeeded
	down := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := r.beat(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !down {
				r.logger.Warn("replica heartbeat failed; other replicas will consider this one gone if it lasts", "err", r.describe(err))
			}
			down, upSince = true, time.Time{}
			r.markDirty()
			continue
		}
		r.lastBeat.Store(time.Now().UnixNano())
		if down {
			r.logger.Info("replica heartbeat works again")
			down = false
		}
		if upSince.IsZero() {
			upSince = time.Now()
		}
		if r.takeDirty() {
			for _, ev := range r.core.locals() {
				r.enqueue(ev)
			}
		}
		if err := r.checkOldReplicas(ctx); err != nil && ctx.Err() == nil {
			r.logger.Debug("could not read the other replicas' versions", "err", r.describe(err))
		}
		if r.mesh != nil {
			if reps, err := r.listRelays(ctx); err != nil {
				if ctx.Err() == nil {
					r.logger.Debug("could not list replicas for the DERP mesh", "err", r.describe(err))
				}
			} else {
				r.relays.Store(&reps)
				r.mesh.sync(ctx, reps)
			}
		}
		// Judge others only after beating long enough ourselves: after a
		// database outage every heartbeat is old.
		if time.Since(upSince) >= r.deadAfter {
			if err := r.reap(ctx); err != nil && ctx.Err() == nil {
				r.logger.Warn("could not clean up after a stopped replica", "err", err)
			}
		}
	}
}

// healthy reports whether our heartbeat has worked lately: the database
// answers and the other replicas count us in.
func (r *replicator) healthy() bool {
	return time.Since(time.Unix(0, r.lastBeat.Load())) < r.deadAfter
}

// beat refreshes our heartbeat. If another replica declared us dead and
// removed our peers, we register again and publish every peer anew.
func (r *replicator) beat(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.deadAfter)
	defer cancel()
	tag, err := r.pool.Exec(ctx, `UPDATE replicas SET heartbeat = now() WHERE id = $1`, r.id)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	r.logger.Warn("other replicas declared this one gone; publishing its peers again")
	if _, err := r.pool.Exec(ctx, `INSERT INTO replicas (id, url, fingerprint, events) VALUES ($1, $2, $3, $4)`, r.id, r.url, r.fingerprint, replicaEvents); err != nil {
		return err
	}
	r.markDirty()
	return nil
}

// reap removes replicas whose heartbeat stopped, and announces their
// peers as lost. Replicas reaping together each delete a dead replica's
// row first, so exactly one announces.
func (r *replicator) reap(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rows, _ := r.pool.Query(ctx, `SELECT id FROM replicas WHERE heartbeat < now() - $1::interval AND id <> $2`,
		fmt.Sprintf("%d milliseconds", r.deadAfter.Milliseconds()), r.id)
	dead, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, d := range dead {
		var lost []int64
		err := pgx.BeginFunc(ctx, r.pool, func(tx pgx.Tx) error {
			tag, err := tx.Exec(ctx, `DELETE FROM replicas WHERE id = $1 AND heartbeat < now() - $2::interval`,
				d, fmt.Sprintf("%d milliseconds", r.deadAfter.Milliseconds()))
			if err != nil || tag.RowsAffected() == 0 {
				return err
			}
			rows, _ := tx.Query(ctx, `DELETE FROM peers WHERE replica = $1 RETURNING id`, d)
			if lost, err = pgx.CollectRows(rows, pgx.RowTo[int64]); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `DELETE FROM tunnels WHERE replica = $1`, d); err != nil {
				return err
			}
			// Sent as from the dead replica, so every replica's stand-ins
			// for its peers match; delivered at commit.
			for _, id := range lost {
				if _, err := tx.Exec(ctx, `SELECT pg_notify($1, $2)`, pgstore.EventsChannel, fmt.Sprintf("%s gone %d %s", d, id, protocol.GoneLost)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		r.logger.Info("a replica stopped heartbeating; its peers are marked lost", "replica", d, "peers", len(lost))
	}
	return nil
}

// setupReplication prepares the replicator when the store is PostgreSQL.
func (s *Server) setupReplication() error {
	pg, ok := s.store.(*pgstore.Store)
	if !ok {
		return nil
	}
	meshURL := s.cfg.MeshURL
	if meshURL == "" {
		meshURL = s.URL()
	}
	r, err := newReplicator(pg.Pool(), s.core, meshURL, s.cfg.ReplicaHeartbeat, s.cfg.ReplicaDeadAfter, s.logger, s.kickReauth)
	if err != nil {
		return err
	}
	r.describeErr = pg.Describe
	r.fingerprint = s.fingerprint
	r.onRevokedKey = func(k string) { s.derp.ClosePeer(k) }
	if s.cfg.MeshKey != "" {
		r.mesh = &mesh{r: r, derp: s.derp, peers: map[string]*meshPeer{}, failed: map[string]bool{}}
	}
	s.repl = r
	s.core.repl = r.enqueue
	return nil
}

// leave tells the other replicas that this one stopped on purpose, once
// its loops have ended: its heartbeat is made old, so they drop its relay
// from their DERP maps and mesh and take care of its peers at their next
// heartbeat, instead of waiting deadAfter for it to go silent. It also
// spares this replica's next incarnation, at the same mesh URL, from
// waiting for a mesh link to its own old row before it is ready.
func (r *replicator) leave() {
	if r.stopped == nil {
		return
	}
	select {
	case <-r.stopped:
	case <-time.After(2 * time.Second):
		// A heartbeat still in flight would undo what we write.
		r.logger.Warn("replica loops did not stop in time; the other replicas will notice this one stopped after its heartbeat goes silent")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := r.pool.Exec(ctx, `UPDATE replicas SET heartbeat = '-infinity' WHERE id = $1`, r.id); err != nil {
		r.logger.Warn("could not tell the other replicas this one is leaving; they will notice once its heartbeat goes silent", "err", r.describe(err))
		return
	}
	r.logger.Info("left the replicas; the others take over at once", "replica", r.id)
}

// leaveReplication is leave for a server with replicas.
func (s *Server) leaveReplication() {
	if s.repl != nil {
		s.repl.leave()
	}
}

// startReplication registers this replica and starts its loops, which end
// with the sessions' context; the channel closes when they have.
func (s *Server) startReplication() (<-chan struct{}, error) {
	if s.repl == nil {
		done := make(chan struct{})
		close(done)
		return done, nil
	}
	done, err := s.repl.start(s.baseCtx)
	if err != nil {
		return nil, fmt.Errorf("PostgreSQL: %w", err)
	}
	return done, nil
}

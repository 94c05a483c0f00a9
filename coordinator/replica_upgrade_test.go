package coordinator_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/coordinator/store/pgstore"
	"github.com/agentd/agent/internal/pgtest"
)

// During a rolling upgrade a replica of the first release (its row says
// events 1) reads a "peer" event only when it names one peer. While such a
// replica is live, a burst of registrations on a new replica must name
// every peer in one-ID events, or the old replica's clients never hear of
// them.
func TestPeerEventsReadableByOlderReplicas(t *testing.T) {
	url := pgtest.Start(t).NewDatabase()
	rep := startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) {
		c.PostgresURL = url
		c.ReplicaHeartbeat = testHeartbeat
		c.ReplicaDeadAfter = testDeadAfter
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The old replica: a row without the events column's new value, kept
	// alive by its heartbeat, and a listener that parses as it did.
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `INSERT INTO replicas (id, url) VALUES ('old-release', 'https://192.0.2.1:8443/derp')`); err != nil {
		t.Fatal(err)
	}
	beat, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer beat.Close(context.Background())
	var beating sync.WaitGroup
	bctx, stopBeat := context.WithCancel(ctx)
	beating.Go(func() {
		for bctx.Err() == nil {
			beat.Exec(bctx, `UPDATE replicas SET heartbeat = now() WHERE id = 'old-release'`)
			time.Sleep(testHeartbeat)
		}
	})
	defer func() { stopBeat(); beating.Wait() }()
	if _, err := conn.Exec(ctx, "LISTEN "+pgstore.EventsChannel); err != nil {
		t.Fatal(err)
	}
	// The new replica notices it at its next heartbeat.
	time.Sleep(3 * testHeartbeat)

	const agents = 30
	a := rep.admin(t)
	must[store.User](t)(a.CreateUser(ctx, "alice"))
	var tokens []string
	for i := range agents {
		tokens = append(tokens, must[admin.AgentCreated](t)(a.CreateAgent(ctx, fmt.Sprintf("ws%d", i), "alice")).Secret)
	}
	var wg sync.WaitGroup
	for _, tok := range tokens {
		wg.Go(func() {
			pc := startClient(t, rep, tok)
			h := recv(t, pc.rec.hellos, "hello")
			pc.UpdateNode(fakeNode(t, h))
		})
	}
	wg.Wait()

	named := map[string]bool{}
	deadline := time.Now().Add(20 * time.Second)
	for len(named) < agents && time.Now().Before(deadline) {
		wctx, wcancel := context.WithDeadline(ctx, deadline)
		n, err := conn.WaitForNotification(wctx)
		wcancel()
		if err != nil {
			break
		}
		f := strings.Fields(n.Payload)
		if len(f) < 2 || f[1] != "peer" {
			continue
		}
		if len(f) != 3 {
			t.Errorf("a peer event names %d peers while a replica of the first release is live (it ignores such an event): %q", len(f)-2, n.Payload)
		}
		for _, id := range f[2:] {
			named[id] = true
		}
	}
	if len(named) < agents {
		t.Errorf("peer events named %d of the %d agents that registered", len(named), agents)
	}
}

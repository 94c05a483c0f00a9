package coordinator_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/internal/pgtest"
	"github.com/agentd/agent/tailnet"
)

// BenchmarkReplicaUpdateLatency measures how long an agent's node update
// takes to reach its client: agent and client on one bbolt coordinator
// (the reference), on one PostgreSQL replica, and on two different
// PostgreSQL replicas (through the database and LISTEN/NOTIFY).
//
//	go test -run '^$' -bench ReplicaUpdateLatency -benchtime 1x ./coordinator/
func BenchmarkReplicaUpdateLatency(b *testing.B) {
	const updates = 200
	url := pgtest.Start(b).NewDatabase()
	bolt := benchCoordinator(b, "")
	r1, r2 := benchCoordinator(b, url), benchCoordinator(b, url)

	var ref time.Duration
	for _, tc := range []struct {
		name     string
		agent, c *coordinator.Server
		adminDir string
	}{
		{"bbolt-same-coordinator", bolt.srv, bolt.srv, bolt.dir},
		{"postgres-same-replica", r1.srv, r1.srv, r1.dir},
		{"postgres-across-replicas", r1.srv, r2.srv, r1.dir},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for range b.N {
				p50, p99 := updateLatency(b, tc.agent, tc.c, tc.adminDir, updates)
				if ref == 0 {
					ref = p50
				}
				b.ReportMetric(float64(p50.Microseconds()), "p50-µs")
				b.ReportMetric(float64(p99.Microseconds()), "p99-µs")
				b.ReportMetric(float64(p50)/float64(ref), "p50-vs-bbolt")
			}
		})
	}
}

type benchCoord struct {
	srv *coordinator.Server
	dir string
}

func benchCoordinator(b *testing.B, pgURL string) benchCoord {
	b.Helper()
	dir := b.TempDir()
	srv, err := coordinator.New(coordinator.Config{DataDir: dir, Listen: "127.0.0.1:0", PostgresURL: pgURL})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
	return benchCoord{srv: srv, dir: dir}
}

func benchClient(b *testing.B, srv *coordinator.Server, token string) (*coordclient.Client, *recorder, func()) {
	rec := newRecorder()
	c := coordclient.New(coordclient.Config{URL: srv.URL(), Token: token, Fingerprint: srv.Fingerprint(), Software: "bench"}, rec)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	return c, rec, func() { cancel(); <-done }
}

func benchRecv[T any](b *testing.B, ch <-chan T) T {
	b.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitFor):
		b.Fatal("timed out")
		var zero T
		return zero
	}
}

// updateLatency provisions a fresh agent and user, tunnels, and times n
// node updates from the agent (on a) to the client (on c).
func updateLatency(b *testing.B, a, c *coordinator.Server, adminDir string, n int) (p50, p99 time.Duration) {
	adm, err := admin.DialSocket(context.Background(), admin.SocketPath(adminDir))
	if err != nil {
		b.Fatal(err)
	}
	name := fmt.Sprintf("bench%d", time.Now().UnixNano()%1e9)
	if _, err := adm.CreateUser(b.Context(), name); err != nil {
		b.Fatal(err)
	}
	ac, err := adm.CreateAgent(b.Context(), name, name)
	if err != nil {
		b.Fatal(err)
	}
	ut, err := adm.CreateToken(b.Context(), store.KindUser, name, time.Time{})
	if err != nil {
		b.Fatal(err)
	}
	ag, agRec, stopAg := benchClient(b, a, ac.Secret)
	defer stopAg()
	h := benchRecv(b, agRec.hellos)
	node := &tailnet.Node{ID: h.NodeID, Key: "nodekey:" + strings.Repeat("a", 64), DiscoKey: "discokey:" + strings.Repeat("b", 64),
		Addresses: h.Addresses, HomeDERP: 1, AsOf: time.Now().UTC().Truncate(time.Second)}
	ag.UpdateNode(node)
	cl, clRec, stopCl := benchClient(b, c, ut.Secret)
	defer stopCl()
	hc := benchRecv(b, clRec.hellos)
	cl.UpdateNode(&tailnet.Node{ID: hc.NodeID, Key: "nodekey:" + strings.Repeat("c", 64), DiscoKey: "discokey:" + strings.Repeat("d", 64),
		Addresses: hc.Addresses, HomeDERP: 1, AsOf: time.Now().UTC().Truncate(time.Second)})
	cl.AddTunnel(name)
	waitNode := func(derp int) {
		for {
			p := benchRecv(b, clRec.peers)
			if p.Node.ID == h.NodeID && (derp == 0 || p.Node.HomeDERP == derp) {
				return
			}
		}
	}
	waitNode(0)
	lat := make([]time.Duration, 0, n)
	for i := range n {
		m := *node
		m.HomeDERP = 1000 + i
		start := time.Now()
		ag.UpdateNode(&m)
		waitNode(m.HomeDERP)
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	return lat[len(lat)/2], lat[len(lat)*99/100]
}

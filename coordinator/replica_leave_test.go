package coordinator_test

import (
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/internal/pgtest"
)

// TestLeavingReplicaHandsOverAtOnce: a replica that stops on purpose
// (SIGTERM, a rolling restart) tells the others, so its peers' partners
// hear "lost" at the survivors' next heartbeat, not after the dead-after
// time a silent replica needs. Without the word it took the full 5 s.
func TestLeavingReplicaHandsOverAtOnce(t *testing.T) {
	const deadAfter = 5 * time.Second
	url := pgtest.Start(t).NewDatabase()
	var reps []*testCoordinator
	for range 2 {
		reps = append(reps, startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) {
			c.PostgresURL = url
			c.ReplicaHeartbeat, c.ReplicaDeadAfter = testHeartbeat, deadAfter
		}}))
	}
	// From B's start, not before A's: a slow start on a loaded machine
	// would otherwise leave B not yet judging when A leaves.
	begin := time.Now()
	f := replicaFixtureOn(t, reps, url)
	a := reps[0]
	alice, ws1ID := f.tunnelAcross(t, a, reps[1])
	// Replica B judges others only after beating for dead-after itself.
	time.Sleep(deadAfter + 2*testHeartbeat - time.Since(begin))

	took := stopUntilLost(t, a, alice, ws1ID)
	t.Logf("peers of a replica that left marked lost %v after its stop began (dead after %v)", took.Round(time.Millisecond), deadAfter)
	if took > deadAfter/2 {
		t.Fatalf("ws1 marked lost %v after its replica stopped on purpose, want well within the dead-after time (%v)", took.Round(time.Millisecond), deadAfter)
	}
}

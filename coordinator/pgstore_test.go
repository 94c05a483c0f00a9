package coordinator_test

import (
	"strings"
	"testing"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/internal/pgtest"
	"github.com/agentd/agent/protocol"
)

// TestCoordinatorOnPostgres runs the usual agent/client exchange with the
// store in PostgreSQL.
func TestCoordinatorOnPostgres(t *testing.T) {
	pg := pgtest.Start(t)
	url := pg.NewDatabase()
	f := newFixture(t, coordOpts{tweak: func(c *coordinator.Config) { c.PostgresURL = url }})
	if d := f.tc.StoreDescription(); !strings.HasPrefix(d, "PostgreSQL ") || strings.Contains(d, "secret") {
		t.Fatalf("store description %q", d)
	}
	ws1 := startClient(t, f.tc, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	ws1.UpdateNode(fakeNode(t, h1))
	alice := startClient(t, f.tc, f.aliceToken)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	if p := recv(t, alice.rec.peers, "ws1's node"); p.Node.ID != h1.NodeID || p.Name != "ws1" {
		t.Fatalf("alice got %+v", p)
	}
	if p := recv(t, ws1.rec.peers, "alice's node"); p.Node.ID != ha.NodeID || p.Role != protocol.RoleClient {
		t.Fatalf("ws1 got %+v", p)
	}
	bob := startClient(t, f.tc, f.bobToken)
	recv(t, bob.rec.hellos, "bob hello")
	bob.AddTunnel("ws1")
	if e := recv(t, bob.rec.errs, "bob's refusal"); e.Code != protocol.CodeForbidden {
		t.Fatalf("bob without a grant: %+v", e)
	}
}

func TestCoordinatorRefusesBadPostgresURL(t *testing.T) {
	pg := pgtest.Start(t)
	good := pg.NewDatabase()
	bad := strings.Replace(good, "-secret@", "-wrong@", 1)
	_, err := coordinator.New(coordinator.Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", PostgresURL: bad})
	if err == nil || !strings.Contains(err.Error(), "wrong password") || strings.Contains(err.Error(), "-wrong") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("coordinator with a wrong password: %v", err)
	}
}

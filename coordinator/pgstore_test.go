package coordinator_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
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

// TestPostgresOutageKeepsSessions stops PostgreSQL under a running
// coordinator: connected peers keep their sessions and keep exchanging
// nodes, a new request gets a retryable error that says why, and once the
// database is back everything works again.
func TestPostgresOutageKeepsSessions(t *testing.T) {
	pg := pgtest.Start(t)
	url := pg.NewDatabase()
	f := newFixture(t, coordOpts{insecure: true, tweak: func(c *coordinator.Config) {
		c.PostgresURL = url
		c.ReauthInterval = 100 * time.Millisecond
		c.ReplicaHeartbeat = 100 * time.Millisecond
		c.ReplicaDeadAfter = time.Second
	}})
	ws1 := startClient(t, f.tc, f.ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	n1 := fakeNode(t, h1)
	ws1.UpdateNode(n1)
	alice := startClient(t, f.tc, f.aliceToken)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	recv(t, alice.rec.peers, "ws1's node")

	pg.Stop()
	time.Sleep(time.Second) // several re-authorisation rounds and heartbeats

	n2 := *n1
	n2.HomeDERP = 9
	ws1.UpdateNode(&n2)
	if p := recv(t, alice.rec.peers, "ws1's node during the outage"); p.Node.HomeDERP != 9 {
		t.Fatalf("alice got %+v", p.Node)
	}
	nothing(t, ws1.rec.discs, "ws1 disconnection")
	nothing(t, alice.rec.discs, "alice disconnection")
	if code := readyz(t, f.tc); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz while the database is down: %d, want 503", code)
	}

	req, _ := http.NewRequest("GET", f.tc.URL()+protocol.WhoAmIPath, nil)
	req.Header.Set("Authorization", "Bearer "+f.bobToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("whoami while the database is down: %s, want 503", resp.Status)
	}
	hc, err := coordclient.HTTPClient("")
	if err != nil {
		t.Fatal(err)
	}
	_, err = coordclient.WhoAmI(context.Background(), hc, f.tc.URL(), "", true, f.bobToken)
	if err == nil || errCode(err) != protocol.CodeInternal || !strings.Contains(err.Error(), "cannot reach its database") {
		t.Fatalf("whoami while the database is down: %v", err)
	}

	pg.Start()
	back := time.Now()
	for {
		who, err := coordclient.WhoAmI(context.Background(), hc, f.tc.URL(), "", true, f.bobToken)
		if err == nil {
			if who.Name != "bob" {
				t.Fatalf("whoami %+v", who)
			}
			break
		}
		if time.Since(back) > 5*time.Second {
			t.Fatalf("still failing 5s after the database came back: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("requests work again %v after the database came back", time.Since(back).Round(time.Millisecond))
	for readyz(t, f.tc) != http.StatusOK {
		if time.Since(back) > 5*time.Second {
			t.Fatal("/readyz not ready 5s after the database came back")
		}
		time.Sleep(50 * time.Millisecond)
	}
	bob := startClient(t, f.tc, f.bobToken)
	recv(t, bob.rec.hellos, "bob hello after the outage")
	nothing(t, alice.rec.discs, "alice disconnection")
}

func readyz(t *testing.T, tc *testCoordinator) int {
	t.Helper()
	resp, err := http.Get(tc.URL() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

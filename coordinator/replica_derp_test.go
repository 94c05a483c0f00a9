package coordinator_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/internal/pgtest"
)

const testMeshKey = "6d6573682d6b65792d666f722d74657374732d6f6e6c792d2d2d2d2d2d2d2d21"

// registerKey connects token to tc and registers a node with a fresh
// X25519 key, returning the key; the session stays up for the test.
func registerKey(t *testing.T, tc *testCoordinator, token string) *ecdh.PrivateKey {
	t.Helper()
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pc := startClient(t, tc, token)
	h := recv(t, pc.rec.hellos, "hello")
	n := fakeNode(t, h)
	n.Key = "nodekey:" + hex.EncodeToString(priv.PublicKey().Bytes())
	pc.UpdateNode(n)
	return priv
}

// TestDERPAdmissionAcrossReplicas: a relay admits a key registered with
// another replica (a relay connection and a coordination session behind
// one load balancer land where they land), and still refuses strangers.
func TestDERPAdmissionAcrossReplicas(t *testing.T) {
	f := newReplicaFixture(t, 2)
	a, b := f.reps[0], f.reps[1]
	priv := registerKey(t, b, f.ws1Token)
	deadline := time.Now().Add(waitFor)
	for !derpLogin(t, a, priv) {
		if time.Now().After(deadline) {
			t.Fatal("replica A's relay refused a key registered with replica B")
		}
		time.Sleep(50 * time.Millisecond)
	}
	stranger, _ := ecdh.X25519().GenerateKey(rand.Reader)
	if derpLogin(t, a, stranger) {
		t.Fatal("relay admitted a key no replica registered")
	}
}

// TestDERPMeshAcrossReplicas: with a shared mesh key, a packet sent to
// replica A's relay reaches a peer whose relay connection is on replica
// B.
func TestDERPMeshAcrossReplicas(t *testing.T) {
	url := pgtest.Start(t).NewDatabase()
	var reps []*testCoordinator
	for range 2 {
		reps = append(reps, startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) {
			c.PostgresURL, c.MeshKey = url, testMeshKey
			c.ReplicaHeartbeat, c.ReplicaDeadAfter = testHeartbeat, testDeadAfter
		}}))
	}
	a, b := reps[0], reps[1]
	f := replicaFixtureOn(t, reps, url)
	xKey := registerKey(t, a, f.ws1Token)
	yKey := registerKey(t, b, f.alice)

	var y net.Conn
	var ybr *bufio.Reader
	deadline := time.Now().Add(waitFor)
	for {
		conn, br, ok := derpConnect(t, b, yKey)
		if ok {
			y, ybr = conn, br
			break
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("replica B's relay refused y")
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer y.Close()
	x, _, ok := derpConnect(t, a, xKey)
	if !ok {
		t.Fatal("replica A's relay refused x")
	}
	defer x.Close()

	got := make(chan []byte, 16)
	go func() {
		for {
			typ, p, err := readDERPFrame(ybr)
			if err != nil {
				close(got)
				return
			}
			if typ == 0x05 && len(p) >= 32 && bytes.Equal(p[:32], xKey.PublicKey().Bytes()) {
				got <- p[32:]
			}
		}
	}()
	msg := []byte("across the relay mesh")
	frame := append(yKey.PublicKey().Bytes(), msg...)
	hdr := []byte{0x04, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(frame)))
	deadline = time.Now().Add(waitFor)
	for {
		x.SetDeadline(time.Now().Add(waitFor))
		if _, err := x.Write(append(hdr, frame...)); err != nil {
			t.Fatal(err)
		}
		select {
		case p, ok := <-got:
			if !ok {
				t.Fatal("y's relay connection ended")
			}
			if !bytes.Equal(p, msg) {
				t.Fatalf("y got %q", p)
			}
			return
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no packet crossed from replica A's relay to replica B's")
		}
	}
}

// TestReplicaConfigErrors: mesh and certificate mistakes stop the
// coordinator at start with one line saying what to do.
func TestReplicaConfigErrors(t *testing.T) {
	url := pgtest.Start(t).NewDatabase()
	for _, tc := range []struct {
		name string
		cfg  coordinator.Config
		want string
	}{
		{"mesh key without postgres", coordinator.Config{MeshKey: testMeshKey}, "pass --postgres-url"},
		{"short mesh key", coordinator.Config{MeshKey: "abc", PostgresURL: url}, "64 hex digits"},
		{"cert without key", coordinator.Config{TLSCertFile: "/nonexistent/tls.crt"}, "both --tls-cert and --tls-key"},
		{"missing cert", coordinator.Config{TLSCertFile: "/nonexistent/tls.crt", TLSKeyFile: "/nonexistent/tls.key"}, "--tls-cert /nonexistent/tls.crt"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.DataDir, cfg.Listen, cfg.STUNAddr = t.TempDir(), "127.0.0.1:0", ""
			srv, err := coordinator.New(cfg)
			if err == nil {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				srv.Serve(ctx) // shuts down at once, releasing what New took
				t.Fatal("started")
			}
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q: want one line mentioning %q", err, tc.want)
			}
		})
	}
}

// TestReplicasShareCertificate: replicas given the same --tls-cert and
// --tls-key present one fingerprint, so a pinned client trusts any.
func TestReplicasShareCertificate(t *testing.T) {
	first := startCoordinator(t, t.TempDir(), coordOpts{})
	cert, key := filepath.Join(first.dir, coordinator.CertFileName), filepath.Join(first.dir, coordinator.KeyFileName)
	other := startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) { c.TLSCertFile, c.TLSKeyFile = cert, key }})
	if other.Fingerprint() != first.Fingerprint() || other.Fingerprint() == "" {
		t.Fatalf("fingerprints %q and %q", other.Fingerprint(), first.Fingerprint())
	}
}

// TestDERPMapListsLiveReplicas: with a mesh, the DERP map a peer gets
// lists every live replica's relay in the one region, the replica it
// dialled first, and drops a replica that stopped. The other relays come
// in the same order and under the same names whichever replica answers,
// so a peer that reconnects elsewhere keeps an equal map (a changed region
// would make magicsock drop a working relay connection).
func TestDERPMapListsLiveReplicas(t *testing.T) {
	url := pgtest.Start(t).NewDatabase()
	var reps []*testCoordinator
	for range 3 {
		reps = append(reps, startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) {
			c.PostgresURL, c.MeshKey = url, testMeshKey
			c.ReplicaHeartbeat, c.ReplicaDeadAfter = testHeartbeat, testDeadAfter
		}}))
	}
	f := replicaFixtureOn(t, reps, url)
	relayOf := func(tc *testCoordinator) string {
		return strings.TrimPrefix(tc.URL(), "https://")
	}
	// nodes returns "name host:port" for each node of the map a new
	// client of replica tc gets.
	nodes := func(tc *testCoordinator) []string {
		pc := startClient(t, tc, f.alice)
		defer pc.stop()
		h := recv(t, pc.rec.hellos, "hello")
		if n := len(h.DERPMap.Regions); n != 1 {
			t.Fatalf("DERP map has %d regions, want one shared by the replicas", n)
		}
		var out []string
		for i, n := range h.DERPMap.Regions[0].Nodes {
			// Only the dialled replica's STUN port is known here.
			if i > 0 && n.STUNPort != -1 {
				t.Errorf("node %s: STUN port %d, want none", n.Name, n.STUNPort)
			}
			out = append(out, n.Name+" "+net.JoinHostPort(n.HostName, strconv.Itoa(n.DERPPort)))
		}
		return out
	}
	addrs := func(got []string) []string {
		var out []string
		for _, n := range got {
			_, a, _ := strings.Cut(n, " ")
			out = append(out, a)
		}
		return out
	}
	// want: the dialled relay, then the others by URL.
	waitNodes := func(tc *testCoordinator, live ...*testCoordinator) []string {
		t.Helper()
		want := []string{relayOf(tc)}
		var others []string
		for _, o := range live {
			if o != tc {
				others = append(others, relayOf(o))
			}
		}
		slices.Sort(others)
		want = append(want, others...)
		deadline := time.Now().Add(waitFor)
		for {
			got := nodes(tc)
			if slices.Equal(addrs(got), want) {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("DERP map nodes %v, want %v", got, want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	fromA := waitNodes(reps[0], reps...)
	fromB := waitNodes(reps[1], reps...)
	// Replica C's relay is listed by A and B alike, under one name.
	c := relayOf(reps[2])
	inA := fromA[slices.Index(addrs(fromA), c)]
	inB := fromB[slices.Index(addrs(fromB), c)]
	if inA != inB {
		t.Errorf("replica C's relay is %q in A's map but %q in B's", inA, inB)
	}

	reps[2].stop()
	waitNodes(reps[0], reps[0], reps[1])
}

// readyzOf returns the status and body of tc's /readyz.
func readyzOf(t *testing.T, tc *testCoordinator) (int, string) {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // the test's self-signed certificate
	}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get(tc.URL() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestReadyzFollowsMesh: a replica that cannot mesh with a live one (a
// mismatched mesh key) is not ready and says why, without making the
// meshed replica unready; one that meshes with every live replica is.
func TestReadyzFollowsMesh(t *testing.T) {
	url := pgtest.Start(t).NewDatabase()
	start := func(meshKey string) *testCoordinator {
		return startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) {
			c.PostgresURL, c.MeshKey = url, meshKey
			c.ReplicaHeartbeat, c.ReplicaDeadAfter = testHeartbeat, testDeadAfter
		}})
	}
	waitReady := func(tc *testCoordinator, name string) {
		t.Helper()
		deadline := time.Now().Add(waitFor)
		for {
			code, body := readyzOf(t, tc)
			if code == http.StatusOK {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("replica %s not ready: %d %s", name, code, body)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	a := start(testMeshKey)
	waitReady(a, "A")

	bad := start(strings.Repeat("ab", 32))
	// Long enough for both to list each other and fail to mesh, past
	// the grace a broken link gets (twice the dead-after time).
	deadline := time.Now().Add(3*testDeadAfter + time.Second)
	sawWhy := false
	for time.Now().Before(deadline) {
		code, body := readyzOf(t, bad)
		if code == http.StatusOK {
			t.Fatal("a replica that cannot mesh with the live one reports ready")
		}
		sawWhy = sawWhy || strings.Contains(body, "no DERP mesh link")
		if code, body := readyzOf(t, a); code != http.StatusOK {
			t.Fatalf("the meshed replica turned unready because of the misconfigured one: %d %s", code, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !sawWhy {
		t.Fatal("the unready replica never said its mesh link is missing")
	}
	bad.stop()

	c := start(testMeshKey)
	waitReady(c, "C")
	waitReady(a, "A")
}

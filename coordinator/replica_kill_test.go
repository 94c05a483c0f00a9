package coordinator_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/coordinator/store/pgstore"
	"github.com/agentd/agent/internal/pgtest"
	"github.com/agentd/agent/protocol"
)

// replicaChildEnv makes the test binary a coordinator replica on the
// PostgreSQL URL it names, for tests that SIGKILL a replica.
const (
	replicaChildEnv    = "COORD_TEST_REPLICA_CHILD_PG"
	replicaChildDirEnv = "COORD_TEST_REPLICA_CHILD_DIR"
)

func TestMain(m *testing.M) {
	if url := os.Getenv(replicaChildEnv); url != "" {
		if err := runReplicaChild(url); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func runReplicaChild(url string) error {
	srv, err := coordinator.New(coordinator.Config{
		DataDir: os.Getenv(replicaChildDirEnv), Listen: "127.0.0.1:0", InsecureHTTP: true, PostgresURL: url,
		ReplicaHeartbeat: testHeartbeat, ReplicaDeadAfter: testDeadAfter,
	})
	if err != nil {
		return err
	}
	fmt.Println(srv.Addr().String())
	return srv.Serve(context.Background()) // until killed
}

// loadBalancer hands each TCP connection to the next backend that
// accepts it, round robin, as a cloud load balancer in front of replicas.
type loadBalancer struct {
	ln       net.Listener
	backends []string
	next     atomic.Int64
	wg       sync.WaitGroup
}

func startLoadBalancer(t *testing.T, backends ...string) *loadBalancer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lb := &loadBalancer{ln: ln, backends: backends}
	t.Cleanup(func() { ln.Close(); lb.wg.Wait() })
	lb.wg.Add(1)
	go func() {
		defer lb.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			lb.wg.Add(1)
			go func() {
				defer lb.wg.Done()
				lb.serve(c)
			}()
		}
	}()
	return lb
}

func (lb *loadBalancer) serve(c net.Conn) {
	defer c.Close()
	start := int(lb.next.Add(1) - 1)
	for i := range lb.backends {
		b, err := net.DialTimeout("tcp", lb.backends[(start+i)%len(lb.backends)], time.Second)
		if err != nil {
			continue
		}
		defer b.Close()
		done := make(chan struct{}, 2)
		go func() { io.Copy(b, c); b.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
		go func() { io.Copy(c, b); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
		<-done
		<-done
		return
	}
}

// TestReplicaKilledPeersMoveToSurvivor kills a replica process with
// SIGKILL: its agent reconnects through the load balancer to the
// surviving replica, which holds the client, and the client gets the
// agent's node again; nothing waits for the dead replica.
func TestReplicaKilledPeersMoveToSurvivor(t *testing.T) {
	url := pgtest.Start(t).NewDatabase()
	st, err := pgstore.Open(context.Background(), url, pgstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	must[store.User](t)(st.CreateUser(t.Context(), "alice"))
	_, ws1Token, _, err := st.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	aliceToken, _, err := st.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	st.Close()

	// Replica A: a child process we can SIGKILL. Replica B: in process.
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), replicaChildEnv+"="+url, replicaChildDirEnv+"="+t.TempDir())
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { child.Process.Kill(); child.Wait() })
	sc := bufio.NewScanner(out)
	if !sc.Scan() {
		t.Fatal("replica A did not start")
	}
	aAddr := sc.Text()
	b := startCoordinator(t, t.TempDir(), coordOpts{insecure: true, tweak: func(c *coordinator.Config) {
		c.PostgresURL, c.ReplicaHeartbeat, c.ReplicaDeadAfter = url, testHeartbeat, testDeadAfter
	}})
	lb := startLoadBalancer(t, aAddr, b.Addr().String())
	lbURL := "http://" + lb.ln.Addr().String()

	// First connection to A, second to B (round robin).
	start := func(token string) *peerClient {
		rec := newRecorder()
		c := coordclient.New(coordclient.Config{URL: lbURL, InsecureHTTP: true, Token: token, Logger: testLogger(t), Software: "test"}, rec)
		ctx, cancel := context.WithCancel(context.Background())
		pc := &peerClient{Client: c, rec: rec, cancel: cancel, done: make(chan error, 1)}
		go func() { pc.done <- c.Run(ctx) }()
		t.Cleanup(func() { pc.stop() })
		return pc
	}
	ws1 := start(ws1Token)
	h1 := recv(t, ws1.rec.hellos, "ws1 hello")
	n1 := fakeNode(t, h1)
	ws1.UpdateNode(n1)
	alice := start(aliceToken)
	ha := recv(t, alice.rec.hellos, "alice hello")
	alice.UpdateNode(fakeNode(t, ha))
	alice.AddTunnel("ws1")
	if p := peerFrom(t, alice, h1.NodeID, "ws1's node from replica A"); p.Node.Key != n1.Key {
		t.Fatalf("alice got %+v", p.Node)
	}
	info, err := b.admin(t).Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Peers) != 1 || info.Peers[0].Role != protocol.RoleClient {
		t.Fatalf("replica B holds %+v; want alice only (ws1 on replica A)", info.Peers)
	}

	killed := time.Now()
	child.Process.Signal(syscall.SIGKILL)
	recv(t, ws1.rec.hellos, "ws1 hello from the surviving replica")
	attached := time.Since(killed)
	// The agent sends its node again; the client, on the same replica now,
	// gets it.
	p := peerFrom(t, alice, h1.NodeID, "ws1's node from replica B")
	if p.Node.Key != n1.Key {
		t.Fatalf("alice got %+v", p.Node)
	}
	relayed := time.Since(killed)
	t.Logf("after SIGKILL of the agent's replica: agent attached to the survivor in %v, client had its node again in %v (client default backoff)",
		attached.Round(time.Millisecond), relayed.Round(time.Millisecond))
	if attached > 3*time.Second+2*time.Second { // 3 s goal, slack for a loaded CI machine
		t.Errorf("agent took %v to attach to the surviving replica", attached)
	}
	info, err = b.admin(t).Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Peers) != 2 {
		t.Fatalf("replica B holds %d peers after the kill, want 2", len(info.Peers))
	}
}

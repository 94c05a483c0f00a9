package tailnet

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

const mixedEnv = "TAILNET_TEST_MIXED"

type mixedSetup struct {
	DERPMap *DERPMap `json:"derp_map"`
	Peer    *Node    `json:"peer"`
}

// TestDERPOnlyPeerWithNormalMTU checks that a DERP-only node (9000-byte
// MTU, in a child process) and a normal node (1280) exchange TCP streams
// and UDP datagrams both ways.
func TestDERPOnlyPeerWithNormalMTU(t *testing.T) {
	if os.Getenv(mixedEnv) != "" {
		mixedChild(t)
		return
	}
	if os.Getenv(derpOnlyEnv) == "1" {
		t.Skip("runs as its own parent")
	}
	r := newTestRelay(t)
	r.derp.SetAdmitFunc(func(string) bool { return true })
	a := newTestConn(t, r, 1, true)
	a.SetTCPFallback(func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		return func(c net.Conn) { io.Copy(c, c); c.Close() }, true
	})
	a.SetUDPFallback(func(src, dst netip.AddrPort) (func(net.Conn), bool) {
		return func(c net.Conn) {
			defer c.Close()
			buf := make([]byte, 65535)
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := c.Read(buf)
			if err == nil {
				c.Write(buf[:n])
			}
		}, true
	})
	setup, _ := json.Marshal(mixedSetup{DERPMap: r.dm, Peer: waitNode(t, a)})

	cmd := exec.Command(os.Args[0], "-test.run=^TestDERPOnlyPeerWithNormalMTU$", "-test.v")
	cmd.Env = append(os.Environ(), derpOnlyEnv+"=1", mixedEnv+"="+string(setup))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		if js, ok := strings.CutPrefix(line, "NODE "); ok {
			var n Node
			if err := json.Unmarshal([]byte(js), &n); err != nil {
				t.Fatal(err)
			}
			if err := a.UpsertPeer(&n); err != nil {
				t.Fatal(err)
			}
		}
	}
	err = cmd.Wait()
	t.Logf("child output:\n%s%s", out.String(), stderr.String())
	if err != nil || !strings.Contains(out.String(), "--- PASS: TestDERPOnlyPeerWithNormalMTU") {
		t.Fatalf("child failed: %v", err)
	}
}

func mixedChild(t *testing.T) {
	var setup mixedSetup
	if err := json.Unmarshal([]byte(os.Getenv(mixedEnv)), &setup); err != nil {
		t.Fatal(err)
	}
	r := &testRelay{dm: setup.DERPMap, allowed: map[string]bool{}}
	b := newTestConn(t, r, 2, false)
	n := waitNode(t, b)
	js, _ := json.Marshal(n)
	os.Stdout.WriteString("NODE " + string(js) + "\n")
	if err := b.UpsertPeer(setup.Peer); err != nil {
		t.Fatal(err)
	}
	peer := setup.Peer.Addresses[0].Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := b.AwaitReachable(ctx, peer); err != nil {
		t.Fatal(err)
	}

	c, err := b.DialContextTCP(ctx, netip.AddrPortFrom(peer, 9))
	if err != nil {
		t.Fatal(err)
	}
	sent := make([]byte, 2<<20)
	rand.Read(sent)
	go func() {
		c.Write(sent)
		c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || !bytes.Equal(got, sent) {
		t.Fatalf("TCP echo through a 1280-MTU peer: %d of %d bytes back, err %v", len(got), len(sent), err)
	}

	u, err := b.DialContextUDP(ctx, netip.AddrPortFrom(peer, 9))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	// The largest datagram that fits the normal peer's MTU unfragmented:
	// fragmented IPv6 datagrams do not survive Tailscale's netstack.
	dgram := make([]byte, 1280-40-8)
	rand.Read(dgram)
	u.Write(dgram)
	u.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 65535)
	m, err := u.Read(buf)
	if err != nil || !bytes.Equal(buf[:m], dgram) {
		t.Fatalf("%d-byte UDP echo: %d bytes, err %v", len(dgram), m, err)
	}
}

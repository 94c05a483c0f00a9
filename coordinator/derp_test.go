package coordinator_test

import (
	"bufio"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/crypto/nacl/box"

	"github.com/agentd/agent/coordinator/admin"
	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/protocol"
)

// derpLogin performs the DERP login handshake (server key, client info,
// server info) by hand, with a fresh node key, against the coordinator's
// /derp route, so the test needs no engine. It reports whether the relay
// admitted the key.
func derpLogin(t *testing.T, tc *testCoordinator, priv *ecdh.PrivateKey) bool {
	t.Helper()
	conn, _, ok := derpConnect(t, tc, priv)
	conn.Close()
	return ok
}

// derpConnect is derpLogin keeping the connection open, with its reader.
func derpConnect(t *testing.T, tc *testCoordinator, priv *ecdh.PrivateKey) (net.Conn, *bufio.Reader, bool) {
	t.Helper()
	tlsCfg, err := coordclient.TLSConfig(tc.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	d := &tls.Dialer{Config: tlsCfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	conn, err := d.DialContext(t.Context(), "tcp", tc.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(waitFor))
	if _, err := fmt.Fprintf(conn, "GET /derp HTTP/1.1\r\nHost: %s\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n", tc.Addr()); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	typ, payload, err := readDERPFrame(br)
	if err != nil || typ != 0x01 || len(payload) < 40 || string(payload[:8]) != "DERP🔑" {
		t.Fatalf("no DERP server key frame: type %#x len %d err %v", typ, len(payload), err)
	}
	var serverPub, clientPriv [32]byte
	copy(serverPub[:], payload[8:40])
	copy(clientPriv[:], priv.Bytes())
	var nonce [24]byte
	rand.Read(nonce[:])
	sealed := box.Seal(nonce[:], []byte(`{"version":2}`), &nonce, &serverPub, &clientPriv)
	frame := append(priv.PublicKey().Bytes(), sealed...)
	hdr := []byte{0x02, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(frame)))
	if _, err := conn.Write(append(hdr, frame...)); err != nil {
		t.Fatal(err)
	}
	typ, _, err = readDERPFrame(br)
	if err != nil {
		return conn, br, false // refused: the relay closes the connection
	}
	if typ != 0x03 {
		t.Fatalf("after client info: frame type %#x, want server info", typ)
	}
	return conn, br, true
}

func readDERPFrame(br *bufio.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > 1<<20 {
		return 0, nil, fmt.Errorf("frame of %d bytes", n)
	}
	p := make([]byte, n)
	_, err := io.ReadFull(br, p)
	return hdr[0], p, err
}

func TestDERPAdmitsOnlyRegisteredKeys(t *testing.T) {
	f := newFixture(t, coordOpts{})
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if derpLogin(t, f.tc, priv) {
		t.Fatal("relay admitted a node key nobody registered")
	}

	// An authenticated agent registers the key: now it is admitted.
	raw := dialRaw(t, f.tc, f.ws1Token)
	h := raw.hello(t)
	n := fakeNode(t, h)
	n.Key = "nodekey:" + hex.EncodeToString(priv.PublicKey().Bytes())
	raw.send(t, &protocol.PeerMessage{Type: protocol.TypeNode, Node: &protocol.NodeUpdate{Node: *n}})
	deadline := time.Now().Add(waitFor)
	for !derpLogin(t, f.tc, priv) {
		if time.Now().After(deadline) {
			t.Fatal("relay refused a registered node key")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Once the peer leaves, the key is refused again.
	raw.send(t, &protocol.PeerMessage{Type: protocol.TypeDisconnect, Disconnect: &protocol.Disconnect{}})
	raw.conn.CloseNow()
	deadline = time.Now().Add(waitFor)
	for derpLogin(t, f.tc, priv) {
		if time.Now().After(deadline) {
			t.Fatal("relay still admits the key of a peer that left")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDERPDropsRevokedPeer: revoking a peer's token closes its open relay
// connection within the bound, not only its next admission.
func TestDERPDropsRevokedPeer(t *testing.T) {
	f := newFixture(t, coordOpts{})
	a := f.tc.admin(t)
	tok := must[admin.TokenCreated](t)(a.CreateToken(t.Context(), store.KindUser, "carol", time.Time{}))
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	carol := startClient(t, f.tc, tok.Secret)
	n := fakeNode(t, recv(t, carol.rec.hellos, "carol hello"))
	n.Key = "nodekey:" + hex.EncodeToString(priv.PublicKey().Bytes())
	carol.UpdateNode(n)
	var conn net.Conn
	var br *bufio.Reader
	deadline := time.Now().Add(waitFor)
	for {
		var ok bool
		if conn, br, ok = derpConnect(t, f.tc, priv); ok {
			break
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("relay refused a registered node key")
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer conn.Close()
	ended := relayEnded(br)
	start := time.Now()
	must[store.Token](t)(a.RevokeToken(t.Context(), tok.Token.ID))
	expectRelayClosed(t, ended, start)
}

package tailnet_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

const e2eMeshKey = "6d6573682d6b65792d666f722d74657374732d6f6e6c792d2d2d2d2d2d2d2d21"

// writeCert writes a self-signed certificate for ip shared by the
// replicas, and returns its files and fingerprint.
func writeCert(t *testing.T, ip net.IP) (certFile, keyFile, fp string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "coordinator"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{ip}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	return certFile, keyFile, hex.EncodeToString(sum[:])
}

// nsBalancer is a TCP load balancer in a namespace that prefers its
// backends in order, as a front that sends each address to one replica
// while it answers.
func nsBalancer(t *testing.T, ns *netlab.Namespace, addr string, backends ...string) {
	t.Helper()
	ln, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
	)
	track := func(c net.Conn) {
		mu.Lock()
		conns[c] = true
		mu.Unlock()
	}
	// The peers' sessions outlive the test body: cut them.
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			track(c)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				for _, b := range backends {
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					bc, err := ns.DialContext(ctx, "tcp", b)
					cancel()
					if err != nil {
						continue
					}
					defer bc.Close()
					track(bc)
					done := make(chan struct{}, 2)
					go func() { io.Copy(bc, c); bc.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
					go func() { io.Copy(c, bc); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
					<-done
					<-done
					return
				}
			}()
		}
	}()
}

type sshError struct {
	err error
	out string
}

func (e *sshError) Error() string { return e.err.Error() + ": " + strings.TrimSpace(e.out) }

package tailnet_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/pgtest"
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

// TestReplicaKilledMidSSHTransfer: two replicas on one PostgreSQL with
// meshed relays, the agent on A and the laptop on B (each through its own
// front that prefers that replica), traffic over DERP. A is killed with
// SIGKILL while a transfer runs over agent ssh: the transfer finishes
// with the right digest, and a new agent ssh works within 5 s.
func TestReplicaKilledMidSSHTransfer(t *testing.T) {
	lab := netlab.New(t)
	bin := buildAgent(t)
	sites := lab.NewTwoSitesWith(netlab.NATEndpointIndependent, netlab.DropUnsolicited, netlab.DropUnsolicited)
	pgURL := pgtest.Start(t).NewDatabase()
	ip := sites.CoordinatorAddr.String()
	certFile, keyFile, fp := writeCert(t, net.ParseIP(ip))

	replica := func(port string) *exec.Cmd {
		return sites.Coordinator.Start(bin, "coordinator",
			"--data-dir", t.TempDir(),
			"--listen", ip+":"+port,
			"--postgres-url", pgURL,
			"--mesh-key", e2eMeshKey,
			"--mesh-url", "https://"+ip+":"+port,
			"--tls-cert", certFile, "--tls-key", keyFile,
			// No STUN: peers behind their NATs find no direct path,
			// so the transfer crosses the relays and their mesh.
			"--stun-addr", "off", "--metrics-addr", "")
	}
	a := replica("8443")
	replica("8444")
	nsBalancer(t, sites.Coordinator, ip+":9443", ip+":8443", ip+":8444") // the agent's front
	nsBalancer(t, sites.Coordinator, ip+":9444", ip+":8444", ip+":8443") // the laptop's front

	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext:     sites.Coordinator.DialContext,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // readiness only
	}}
	defer hc.CloseIdleConnections()
	deadline := time.Now().Add(30 * time.Second)
	for _, port := range []string{"8443", "8444"} {
		for {
			resp, err := hc.Get("https://" + ip + ":" + port + "/readyz")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("replica on %s not ready within 30 s: %v", port, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	admin := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"admin", "--json"}, args...)...)
		cmd.Env = append(os.Environ(), "AGENT_POSTGRES_URL="+pgURL, "AGENT_COORDINATOR_DATA_DIR="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("agent admin %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	secret := func(out string) string {
		var v struct {
			Secret string `json:"secret"`
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil || v.Secret == "" {
			t.Fatalf("no secret in %s: %v", out, err)
		}
		return v.Secret
	}
	admin("user", "create", "alice")
	agentToken := secret(admin("agent", "create", "ws1", "--owner", "alice"))
	userToken := secret(admin("token", "create", "--user", "alice"))

	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(agentToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sites.Host1.Start(bin, "run",
		"--coordinator-url", "https://"+ip+":9443",
		"--token-file", tokenFile,
		"--fingerprint", fp,
		"--data-dir", filepath.Join(t.TempDir(), "agent-state"),
		"--health-addr", "")

	home := t.TempDir()
	env := []string{"HOME=" + home, "PATH=" + os.Getenv("PATH"), "AGENT_URL=https://" + ip + ":9444",
		"AGENT_TOKEN=" + userToken, "AGENT_FINGERPRINT=" + fp}
	sshTrue := func(timeout time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		cmd := sites.Host2.CommandContext(ctx, bin, "ssh", "ws1", "--", "true")
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			return &sshError{err: err, out: string(out)}
		}
		return nil
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		err := sshTrue(10 * time.Second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent ssh ws1 -- true never worked before the kill: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// About 3 MB/s through agent ssh into sha256sum, across the kill.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	xfer := sites.Host2.CommandContext(ctx, bin, "ssh", "ws1", "--", "sha256sum")
	xfer.Env = env
	stdin, err := xfer.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out, errOut lockedBuffer
	xfer.Stdout, xfer.Stderr = &out, &errOut
	if err := xfer.Start(); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	sent := make(chan error, 1)
	killAt := make(chan struct{})
	go func() {
		buf := make([]byte, 64<<10)
		start := time.Now()
		var once sync.Once
		for time.Since(start) < 10*time.Second {
			if time.Since(start) > 3*time.Second {
				once.Do(func() { close(killAt) })
			}
			rand.Read(buf)
			h.Write(buf)
			if _, err := stdin.Write(buf); err != nil {
				sent <- err
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		sent <- stdin.Close()
	}()

	<-killAt
	if err := a.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var firstSSH time.Duration
	for {
		if err := sshTrue(5 * time.Second); err == nil {
			firstSSH = time.Since(killed)
			break
		} else if time.Since(killed) > 15*time.Second {
			t.Fatalf("no agent ssh worked within 15 s of the kill: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	if err := <-sent; err != nil {
		t.Fatalf("sending across the kill: %v\n%s", err, errOut.String())
	}
	if err := xfer.Wait(); err != nil {
		t.Fatalf("agent ssh transfer: %v\n%s", err, errOut.String())
	}
	want := hex.EncodeToString(h.Sum(nil))
	if got := strings.Fields(out.String()); len(got) == 0 || got[0] != want {
		t.Fatalf("digest across the kill: far side %q, sent %s", out.String(), want)
	}
	t.Logf("new agent ssh worked %v after the kill (target 5 s)", firstSSH.Round(time.Millisecond))
	if firstSSH > 5*time.Second {
		t.Errorf("first agent ssh after the kill took %v, want within 5 s", firstSSH.Round(time.Millisecond))
	}
}

type sshError struct {
	err error
	out string
}

func (e *sshError) Error() string { return e.err.Error() + ": " + strings.TrimSpace(e.out) }

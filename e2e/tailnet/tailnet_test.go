package tailnet_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/testkit/pftest"
	"github.com/agentd/agent/internal/testkit/sshtest"
)

// (a) Endpoint-independent NAT on both sides ends on a direct path, through
// the routers' public addresses.
func TestNATDirectPath(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, stderr, err := d.client(ctx, d.userToken, "ping", "ws1", "--until-direct", "-c", "40", "-i", "250ms")
	if err != nil {
		t.Fatalf("agent ping --until-direct: %v\n%s\n%s", err, out, stderr)
	}
	want := "via " + d.sites.Site1.Public.String() + ":"
	if !strings.Contains(out, want) {
		t.Fatalf("no direct pong through the agent's NAT router (%s):\n%s", want, out)
	}
	t.Logf("\n%s", out)

	// A command over SSH on the same path, exit status passed through.
	out, stderr, err = d.client(ctx, d.userToken, "ssh", "ws1", "--", "echo hello; exit 7")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 7 || out != "hello\n" {
		t.Fatalf("agent ssh ws1 -- 'echo hello; exit 7': err %v stdout %q stderr %q", err, out, stderr)
	}
}

// A workspace behind a router that accepts unsolicited UDP (a Kubernetes
// node masquerading its pods) and a laptop behind a home router: a peer
// whose hole punching reaches the workspace's router first leaves a
// conntrack entry there that moves the workspace's own flow to another
// port. The path must still turn direct within 5 s, in 10 of 10 fresh
// clients.
func TestConntrackNATDirectPath(t *testing.T) {
	d := newDeploymentWith(t, netlab.NATEndpointIndependent, netlab.AcceptUnsolicited)
	times := timeToDirect(t, d, 10, 4*time.Second)
	for run, took := range times {
		if took > 5*time.Second {
			t.Errorf("run %d: direct after %v (client start to first direct pong), want under 5 s", run+1, took)
		}
	}
	t.Logf("client start to first direct pong, 10 runs: %v", times)
}

// conntrackUDP lists a namespace's UDP conntrack entries, for failure
// messages.
func conntrackUDP(ns *netlab.Namespace) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := ns.Run(ctx, "conntrack", "-L", "-p", "udp")
	if err != nil {
		return fmt.Sprintf("(conntrack -L: %v)", err)
	}
	return out
}

// (b) With UDP dropped at the agent's site, everything still works through
// the coordinator's DERP relay.
func TestUDPBlockedUsesDERP(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	d.sites.Site1.Router.DropUDP()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, stderr, err := d.client(ctx, d.userToken, "ping", "ws1", "-c", "3", "-i", "200ms")
	if err != nil {
		t.Fatalf("agent ping: %v\n%s\n%s", err, out, stderr)
	}
	if !strings.Contains(out, "via DERP(") || strings.Contains(out, " via "+d.sites.Site1.Public.String()) {
		t.Fatalf("want every pong via DERP with the agent's UDP dropped:\n%s", out)
	}
	out, stderr, err = d.client(ctx, d.userToken, "ssh", "ws1", "--", "head -c 4000000 /dev/zero | sha256sum")
	if err != nil {
		t.Fatalf("ssh over DERP: %v\n%s\n%s", err, out, stderr)
	}
	zero := sha256.Sum256(make([]byte, 4000000))
	if !strings.HasPrefix(out, fmt.Sprintf("%x", zero)) {
		t.Fatalf("ssh over DERP: got %q, want the digest of 4 MB of zeros %x", out, zero)
	}
}

// (e) A wrong token, or a valid user without a grant, cannot reach the
// agent: the coordinator refuses with a clear reason.
func TestRefusedClients(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	_, stderr, err := d.client(ctx, "usr_"+strings.Repeat("A", 43), "ssh", "ws1", "--", "true")
	if err == nil || !strings.Contains(strings.ToLower(stderr), "token") {
		t.Errorf("wrong token: err %v, stderr %q: want a failure naming the token", err, stderr)
	}

	var bob struct {
		Secret string `json:"secret"`
	}
	d.adminJSON(&bob, "token", "create", "--user", "bob")
	_, stderr, err = d.client(ctx, bob.Secret, "ssh", "ws1", "--", "true")
	if err == nil || !strings.Contains(stderr, "ws1") {
		t.Errorf("user without a grant: err %v, stderr %q: want a refusal naming ws1", err, stderr)
	}

	// Once granted, the same token works, without restarting anything.
	d.admin("grant", "bob", "ws1")
	out, stderr, err := d.client(ctx, bob.Secret, "ssh", "ws1", "--", "echo granted")
	if err != nil || out != "granted\n" {
		t.Errorf("after the grant: err %v stdout %q stderr %q", err, out, stderr)
	}
}

// forwardRange is the range of workspace ports the port-forward tests use;
// the laptop forwards the same ports.
const forwardLo, forwardHi = 20001, 20040

// workspacePorts hands out ports from the forwarded range for servers in
// the workspace namespace.
type workspacePorts struct {
	ns   *netlab.Namespace
	next int
}

func (w *workspacePorts) listen(network, address string) (net.Listener, error) {
	host, _, _ := net.SplitHostPort(address)
	for ; w.next <= forwardHi; w.next++ {
		ln, err := w.ns.Listen(network, net.JoinHostPort(host, fmt.Sprint(w.next)))
		if err == nil {
			w.next++
			return ln, nil
		}
	}
	return nil, fmt.Errorf("no free port left in %d-%d", forwardLo, forwardHi)
}

func (w *workspacePorts) listenPacket(network, address string) (net.PacketConn, error) {
	host, _, _ := net.SplitHostPort(address)
	for ; w.next <= forwardHi; w.next++ {
		pc, err := w.ns.ListenPacket(network, net.JoinHostPort(host, fmt.Sprint(w.next)))
		if err == nil {
			w.next++
			return pc, nil
		}
	}
	return nil, fmt.Errorf("no free port left in %d-%d", forwardLo, forwardHi)
}

// startPortForward runs `agent port-forward ws1 LO-HI --udp LO-HI` on the
// laptop (with any global flags given first) and waits until its listeners
// are up. It returns the command and its output so far.
func startPortForward(t testing.TB, d *deployment, globalFlags ...string) (*exec.Cmd, *lockedBuffer) {
	t.Helper()
	rng := fmt.Sprintf("%d-%d", forwardLo, forwardHi)
	cmd := d.startClient(append(globalFlags, "port-forward", "ws1", rng, "--udp", rng)...)
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("port-forward output:\n%s", out.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := d.sites.Host2.DialContext(context.Background(), "tcp", fmt.Sprintf("127.0.0.1:%d", forwardHi))
		if err == nil {
			c.Close()
			return cmd, out
		}
		if time.Now().After(deadline) {
			t.Fatalf("port-forward did not listen within 30 s:\n%s", out.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Port forwarding across both NATs: HTTP, a long-lived stream, 200
// concurrent connections, half-close, a closed port, UDP echo.
func TestPortForwardAcrossNAT(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	startPortForward(t, d)
	ports := &workspacePorts{ns: d.sites.Host1, next: forwardLo}
	dial := func(network string) pftest.DialFunc {
		return func(ctx context.Context, port uint16) (net.Conn, error) {
			return d.sites.Host2.DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", port))
		}
	}
	env := pftest.Env{
		DialTCP:      dial("tcp"),
		DialUDP:      dial("udp"),
		Listen:       ports.listen,
		ListenPacket: ports.listenPacket,
	}
	t.Run("HTTP", func(t *testing.T) { pftest.CheckHTTP(t, env) })
	t.Run("LongLived", func(t *testing.T) { pftest.CheckWebSocket(t, env, 3*time.Second) })
	t.Run("Concurrent200", func(t *testing.T) { pftest.CheckConcurrent(t, env, 200, 64<<10) })
	t.Run("HalfClose", func(t *testing.T) { pftest.CheckHalfClose(t, env) })
	t.Run("ClosedPort", func(t *testing.T) { pftest.CheckClosedPort(t, env, 2*time.Second) })
	t.Run("UDPEcho", func(t *testing.T) { pftest.CheckUDPEcho(t, env) })
}

// (c) A transfer in progress survives a coordinator restart with every byte
// intact, and (d) after an agent restart the laptop's port forward reaches
// the new agent on its own.
func TestRestarts(t *testing.T) {
	d := newDeployment(t, netlab.NATEndpointIndependent)
	startPortForward(t, d)
	ports := &workspacePorts{ns: d.sites.Host1, next: forwardLo}
	ln, err := ports.listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveDigests(ln)
	port := ln.Addr().(*net.TCPAddr).Port

	// (c) Send 48 MiB at a bounded rate, so the transfer spans the
	// coordinator's stop and start.
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	conn, err := d.sites.Host2.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	const total = 48 << 20
	h := sha256.New()
	sent := make(chan error, 1)
	go func() {
		buf := make([]byte, 256<<10)
		for n := 0; n < total; n += len(buf) {
			rand.Read(buf)
			h.Write(buf)
			if _, err := conn.Write(buf); err != nil {
				sent <- err
				return
			}
			time.Sleep(20 * time.Millisecond) // about 12 MB/s: 4 s in all
		}
		sent <- conn.(*net.TCPConn).CloseWrite()
	}()
	time.Sleep(500 * time.Millisecond)
	d.stopCoordinator()
	time.Sleep(time.Second)
	d.startCoordinator()
	if err := <-sent; err != nil {
		t.Fatalf("sending across the coordinator restart: %v", err)
	}
	got, err := io.ReadAll(conn)
	conn.Close()
	if err != nil {
		t.Fatalf("reading the digest: %v", err)
	}
	if !bytes.Equal(got, h.Sum(nil)) {
		t.Fatalf("bytes lost or corrupted across the coordinator restart: far side %x, sent %x", got, h.Sum(nil))
	}

	// (d) Restart the agent; the port forward keeps running and reaches
	// the new agent once the coordinator has introduced it.
	d.stopAgent()
	d.startAgent()
	deadline := time.Now().Add(45 * time.Second)
	for attempt := 1; ; attempt++ {
		err := roundTrip(ctx, d, port, 1<<20)
		if err == nil {
			t.Logf("reached the restarted agent after %d attempts", attempt)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the port forward did not reach the restarted agent within 45 s: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func roundTrip(ctx context.Context, d *deployment, port, size int) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := d.sites.Host2.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	payload := make([]byte, size)
	rand.Read(payload)
	if _, err := conn.Write(payload); err != nil {
		return err
	}
	conn.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(conn)
	if err != nil {
		return err
	}
	want := sha256.Sum256(payload)
	if !bytes.Equal(got, want[:]) {
		return fmt.Errorf("digest %x, want %x", got, want)
	}
	return nil
}

// serveDigests answers each connection with the SHA-256 of what it read.
func serveDigests(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			h := sha256.New()
			io.Copy(h, c)
			c.Write(h.Sum(nil))
		}()
	}
}

// The OpenSSH client matrix (exec, PTY, scp/sftp/rsync, -L/-R, agent
// forwarding, ...) once more, over the tailnet through `agent ssh --stdio`
// as ProxyCommand, from the laptop behind its NAT.
func TestOpenSSHThroughProxyCommand(t *testing.T) {
	sshtest.RequireTools(t, "ssh", "scp", "sftp", "rsync", "ssh-agent", "ssh-add", "tmux", "git")
	d := newDeployment(t, netlab.NATEndpointIndependent)
	// The proxy's own stderr goes to a file, so the checks see only what the
	// remote command wrote. The lab's workspace cannot reach the machine's
	// nameserver, so the agent may call its network degraded at any moment,
	// and the proxy then rightly warns once; anything else it says fails.
	proxyLog := filepath.Join(t.TempDir(), "proxy-stderr")
	t.Cleanup(func() {
		b, _ := os.ReadFile(proxyLog)
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if line != "" && !strings.HasPrefix(line, `warning: workspace "ws1" reports its network degraded`) {
				t.Errorf("agent ssh --stdio printed %q; want nothing but the degraded-network warning", line)
			}
		}
	})
	proxy := fmt.Sprintf("ProxyCommand=env HOME=%s AGENT_URL=%s AGENT_TOKEN=%s AGENT_FINGERPRINT=%s ip netns exec %s %s ssh --stdio %%h 2>>%s",
		d.home, d.url, d.userToken, d.fp, d.sites.Host2.Name(), d.bin, proxyLog)
	tg := sshtest.Target{
		Host:        "ws1.agent",
		Options:     []string{proxy},
		BigFileSize: 32 << 20,
		// The agent runs in the workspace namespace: servers next to it,
		// and the port ssh -R opens there, live on that loopback.
		WorkspaceListen: d.sites.Host1.Listen,
		WorkspaceDial:   d.sites.Host1.DialContext,
	}
	sshtest.RunAll(t, tg)
}

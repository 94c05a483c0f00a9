package netcheck

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
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/tailnet"
	"golang.org/x/net/dns/dnsmessage"
)

// The test binary doubles as the netcheck program run inside lab
// namespaces: with NETCHECK_HELPER set it runs one check (options from
// NETCHECK_OPTS) and prints the JSON report. A child process is the only
// way to have every goroutine of a run inside the namespace.
func TestMain(m *testing.M) {
	if os.Getenv("NETCHECK_HELPER") == "1" {
		os.Exit(helperMain())
	}
	code := m.Run()
	if helperPath != "" {
		os.RemoveAll(filepath.Dir(helperPath))
	}
	os.Exit(code)
}

type helperOpts struct {
	Options
	Guard    bool     `json:"guard"`
	PlanOnly bool     `json:"plan_only"`
	Patterns []string `json:"patterns"`
}

func helperMain() int {
	var ho helperOpts
	if err := json.Unmarshal([]byte(os.Getenv("NETCHECK_OPTS")), &ho); err != nil {
		os.Stderr.WriteString("bad NETCHECK_OPTS: " + err.Error() + "\n")
		return 3
	}
	if ho.Guard {
		plan, err := PlanGuard(ho.Options, GuardOptions{Patterns: ho.Patterns})
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			return 4
		}
		if ho.PlanOnly {
			_ = json.NewEncoder(os.Stdout).Encode(plan)
			return 0
		}
		if err := plan.Apply(); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			return 4
		}
		_ = json.NewEncoder(os.Stdout).Encode(plan)
		return 0
	}
	r := Run(context.Background(), ho.Options)
	_ = r.WriteJSON(os.Stdout)
	return 0
}

var (
	helperOnce sync.Once
	helperPath string
	helperErr  error
)

// helperBinary is a copy of the test binary that an unprivileged user may
// execute (go test keeps its build directory private to root).
func helperBinary(t testing.TB) string {
	helperOnce.Do(func() {
		dir, err := os.MkdirTemp("", "netcheck-helper-")
		if err != nil {
			helperErr = err
			return
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			helperErr = err
			return
		}
		self, err := os.Executable()
		if err != nil {
			helperErr = err
			return
		}
		data, err := os.ReadFile(self)
		if err != nil {
			helperErr = err
			return
		}
		helperPath = filepath.Join(dir, "netcheck-helper")
		helperErr = os.WriteFile(helperPath, data, 0o755)
	})
	if helperErr != nil {
		t.Fatalf("preparing the helper binary: %v", helperErr)
	}
	return helperPath
}

// runIn runs netcheck inside ns and returns its report. unprivileged drops
// to uid/gid 65534 with no capabilities, as inside a restricted pod.
func runIn(t testing.TB, ns *netlab.Namespace, o helperOpts, unprivileged bool) *Report {
	t.Helper()
	bin := helperBinary(t)
	data, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{bin}
	if unprivileged {
		args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"}, args...)
	}
	cmd := ns.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "NETCHECK_HELPER=1", "NETCHECK_OPTS="+string(data))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("netcheck in %s: %v\nstderr: %s\nstdout: %s", ns.Label(), err, stderr.String(), out)
	}
	var r Report
	if o.Guard {
		return nil
	}
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("netcheck output is not a report: %v\n%s", err, out)
	}
	return &r
}

// podLab is a node with a bridge, a pod attached to it by a veth, and a
// coordinator beyond the node (HTTPS, DERP, STUN and DNS on 203.0.113.10).
type podLab struct {
	lab         *netlab.Lab
	node, pod   *netlab.Namespace
	coord       *netlab.Namespace
	fingerprint string
	coordURL    string
	https       *http.Server
	root        string // the node's file tree for --host
}

const (
	coordIP   = "203.0.113.10"
	coordName = "coord.test"
)

func newPodLab(t testing.TB) *podLab {
	t.Helper()
	lab := netlab.New(t)
	pl := &podLab{lab: lab}
	pl.node = lab.Namespace("node")
	pl.pod = lab.Namespace("pod")
	pl.coord = lab.Namespace("coord")
	pl.node.Bridge("cni0", "10.88.0.1/24")
	lab.Link(pl.node, "veth1", "", pl.pod, "eth0", "10.88.0.2/24")
	pl.node.Attach("veth1", "cni0")
	pl.pod.Route("default via 10.88.0.1")
	pl.pod.Sysctl("net.ipv4.ping_group_range", "0 2147483647")
	lab.Link(pl.node, "eth0", "203.0.113.1/24", pl.coord, "eth0", coordIP+"/24")
	pl.coord.Route("default via 203.0.113.1")
	pl.node.Route("default via " + coordIP)
	pl.node.EnableForwarding()
	pl.node.Masquerade("eth0", netlab.NATEndpointIndependent)
	pl.pod.WriteEtc("resolv.conf", "nameserver "+coordIP+"\noptions timeout:1\n")
	pl.pod.WriteEtc("hosts", "127.0.0.1 localhost\n")

	// Node file tree: a bridge CNI configured for cni0.
	pl.root = t.TempDir()
	writeFile(t, pl.root, "etc/cni/net.d/10-lab.conflist", `{"cniVersion":"1.0.0","name":"lab","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/24"}]]}}]}`)

	pl.startCoordinator(t)
	return pl
}

func writeFile(t testing.TB, root, p, content string) {
	t.Helper()
	full := filepath.Join(root, p)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func selfSigned(t testing.TB) (tls.Certificate, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: coordName},
		DNSNames:     []string{coordName},
		IPAddresses:  []net.IP{net.ParseIP(coordIP)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, hex.EncodeToString(sum[:])
}

// startCoordinator serves HTTPS with the real DERP relay at /derp, the real
// STUN server, and a small DNS server for coord.test, all in the coord
// namespace.
func (pl *podLab) startCoordinator(t testing.TB) {
	t.Helper()
	cert, fp := selfSigned(t)
	pl.fingerprint = fp
	pl.coordURL = "https://" + coordName + ":443"

	var derp *tailnet.DERPServer
	var stun *tailnet.STUNServer
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	err := pl.coord.Do(func() error {
		var err error
		derp, err = tailnet.NewDERPServer(nil)
		if err != nil {
			return err
		}
		stun, err = tailnet.ListenSTUN(ctx, coordIP+":3478", nil)
		return err
	})
	if err != nil {
		t.Fatalf("coordinator relay: %v", err)
	}
	t.Cleanup(func() { derp.Close(); stun.Close() })

	mux := http.NewServeMux()
	mux.Handle("/derp", derp.Handler())
	mux.Handle("/derp/", derp.Handler())
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "coordinator\n") })
	ln, err := pl.coord.Listen("tcp", coordIP+":443")
	if err != nil {
		t.Fatal(err)
	}
	pl.https = &http.Server{
		Handler:      mux,
		TLSConfig:    &tls.Config{Certificates: []tls.Certificate{cert}},
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	go pl.https.ServeTLS(ln, "", "")
	t.Cleanup(func() { pl.https.Close() })

	dns, err := pl.coord.ListenPacket("udp", coordIP+":53")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	go serveDNS(dns)
}

// serveDNS answers A queries for coord.test and NXDOMAIN otherwise (NS for
// the root gets an empty NOERROR).
func serveDNS(pc net.PacketConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		var q dnsmessage.Message
		if q.Unpack(buf[:n]) != nil || len(q.Questions) == 0 {
			continue
		}
		resp := dnsmessage.Message{Header: dnsmessage.Header{ID: q.ID, Response: true, RecursionAvailable: true}, Questions: q.Questions}
		qq := q.Questions[0]
		switch {
		case strings.EqualFold(qq.Name.String(), coordName+".") && qq.Type == dnsmessage.TypeA:
			resp.Answers = []dnsmessage.Resource{{
				Header: dnsmessage.ResourceHeader{Name: qq.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60},
				Body:   &dnsmessage.AResource{A: netip.MustParseAddr(coordIP).As4()},
			}}
		case strings.EqualFold(qq.Name.String(), coordName+"."):
		case qq.Name.String() == ".":
		default:
			resp.RCode = dnsmessage.RCodeNameError
		}
		out, err := resp.Pack()
		if err == nil {
			_, _ = pc.WriteTo(out, from)
		}
	}
}

func (pl *podLab) workspaceOpts() helperOpts {
	return helperOpts{Options: Options{CoordinatorURL: pl.coordURL, Fingerprint: pl.fingerprint}}
}

func (pl *podLab) hostOpts() helperOpts {
	return helperOpts{Options: Options{Host: true, Root: pl.root}}
}

func describe(r *Report) string {
	var b strings.Builder
	_ = r.WriteText(&b)
	return b.String()
}

func wantFinding(t testing.TB, r *Report, code string, sev Status) *Finding {
	t.Helper()
	f := r.Finding(code)
	if f == nil {
		t.Fatalf("no %s finding; report:\n%s", code, describe(r))
	}
	if f.Severity != sev {
		t.Errorf("%s severity %s, want %s", code, f.Severity, sev)
	}
	if f.Remedy.Text == "" {
		t.Errorf("%s has no remedy", code)
	}
	return f
}

func TestHealthyLab(t *testing.T) {
	pl := newPodLab(t)
	r := runIn(t, pl.pod, pl.workspaceOpts(), true)
	if r.Status != StatusOK || len(r.Findings) > 0 {
		t.Fatalf("healthy lab reported %s:\n%s", r.Status, describe(r))
	}
	for _, id := range []string{"link", "address", "route", "gateway", "mtu", "dns", "proxy", "https", "clock", "derp", "udp"} {
		c := r.Check(id)
		if c == nil || c.Status != StatusOK {
			t.Errorf("check %s: %+v", id, c)
		}
	}
	if m := r.Check("gateway").Details["method"]; m != string(icmpDatagram) {
		t.Errorf("gateway probed by %v, want the unprivileged ping socket", m)
	}
	if r.DurationMS > 2000 {
		t.Errorf("healthy report took %d ms, want under 2000", r.DurationMS)
	}
	t.Logf("healthy workspace report in %d ms:\n%s", r.DurationMS, describe(r))

	h := runIn(t, pl.node, pl.hostOpts(), false)
	if h.Status != StatusOK {
		t.Fatalf("healthy node reported %s:\n%s", h.Status, describe(h))
	}
}

// TestFaults injects one fault per subtest into a fresh lab and expects its
// own diagnosis, from the pod and (where the cause is host-side) from the
// node.
func TestFaults(t *testing.T) {
	tests := []struct {
		name       string
		inject     func(t *testing.T, pl *podLab)
		podFinding string
		podSev     Status
		hostCode   string
	}{
		{"bridge deleted", func(t *testing.T, pl *podLab) { pl.node.IP("link", "del", "cni0") }, "gateway.unreachable", StatusBroken, "bridge.missing"},
		{"veth detached", func(t *testing.T, pl *podLab) { pl.node.IP("link", "set", "veth1", "nomaster") }, "gateway.unreachable", StatusBroken, "veth.no_master"},
		{"bridge address flushed", func(t *testing.T, pl *podLab) { pl.node.IP("addr", "flush", "dev", "cni0") }, "gateway.unreachable", StatusBroken, "bridge.no_address"},
		{"mtu mismatch", func(t *testing.T, pl *podLab) {
			pl.node.SetMTU("veth1", 1400)
			pl.node.SetMTU("cni0", 1400)
		}, "mtu.blackhole", StatusDegraded, ""},
		{"no default route", func(t *testing.T, pl *podLab) { pl.pod.IP("route", "del", "default") }, "route.no_default", StatusBroken, ""},
		{"dns unreachable", func(t *testing.T, pl *podLab) {
			pl.pod.WriteEtc("resolv.conf", "nameserver 203.0.113.53\noptions timeout:1\n")
		}, "dns.unreachable", StatusBroken, ""},
		{"udp dropped", func(t *testing.T, pl *podLab) { pl.node.DropUDP(53) }, "udp.blocked", StatusDegraded, ""},
		{"coordinator down", func(t *testing.T, pl *podLab) { pl.https.Close() }, "https.refused", StatusBroken, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pl := newPodLab(t)
			tt.inject(t, pl)
			r := runIn(t, pl.pod, pl.workspaceOpts(), true)
			f := wantFinding(t, r, tt.podFinding, tt.podSev)
			if r.Status != tt.podSev && !(tt.podSev == StatusDegraded && r.Status == StatusBroken && tt.podFinding == "mtu.blackhole") {
				t.Errorf("report status %s, want %s", r.Status, tt.podSev)
			}
			if r.DurationMS > 3000 {
				t.Errorf("report took %d ms", r.DurationMS)
			}
			t.Logf("%s → %s: %s", tt.name, f.Code, f.Problem)
			switch tt.podFinding {
			case "gateway.unreachable":
				if !strings.HasPrefix(r.Summary, "workspace network broken past eth0") {
					t.Errorf("summary %q", r.Summary)
				}
			case "udp.blocked":
				if c := r.Check("derp"); c == nil || c.Status != StatusOK {
					t.Errorf("DERP should still work with UDP dropped: %+v", c)
				}
			case "mtu.blackhole":
				if got := r.Check("mtu").Details["path_mtu_at_least"]; got != float64(1400) {
					t.Errorf("path MTU lower bound %v, want 1400", got)
				}
			case "https.refused", "dns.unreachable":
				if r.Finding("gateway.unreachable") != nil {
					t.Errorf("%s blamed on the gateway:\n%s", tt.name, describe(r))
				}
			}
			if tt.hostCode != "" {
				h := runIn(t, pl.node, pl.hostOpts(), false)
				hf := wantFinding(t, h, tt.hostCode, StatusBroken)
				if len(hf.Remedy.Commands) == 0 {
					t.Errorf("%s: no command in the remedy", tt.hostCode)
				}
				t.Logf("host: %s: %s; fix: %v", hf.Code, hf.Problem, hf.Remedy.Commands)
			}
		})
	}
}

// TestPinMismatch: a wrong fingerprint is reported as such.
func TestPinMismatch(t *testing.T) {
	pl := newPodLab(t)
	o := pl.workspaceOpts()
	o.Fingerprint = strings.Repeat("ab", 32)
	r := runIn(t, pl.pod, o, true)
	wantFinding(t, r, "https.fingerprint_mismatch", StatusBroken)
}

func TestWatchDetectsTeardown(t *testing.T) {
	pl := newPodLab(t)
	// Watch from inside the pod: run the helper as a long-lived process.
	bin := helperBinary(t)
	o := pl.workspaceOpts()
	data, _ := json.Marshal(o)
	cmd := pl.pod.Command(bin, "-test.run=^TestWatchHelper$")
	cmd.Env = append(os.Environ(), "NETCHECK_WATCH_OPTS="+string(data))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	dec := json.NewDecoder(stdout)
	var first Report
	if err := dec.Decode(&first); err != nil {
		t.Fatal(err)
	}
	if first.Status != StatusOK {
		t.Fatalf("first watch report: %s", first.Summary)
	}
	time.Sleep(300 * time.Millisecond)
	torn := time.Now()
	pl.node.IP("link", "del", "cni0")
	var r Report
	for {
		if err := dec.Decode(&r); err != nil {
			t.Fatal(err)
		}
		if r.Status == StatusBroken {
			break
		}
	}
	took := time.Since(torn)
	if r.Finding("gateway.unreachable") == nil {
		t.Errorf("watch report after teardown:\n%s", describe(&r))
	}
	if took > 2*time.Second {
		t.Errorf("teardown detected after %v, want within 2 s", took)
	}
	t.Logf("bridge teardown detected by --watch in %v (%s report)", took.Round(time.Millisecond), r.Scope)
}

// TestWatchHelper is the watch loop run by TestWatchDetectsTeardown in the
// pod namespace; on its own it does nothing.
func TestWatchHelper(t *testing.T) {
	raw := os.Getenv("NETCHECK_WATCH_OPTS")
	if raw == "" {
		t.Skip("helper for TestWatchDetectsTeardown")
	}
	var o helperOpts
	if err := json.Unmarshal([]byte(raw), &o); err != nil {
		t.Fatal(err)
	}
	enc := json.NewEncoder(os.Stdout)
	err := Watch(context.Background(), o.Options, WatchOptions{Interval: 500 * time.Millisecond}, func(r *Report) {
		_ = enc.Encode(r)
	})
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}

// TestHostStaleCNIConfig: a CNI configuration whose bridge nobody uses (a
// podman that moved to netavark leaves cni-podman0's file behind) is not a
// missing bridge; once host-local IPAM holds an address on it, it is.
func TestHostStaleCNIConfig(t *testing.T) {
	pl := newPodLab(t)
	writeFile(t, pl.root, "etc/cni/net.d/87-podman-bridge.conflist", `{"cniVersion":"0.4.0","name":"podman","plugins":[{"type":"bridge","bridge":"cni-podman0","isGateway":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.89.0.0/16","gateway":"10.89.0.1"}]]}}]}`)
	writeFile(t, pl.root, "var/lib/cni/networks/podman/lock", "")
	writeFile(t, pl.root, "var/lib/cni/networks/podman/last_reserved_ip.0", "10.89.0.4")

	h := runIn(t, pl.node, pl.hostOpts(), false)
	if h.Status != StatusOK {
		t.Fatalf("an unused CNI configuration made the node %s:\n%s", h.Status, describe(h))
	}
	if unused, _ := h.Check("bridges").Details["unused"].([]any); len(unused) != 1 || !strings.Contains(fmt.Sprint(unused[0]), "cni-podman0") {
		t.Errorf("bridges check should note cni-podman0 as not in use, details %v", h.Check("bridges").Details)
	}

	writeFile(t, pl.root, "var/lib/cni/networks/podman/10.89.0.5", "container-id\neth0")
	h = runIn(t, pl.node, pl.hostOpts(), false)
	f := wantFinding(t, h, "bridge.missing", StatusBroken)
	if !strings.Contains(strings.Join(f.Evidence, "\n"), "10.89.0.5") {
		t.Errorf("evidence should name the lease that proves the bridge is in use: %q", f.Evidence)
	}
}

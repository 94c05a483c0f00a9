// Package nclab is the netcheck test lab: a node with a container bridge, a
// pod on it, and a coordinator beyond the node, in network namespaces; and
// a way to run a test binary as the netcheck program inside them.
package nclab

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
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/tailnet"
	"golang.org/x/net/dns/dnsmessage"
)

// HelperEnv set to 1 makes a test binary the netcheck program: its TestMain
// calls its helper with the JSON in OptsEnv and exits.
const (
	HelperEnv = "NETCHECK_HELPER"
	OptsEnv   = "NETCHECK_OPTS"
)

// IsHelper reports whether this process was started by Run.
func IsHelper() bool { return os.Getenv(HelperEnv) == "1" }

// Opts returns the helper's options JSON.
func Opts() []byte { return []byte(os.Getenv(OptsEnv)) }

// Cleanup removes the helper binary copy; call it from TestMain.
func Cleanup() {
	if helperPath != "" {
		os.RemoveAll(filepath.Dir(helperPath))
	}
}

// Run runs this test binary as the helper inside ns with opts (as JSON)
// and returns its standard output. unprivileged drops to uid/gid 65534
// with no capabilities, as inside a restricted pod.
func Run(t testing.TB, ns *netlab.Namespace, opts any, unprivileged bool) ([]byte, error) {
	t.Helper()
	bin := HelperBinary(t)
	data, err := json.Marshal(opts)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{bin}
	if unprivileged {
		args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"}, args...)
	}
	cmd := ns.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), HelperEnv+"=1", OptsEnv+"="+string(data))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, &HelperError{Err: err, Stderr: strings.TrimSpace(stderr.String()), Stdout: string(out)}
	}
	return out, nil
}

// HelperError is a helper run that exited non-zero.
type HelperError struct {
	Err            error
	Stderr, Stdout string
}

func (e *HelperError) Error() string {
	return e.Err.Error() + "\nstderr: " + e.Stderr + "\nstdout: " + e.Stdout
}

var (
	helperOnce sync.Once
	helperPath string
	helperErr  error
)

// helperBinary is a copy of the test binary that an unprivileged user may
// execute (go test keeps its build directory private to root).
func HelperBinary(t testing.TB) string {
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

// PodLab is a node with a bridge, a pod attached to it by a veth, and a
// coordinator beyond the node (HTTPS, DERP, STUN and DNS on 203.0.113.10).
type PodLab struct {
	Lab         *netlab.Lab
	Node, Pod   *netlab.Namespace
	Coord       *netlab.Namespace
	Fingerprint string
	CoordURL    string
	HTTPS       *http.Server
	Root        string // the node's file tree for --host
	// DNSDelay (nanoseconds) holds back every DNS answer: a slow resolver.
	DNSDelay atomic.Int64
}

const (
	CoordIP   = "203.0.113.10"
	CoordName = "coord.test"
)

func New(t testing.TB) *PodLab {
	t.Helper()
	lab := netlab.New(t)
	pl := &PodLab{Lab: lab}
	pl.Node = lab.Namespace("node")
	pl.Pod = lab.Namespace("pod")
	pl.Coord = lab.Namespace("coord")
	pl.Node.Bridge("cni0", "10.88.0.1/24")
	lab.Link(pl.Node, "veth1", "", pl.Pod, "eth0", "10.88.0.2/24")
	pl.Node.Attach("veth1", "cni0")
	pl.Pod.Route("default via 10.88.0.1")
	pl.Pod.Sysctl("net.ipv4.ping_group_range", "0 2147483647")
	lab.Link(pl.Node, "eth0", "203.0.113.1/24", pl.Coord, "eth0", CoordIP+"/24")
	pl.Coord.Route("default via 203.0.113.1")
	pl.Node.Route("default via " + CoordIP)
	pl.Node.EnableForwarding()
	pl.Node.Masquerade("eth0", netlab.NATEndpointIndependent)
	pl.Pod.WriteEtc("resolv.conf", "nameserver "+CoordIP+"\noptions timeout:1\n")
	pl.Pod.WriteEtc("hosts", "127.0.0.1 localhost\n")

	// Node file tree: a bridge CNI configured for cni0.
	pl.Root = t.TempDir()
	WriteFile(t, pl.Root, "etc/cni/net.d/10-lab.conflist", `{"cniVersion":"1.0.0","name":"lab","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/24"}]]}}]}`)

	pl.startCoordinator(t)
	return pl
}

func WriteFile(t testing.TB, root, p, content string) {
	t.Helper()
	full := filepath.Join(root, p)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func SelfSigned(t testing.TB) (tls.Certificate, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: CoordName},
		DNSNames:     []string{CoordName},
		IPAddresses:  []net.IP{net.ParseIP(CoordIP)},
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
func (pl *PodLab) startCoordinator(t testing.TB) {
	t.Helper()
	cert, fp := SelfSigned(t)
	pl.Fingerprint = fp
	pl.CoordURL = "https://" + CoordName + ":443"

	var derp *tailnet.DERPServer
	var stun *tailnet.STUNServer
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	err := pl.Coord.Do(func() error {
		var err error
		derp, err = tailnet.NewDERPServer(nil)
		if err != nil {
			return err
		}
		stun, err = tailnet.ListenSTUN(ctx, CoordIP+":3478", nil)
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
	ln, err := pl.Coord.Listen("tcp", CoordIP+":443")
	if err != nil {
		t.Fatal(err)
	}
	pl.HTTPS = &http.Server{
		Handler:      mux,
		TLSConfig:    &tls.Config{Certificates: []tls.Certificate{cert}},
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	go pl.HTTPS.ServeTLS(ln, "", "")
	t.Cleanup(func() { pl.HTTPS.Close() })

	dns, err := pl.Coord.ListenPacket("udp", CoordIP+":53")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	go ServeDNS(dns, &pl.DNSDelay)
}

// serveDNS answers A queries for coord.test and NXDOMAIN otherwise (NS for
// the root gets an empty NOERROR).
func ServeDNS(pc net.PacketConn, delay *atomic.Int64) {
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
		case strings.EqualFold(qq.Name.String(), CoordName+".") && qq.Type == dnsmessage.TypeA:
			resp.Answers = []dnsmessage.Resource{{
				Header: dnsmessage.ResourceHeader{Name: qq.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60},
				Body:   &dnsmessage.AResource{A: netip.MustParseAddr(CoordIP).As4()},
			}}
		case strings.EqualFold(qq.Name.String(), CoordName+"."):
		case qq.Name.String() == ".":
		default:
			resp.RCode = dnsmessage.RCodeNameError
		}
		out, err := resp.Pack()
		if err == nil {
			if d := time.Duration(delay.Load()); d > 0 {
				// A slow resolver: answer later, without holding up the
				// next query.
				go func() {
					time.Sleep(d)
					_, _ = pc.WriteTo(out, from)
				}()
				continue
			}
			_, _ = pc.WriteTo(out, from)
		}
	}
}

package portforward

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/protocol"
)

// A table as the kernel prints it on a little-endian machine.
const sampleTCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 0 1 0000000000000000 20 4 30 10 -1
`

const sampleTCP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5555 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5556 1 0000000000000000 100 0 0 10 0
`

func TestParseSocketTable(t *testing.T) {
	if !littleEndian() {
		t.Skip("sample tables are in little-endian byte order")
	}
	v4, err := parseSocketTable(strings.NewReader(sampleTCP))
	if err != nil {
		t.Fatal(err)
	}
	want := []socketEntry{
		{netip.MustParseAddrPort("127.0.0.1:8080"), tcpListen, 4242},
		{netip.MustParseAddrPort("0.0.0.0:22"), tcpListen, 4243},
		{netip.MustParseAddrPort("127.0.0.1:8080"), 1, 0},
	}
	if !slices.Equal(v4, want) {
		t.Fatalf("tcp table:\n got %v\nwant %v", v4, want)
	}
	v6, err := parseSocketTable(strings.NewReader(sampleTCP6))
	if err != nil {
		t.Fatal(err)
	}
	want = []socketEntry{
		{netip.MustParseAddrPort("[::1]:8080"), tcpListen, 5555},
		{netip.MustParseAddrPort("127.0.0.1:3000"), tcpListen, 5556},
	}
	if !slices.Equal(v6, want) {
		t.Fatalf("tcp6 table:\n got %v\nwant %v", v6, want)
	}
	if _, err := parseSocketTable(strings.NewReader("head\n 0: zz:1 00:0 0A 0 0 0 0 0 0 1\n")); err == nil {
		t.Fatal("a malformed address was accepted")
	}
}

func littleEndian() bool {
	ap, err := parseHexAddrPort("0100007F:0001")
	return err == nil && ap.Addr() == netip.MustParseAddr("127.0.0.1")
}

// A fake /proc built from the samples: v4 and v6 sockets on port 8080 are
// one entry, port 22 has no readable owner, the v4-mapped port 3000 shows
// as 127.0.0.1, and the agent's own socket is left out.
func TestDiscoveryFromFakeProc(t *testing.T) {
	if !littleEndian() {
		t.Skip("sample tables are in little-endian byte order")
	}
	proc := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(proc, "net"), 0o755))
	must(os.WriteFile(filepath.Join(proc, "net", "tcp"), []byte(sampleTCP), 0o644))
	must(os.WriteFile(filepath.Join(proc, "net", "tcp6"), []byte(sampleTCP6), 0o644))
	addProc := func(pid, comm string, inodes ...string) {
		fd := filepath.Join(proc, pid, "fd")
		must(os.MkdirAll(fd, 0o755))
		must(os.WriteFile(filepath.Join(proc, pid, "comm"), []byte(comm+"\n"), 0o644))
		for i, ino := range inodes {
			must(os.Symlink("socket:["+ino+"]", filepath.Join(fd, string(rune('3'+i)))))
		}
		must(os.Symlink("/dev/null", filepath.Join(fd, "0")))
	}
	addProc("100", "node", "4242", "5555")
	addProc("200", "agent", "5556")

	d := NewDiscovery(DiscoveryOptions{Proc: proc, SelfPID: 200})
	ports, err := d.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []protocol.ListeningPort{
		{Port: 22, Network: "tcp", Addresses: []string{"0.0.0.0"}},
		{Port: 8080, Network: "tcp", Addresses: []string{"127.0.0.1", "::1"}, Process: "node", PID: 100},
	}
	if !jsonEqual(ports, want) {
		t.Fatalf("ports:\n got %+v\nwant %+v", ports, want)
	}
}

func jsonEqual(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

func TestDiscoveryWithoutProc(t *testing.T) {
	d := NewDiscovery(DiscoveryOptions{Proc: t.TempDir()})
	_, err := d.List(context.Background())
	if err == nil || !strings.Contains(err.Error(), "is /proc mounted?") {
		t.Fatalf("error %v, want one that says the socket table is missing", err)
	}
}

func findPort(ports []protocol.ListeningPort, port uint16) *protocol.ListeningPort {
	for i := range ports {
		if ports[i].Port == port {
			return &ports[i]
		}
	}
	return nil
}

// On the real /proc: a port appears when a socket listens and disappears
// when it closes; v4 and v6 listeners on one port are one entry; the owning
// process is named; the agent's own sockets are hidden.
func TestDiscoverySeesPortOpenAndClose(t *testing.T) {
	if _, err := os.Stat("/proc/net/tcp"); err != nil {
		t.Skipf("no /proc/net/tcp here: %v", err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln6, err := net.Listen("tcp6", fmt.Sprintf("[::1]:%d", port))
	if err != nil {
		ln6 = nil
		t.Logf("no IPv6 loopback listener on the same port: %v", err)
	}

	// Pretend the agent is another process, so this test's own listener
	// counts as a workspace program.
	asWorkspace := NewDiscovery(DiscoveryOptions{SelfPID: -1, CacheFor: -1})
	ports, err := asWorkspace.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	p := findPort(ports, port)
	if p == nil {
		t.Fatalf("port %d not listed: %+v", port, ports)
	}
	wantAddrs := []string{"127.0.0.1"}
	if ln6 != nil {
		wantAddrs = append(wantAddrs, "::1")
	}
	if !slices.Equal(p.Addresses, wantAddrs) {
		t.Errorf("addresses %v, want %v", p.Addresses, wantAddrs)
	}
	comm, _ := os.ReadFile("/proc/self/comm")
	if p.PID != os.Getpid() || p.Process != strings.TrimSpace(string(comm)) {
		t.Errorf("owner %q pid %d, want %q pid %d", p.Process, p.PID, strings.TrimSpace(string(comm)), os.Getpid())
	}

	// As the agent itself, its own listener is hidden.
	asAgent := NewDiscovery(DiscoveryOptions{CacheFor: -1})
	ports, err = asAgent.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if findPort(ports, port) != nil {
		t.Errorf("the agent's own port %d is listed", port)
	}

	ln.Close()
	if ln6 != nil {
		ln6.Close()
	}
	ports, err = asWorkspace.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if findPort(ports, port) != nil {
		t.Fatalf("port %d still listed after it closed", port)
	}
}

func TestDiscoveryCache(t *testing.T) {
	d := NewDiscovery(DiscoveryOptions{SelfPID: -1, CacheFor: time.Hour})
	if _, err := d.List(context.Background()); err != nil {
		t.Skipf("no /proc here: %v", err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ports, _ := d.List(context.Background())
	if findPort(ports, uint16(ln.Addr().(*net.TCPAddr).Port)) != nil {
		t.Fatal("a cached list showed a port opened after the scan")
	}
}

func TestPortsHandler(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := NewDiscovery(DiscoveryOptions{SelfPID: -1, CacheFor: -1})
	srv := httptest.NewServer(d)
	defer srv.Close()

	resp, err := http.Get(srv.URL + "/api/v1/ports")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET: %s %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	var ports []protocol.ListeningPort
	if err := json.NewDecoder(resp.Body).Decode(&ports); err != nil {
		t.Fatalf("body is not a JSON list of ports: %v", err)
	}
	if findPort(ports, uint16(ln.Addr().(*net.TCPAddr).Port)) == nil {
		t.Fatalf("listening port missing from %+v", ports)
	}

	resp, err = http.Post(srv.URL+"/api/v1/ports", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "GET, HEAD" {
		t.Fatalf("POST: %s, Allow %q", resp.Status, resp.Header.Get("Allow"))
	}
}

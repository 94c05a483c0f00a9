package podmantest

import (
	"context"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

// TestContainerNetworkStaysInTestNamespace runs a busybox container and
// checks that podman's bridge appears in the test's namespace and not on the
// machine's own network.
func TestContainerNetworkStaysInTestNamespace(t *testing.T) {
	lab := netlab.New(t)
	ns := lab.Namespace("pmtest")
	p := New(t, ns.Path())
	p.BusyboxBase("localhost/pmtest-base:1")

	hostLinksBefore := hostLinks(t)
	c := p.Start(RunOptions{Image: "localhost/pmtest-base:1", Name: "pmtest-sleeper", Entrypoint: "/bin/sleep", Args: []string{"300"}})
	ip := net.ParseIP(c.IP())
	if ip == nil || !strings.HasPrefix(ip.String(), "10.") {
		t.Fatalf("container address %q, want one in podman's 10.x bridge network", c.IP())
	}
	links := ns.IP("-o", "link", "show")
	if !strings.Contains(links, "master") || !strings.Contains(links, "veth") {
		t.Errorf("no bridge with a veth port in the test namespace:\n%s", links)
	}
	if after := hostLinks(t); after != hostLinksBefore {
		t.Errorf("the machine's own interfaces changed while the container ran:\nbefore: %s\nafter:  %s", hostLinksBefore, after)
	}
	// The container reaches the bridge's gateway: the path is real.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bridge := p.Bridge()
	gw := ns.IP("-4", "-o", "addr", "show", bridge)
	if !strings.Contains(gw, "inet ") {
		t.Fatalf("%s has no IPv4 address in the test namespace:\n%s", bridge, gw)
	}
	if want := p.Gateway(); !strings.Contains(gw, "inet "+want+"/") {
		t.Errorf("Gateway() = %s, but %s has %s", want, bridge, gw)
	}
	addr := strings.Split(strings.Fields(gw[strings.Index(gw, "inet "):])[1], "/")[0]
	l, err := ns.Listen("tcp", net.JoinHostPort(addr, "0"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("hello from the test namespace\n"))
	})}
	go srv.Serve(l)
	defer srv.Close()
	if out, err := c.Exec(ctx, "wget", "-q", "-O", "-", "http://"+l.Addr().String()+"/"); err != nil || !strings.Contains(out, "hello from the test namespace") {
		t.Errorf("the container cannot fetch from its gateway %s: %v\n%s", l.Addr(), err, out)
	}
	if out, err := c.Exec(ctx, "id", "-u"); err != nil || strings.TrimSpace(out) != "0" {
		t.Errorf("id -u in the container: %q, %v", out, err)
	}
}

// hostLinks lists the machine's own interface names.
func hostLinks(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	return strings.Join(names, " ")
}

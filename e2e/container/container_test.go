// Package container runs the workspace image end to end: built from
// Dockerfile.agent with podman, started with runc in a test network
// namespace, registered with a real coordinator, reached over SSH through
// the tailnet, diagnosed by netcheck from inside and from the node side, and
// scraped for health and metrics.
package container

import (
	"context"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/agentd/agent/internal/netlab"
	"github.com/agentd/agent/internal/podmantest"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		t.Fatalf("go list -m: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// buildAgent builds the binary the way Dockerfile.agent's build stage does:
// static and stripped.
func buildAgent(t *testing.T, root string) string {
	t.Helper()
	if prebuilt := os.Getenv("AGENT_TEST_BINARY"); prebuilt != "" {
		// Built beforehand, e.g. once by CI for several packages. The image
		// may have no C library, so it must be static.
		f, err := elf.Open(prebuilt)
		if err != nil {
			t.Fatalf("AGENT_TEST_BINARY: %v", err)
		}
		defer f.Close()
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Fatalf("AGENT_TEST_BINARY=%s is dynamically linked; build it with CGO_ENABLED=0", prebuilt)
			}
		}
		return prebuilt
	}
	bin := filepath.Join(t.TempDir(), "agent")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "./cmd/agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the agent: %v\n%s", err, out)
	}
	fi, _ := os.Stat(bin)
	t.Logf("static agent binary: %.1f MiB (built in %v)", float64(fi.Size())/(1<<20), time.Since(start).Round(time.Second))
	return bin
}

// admin runs `agent admin --json` against the coordinator's data directory.
func admin(t *testing.T, bin, dataDir string, args ...string) map[string]any {
	t.Helper()
	out, err := exec.Command(bin, append([]string{"admin", "--data-dir", dataDir, "--json"}, args...)...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("agent admin %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	var v map[string]any
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("agent admin %s: not JSON: %v\n%s", strings.Join(args, " "), err, out)
	}
	return v
}

// serveDNS answers every query in the namespace with an empty success, so
// the workspace's resolver check finds a working nameserver (the machine's
// own nameservers are unreachable from a test namespace, by design).
func serveDNS(t *testing.T, ns *netlab.Namespace) {
	t.Helper()
	pc, err := ns.ListenPacket("udp4", "0.0.0.0:53")
	if err != nil {
		t.Fatalf("DNS responder: %v", err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var q dnsmessage.Message
			if q.Unpack(buf[:n]) != nil {
				continue
			}
			resp := dnsmessage.Message{
				Header:    dnsmessage.Header{ID: q.Header.ID, Response: true, RecursionAvailable: true, RecursionDesired: q.Header.RecursionDesired},
				Questions: q.Questions,
			}
			if b, err := resp.Pack(); err == nil {
				pc.WriteTo(b, from)
			}
		}
	}()
}

// httpIn is an HTTP client whose connections start inside the namespace.
func httpIn(ns *netlab.Namespace) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return ns.DialContext(ctx, network, addr)
			},
			DisableKeepAlives: true,
		},
	}
}

func get(t *testing.T, c *http.Client, url string) (int, []byte, error) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

type netcheckReport struct {
	Status  string `json:"status"`
	Summary string `json:"summary"`
	Checks  []struct {
		ID      string `json:"id"`
		Status  string `json:"status"`
		Summary string `json:"summary"`
	} `json:"checks"`
}

func parseReport(t *testing.T, what, out string) netcheckReport {
	t.Helper()
	var r netcheckReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("%s: report is not JSON: %v\n%s", what, err, out)
	}
	return r
}

func (r netcheckReport) check(id string) (status, summary string) {
	for _, c := range r.Checks {
		if c.ID == id {
			return c.Status, c.Summary
		}
	}
	return "", ""
}

func TestWorkspaceContainer(t *testing.T) {
	if testing.Short() {
		t.Skip("builds images and runs a container; skipped in -short mode")
	}
	lab := netlab.New(t)
	ns := lab.Namespace("ctr")
	pm := podmantest.New(t, ns.Path())
	root := repoRoot(t)
	bin := buildAgent(t, root)
	pm.BusyboxBase("localhost/e2e-base:1")

	// Images: the workspace, and the minimal agent image (coordinator,
	// node DaemonSet), both from the prebuilt binary.
	start := time.Now()
	pm.Build(podmantest.BuildOptions{RepoRoot: root, AgentBinary: bin, Target: "workspace-from-binary",
		Tag: "localhost/e2e-workspace:1", BuildArgs: map[string]string{"BASE_IMAGE": "localhost/e2e-base:1"}})
	pm.Build(podmantest.BuildOptions{RepoRoot: root, AgentBinary: bin, Target: "agent-from-binary", Tag: "localhost/e2e-agent:1"})
	t.Logf("two images built in %v", time.Since(start).Round(100*time.Millisecond))
	if cfg := pm.MustRun(time.Minute, "image", "inspect", "--format", "{{.Config.User}} {{.Config.Entrypoint}}", "localhost/e2e-workspace:1"); strings.TrimSpace(cfg) != "1000:1000 [/usr/local/bin/start-workspace]" {
		t.Errorf("workspace image user and entrypoint: %q", cfg)
	}
	ver := pm.MustRun(time.Minute, "run", "--rm", "--pull=never", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
		"localhost/e2e-agent:1", "version", "--json")
	var vinfo struct {
		GoVersion string `json:"go_version"`
	}
	if err := json.Unmarshal([]byte(ver), &vinfo); err != nil || vinfo.GoVersion == "" {
		t.Errorf("`agent version --json` in the minimal image: %v\n%s", err, ver)
	}

	// The coordinator, in the test namespace, reachable from containers at
	// the bridge's gateway address.
	gw := pm.Gateway()
	if gw == "" {
		t.Fatal("podman's default network has no gateway")
	}
	url := "https://" + net.JoinHostPort(gw, "8443")
	data := t.TempDir()
	admin(t, bin, data, "user", "create", "alice")
	agentTok, _ := admin(t, bin, data, "agent", "create", "ws1", "--owner", "alice")["secret"].(string)
	userTok, _ := admin(t, bin, data, "token", "create", "--user", "alice")["secret"].(string)
	if agentTok == "" || userTok == "" {
		t.Fatal("agent admin printed no token secrets")
	}
	admin(t, bin, data, "grant", "alice", "ws1")
	ns.Start(bin, "coordinator", "--data-dir", data, "--listen", "0.0.0.0:8443", "--stun-addr", "0.0.0.0:3478",
		"--access-url", url, "--metrics-addr", "127.0.0.1:2114")
	var fingerprint string
	for deadline := time.Now().Add(30 * time.Second); fingerprint == ""; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the coordinator did not come up within 30 s")
		}
		out, err := exec.Command(bin, "admin", "--data-dir", data, "--json", "info").Output()
		var info struct {
			Running     bool   `json:"running"`
			Fingerprint string `json:"fingerprint"`
		}
		if err == nil && json.Unmarshal(out, &info) == nil && info.Running {
			fingerprint = info.Fingerprint
		}
	}
	serveDNS(t, ns)

	// The token file as a Kubernetes Secret would present it: read-only,
	// readable by the workspace user only.
	tokDir := t.TempDir()
	tokFile := filepath.Join(tokDir, "token")
	if err := os.WriteFile(tokFile, []byte(agentTok+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(tokFile, 1000, 1000); err != nil {
		t.Fatal(err)
	}

	started := time.Now()
	c := pm.Start(podmantest.RunOptions{
		Image: "localhost/e2e-workspace:1",
		Name:  "ws1",
		Env: []string{
			"AGENT_URL=" + url,
			"AGENT_FINGERPRINT=" + fingerprint,
			"AGENT_TOKEN_FILE=/run/agent/token",
			"AGENT_HEALTH_ADDR=0.0.0.0:2113",
			"AGENT_WAIT_INTERVAL=1",
		},
		Mounts: []string{tokFile + ":/run/agent/token:ro"},
		DNS:    []string{gw},
	})
	ip := c.IP()
	hc := httpIn(ns)
	health := "http://" + net.JoinHostPort(ip, "2113")

	// Ready: registered with the coordinator and the tailnet up.
	var ready struct {
		Name                 string `json:"name"`
		CoordinatorConnected bool   `json:"coordinator_connected"`
		TailnetUp            bool   `json:"tailnet_up"`
	}
	for {
		code, body, err := get(t, hc, health+"/readyz")
		if err == nil && code == http.StatusOK && json.Unmarshal(body, &ready) == nil && ready.CoordinatorConnected && ready.TailnetUp {
			break
		}
		if time.Since(started) > 60*time.Second {
			t.Fatalf("the agent was not ready within 60 s (last: %d %s %v)\n%s", code, body, err, c.Logs())
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("podman run to /readyz 200: %v", time.Since(started).Round(10*time.Millisecond))
	if ready.Name != "ws1" {
		t.Errorf("/readyz name %q, want ws1", ready.Name)
	}
	if code, body, err := get(t, hc, health+"/healthz"); err != nil || code != http.StatusOK {
		t.Errorf("/healthz: %d %s %v", code, body, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// The agent is PID 1 (through exec from start-workspace, then its own
	// reaper) and runs as the image's non-root user.
	if out, err := c.Exec(ctx, "cat", "/proc/1/cmdline"); err != nil || !strings.HasPrefix(strings.ReplaceAll(out, "\x00", " "), "/usr/local/bin/agent run") {
		t.Errorf("PID 1 is %q (%v), want the agent (start-workspace must exec it)", strings.ReplaceAll(out, "\x00", " "), err)
	}

	// SSH through the tailnet with the laptop client, run in the namespace.
	clientHome := t.TempDir()
	sshCmd := func(remote string) (string, error) {
		return ns.Run(ctx, "env", "HOME="+clientHome, bin, "ssh", "--url", url, "--token", userTok, "--fingerprint", fingerprint, "ws1", "--", remote)
	}
	out, err := sshCmd("id -u; hostname; env")
	if err != nil {
		t.Fatalf("agent ssh ws1: %v", err)
	}
	if !strings.Contains(out, "\n1000\n") && !strings.HasPrefix(out, "1000\n") {
		t.Errorf("the SSH session does not run as uid 1000:\n%s", out)
	}
	if strings.Contains(out, agentTok) || strings.Contains(out, "AGENT_TOKEN") {
		t.Errorf("the SSH session's environment carries the agent token:\n%s", out)
	}

	// OpenSSH through `agent ssh --stdio` as its ProxyCommand.
	if sshBin, err := exec.LookPath("ssh"); err == nil {
		proxy := fmt.Sprintf("env HOME=%s %s ssh --stdio --url %s --token %s --fingerprint %s %%n", clientHome, bin, url, userTok, fingerprint)
		out, err := ns.Run(ctx, sshBin, "-F", "/dev/null", "-o", "ProxyCommand="+proxy,
			"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
			"dev@ws1", "echo openssh-says-hello from $(id -un)")
		if err != nil || !strings.Contains(out, "openssh-says-hello from dev") {
			t.Errorf("OpenSSH through agent ssh --stdio: %v\n%s", err, out)
		}
	} else {
		t.Log("OpenSSH client not installed: only agent ssh was tested (apt-get install openssh-client)")
	}

	// Orphans of sessions are reaped: a background child outlives its shell.
	if _, err := sshCmd("sh -c 'sleep 1 & exit 0'"); err != nil {
		t.Errorf("ssh orphan maker: %v", err)
	}
	time.Sleep(3 * time.Second)
	if ps, err := c.Exec(ctx, "ps", "-o", "pid,stat,comm"); err != nil {
		t.Errorf("ps: %v", err)
	} else {
		for _, line := range strings.Split(ps, "\n")[1:] {
			if f := strings.Fields(line); len(f) >= 2 && strings.HasPrefix(f[1], "Z") {
				t.Errorf("zombie left in the container (PID 1 does not reap):\n%s", ps)
				break
			}
		}
	}

	// netcheck inside the container: the bridge path, DNS, HTTPS with the
	// pin, DERP and UDP all work.
	out, err = c.Exec(ctx, "agent", "netcheck", "--coordinator-url", url, "--fingerprint", fingerprint, "--json")
	rep := parseReport(t, "netcheck in the container", jsonPart(out))
	if err != nil || rep.Status != "ok" {
		t.Errorf("netcheck in the container: status %q (%v): %s\n%s", rep.Status, err, rep.Summary, out)
	}
	for _, id := range []string{"link", "address", "route", "gateway", "https", "derp", "udp"} {
		if st, sum := rep.check(id); st != "ok" {
			t.Errorf("netcheck in the container: check %s is %q: %s", id, st, sum)
		}
	}

	// netcheck --host beside it, in the namespace that holds the bridge
	// and the container's veth. Its file tree is an empty root: the
	// machine's own CNI and networkd files describe another network.
	hostRoot := t.TempDir()
	bridge := pm.Bridge()
	out, err = ns.Run(ctx, bin, "netcheck", "--host", "--root", hostRoot, "--bridge", bridge, "--json")
	hrep := parseReport(t, "netcheck --host", jsonPart(out))
	if err != nil || hrep.Status != "ok" {
		t.Errorf("netcheck --host: status %q (%v): %s\n%s", hrep.Status, err, hrep.Summary, out)
	}
	if st, sum := hrep.check("bridges"); st != "ok" || !strings.Contains(sum, bridge) {
		t.Errorf("netcheck --host bridges: %q %s", st, sum)
	}
	if st, sum := hrep.check("veths"); st != "ok" || !strings.Contains(sum, "1 in a bridge") {
		t.Errorf("netcheck --host veths: %q %s", st, sum)
	}

	// The node check as the DaemonSet runs it (deploy/kubernetes/
	// netcheck-daemonset.yaml): minimal image, the node's network, user
	// 65534, read-only root, no capabilities, node directories mounted
	// read-only under /host (empty here: the machine's describe another
	// network).
	nodeDirs := t.TempDir()
	dsArgs := []string{"run", "--rm", "--pull=never", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
		"--network", "host", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", "65534:65534"}
	for _, d := range []string{"/etc/systemd", "/run/systemd", "/usr/lib/systemd", "/lib/systemd", "/etc/cni/net.d"} {
		src := filepath.Join(nodeDirs, d)
		if err := os.MkdirAll(src, 0o755); err != nil {
			t.Fatal(err)
		}
		dsArgs = append(dsArgs, "--volume", src+":/host"+d+":ro")
	}
	dsArgs = append(dsArgs, "localhost/e2e-agent:1", "netcheck", "--host", "--root", "/host", "--bridge", bridge, "--json")
	out, err = pm.Run(ctx, dsArgs...)
	drep := parseReport(t, "netcheck --host in the DaemonSet's container", jsonPart(out))
	if err != nil || drep.Status != "ok" {
		t.Errorf("netcheck --host as the DaemonSet runs it: status %q (%v): %s\n%s", drep.Status, err, drep.Summary, out)
	}
	if st, sum := drep.check("veths"); st != "ok" || !strings.Contains(sum, "1 in a bridge") {
		t.Errorf("netcheck --host in the DaemonSet's container, veths: %q %s", st, sum)
	}

	// Metrics: every series of the agent set, the SSH connections counted,
	// the network verdict healthy.
	checkMetrics(t, hc, health+"/metrics")

	// A client with a wrong token is refused, and the coordinator counts it.
	if out, err := ns.Run(ctx, "env", "HOME="+clientHome, bin, "ssh", "--url", url, "--token", "usr_not-a-real-token",
		"--fingerprint", fingerprint, "ws1", "--", "true"); err == nil {
		t.Errorf("agent ssh with a wrong token succeeded:\n%s", out)
	}
	checkCoordinatorMetrics(t, hc, "http://127.0.0.1:2114/metrics")

	// Stop as a runtime does: SIGTERM must reach the agent (PID 1) and end
	// it well inside the grace period, with a clean exit.
	took, code := c.Stop(20 * time.Second)
	t.Logf("podman stop: %v, exit code %d", took.Round(10*time.Millisecond), code)
	if took > 15*time.Second || code != 0 {
		t.Errorf("stop took %v with exit code %d; want a clean exit soon after SIGTERM\n%s", took, code, c.Logs())
	}
}

// jsonPart drops anything podman exec or a log line put before the report.
func jsonPart(out string) string {
	if i := strings.Index(out, "{"); i > 0 {
		return out[i:]
	}
	return out
}

func checkMetrics(t *testing.T, hc *http.Client, url string) {
	t.Helper()
	var families map[string]*dto.MetricFamily
	// The network verdict comes from the agent's watch loop: allow it a
	// few rounds to see the (now working) resolver.
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body, err := get(t, hc, url)
		if err != nil || code != http.StatusOK {
			t.Fatalf("GET /metrics: %d %v", code, err)
		}
		p := expfmt.NewTextParser(model.UTF8Validation)
		families, err = p.TextToMetricFamilies(strings.NewReader(string(body)))
		if err != nil {
			t.Fatalf("parse /metrics: %v", err)
		}
		if v, ok := sample(families, "agent_netcheck_status", nil); (ok && v == 0) || time.Now().After(deadline) {
			if !ok || v != 0 {
				t.Errorf("agent_netcheck_status = %v (present %v), want 0 (ok)", v, ok)
			}
			break
		}
		time.Sleep(time.Second)
	}
	for _, kind := range []string{"ssh", "port_forward_tcp", "port_forward_udp"} {
		for _, name := range []string{"agent_connections_total", "agent_connections_active", "agent_sessions_total", "agent_sessions_active"} {
			if _, ok := sample(families, name, map[string]string{"kind": kind}); !ok {
				t.Errorf("/metrics lacks %s{kind=%q}", name, kind)
			}
		}
		for _, dir := range []string{"in", "out"} {
			if _, ok := sample(families, "agent_bytes_total", map[string]string{"kind": kind, "direction": dir}); !ok {
				t.Errorf("/metrics lacks agent_bytes_total{kind=%q,direction=%q}", kind, dir)
			}
		}
	}
	// Three SSH connections were made: agent ssh twice, OpenSSH once (or
	// twice without OpenSSH).
	if v, _ := sample(families, "agent_connections_total", map[string]string{"kind": "ssh"}); v < 2 {
		t.Errorf("agent_connections_total{kind=ssh} = %v, want at least 2", v)
	}
	// The SSH sessions of this test are counted by session and in bytes
	// both ways (the exact counts are checked in agent/sshd).
	if v, _ := sample(families, "agent_sessions_total", map[string]string{"kind": "ssh"}); v < 2 {
		t.Errorf("agent_sessions_total{kind=ssh} = %v, want at least 2", v)
	}
	if v, _ := sample(families, "agent_ssh_sessions_total", map[string]string{"type": "exec"}); v < 1 {
		t.Errorf("agent_ssh_sessions_total{type=exec} = %v, want at least 1", v)
	}
	for _, dir := range []string{"in", "out"} {
		if v, _ := sample(families, "agent_bytes_total", map[string]string{"kind": "ssh", "direction": dir}); v <= 0 {
			t.Errorf("agent_bytes_total{kind=ssh,direction=%s} = %v, want more than 0", dir, v)
		}
	}
	var got []string
	for _, s := range []struct {
		name   string
		labels map[string]string
	}{
		{"agent_connections_active", map[string]string{"kind": "ssh"}},
		{"agent_sessions_total", map[string]string{"kind": "ssh"}},
		{"agent_bytes_total", map[string]string{"kind": "ssh", "direction": "in"}},
		{"agent_bytes_total", map[string]string{"kind": "ssh", "direction": "out"}},
	} {
		v, _ := sample(families, s.name, s.labels)
		var ls []string
		for k, val := range s.labels {
			ls = append(ls, k+"="+val)
		}
		sort.Strings(ls)
		got = append(got, fmt.Sprintf("%s{%s}=%v", s.name, strings.Join(ls, ","), v))
	}
	if pp, ok := families["agent_peer_path"]; ok {
		got = append(got, fmt.Sprintf("agent_peer_path series=%d", len(pp.GetMetric())))
	}
	t.Logf("agent metrics after the SSH sessions: %s", strings.Join(got, " "))
	for _, name := range []string{"go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := families[name]; !ok {
			t.Errorf("/metrics lacks %s", name)
		}
	}
	if v, ok := sample(families, "process_resident_memory_bytes", nil); ok {
		t.Logf("agent resident memory after the sessions: %.1f MiB", v/(1<<20))
	}
}

// sample returns the value of the series of name with exactly labels.
func sample(families map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	f, ok := families[name]
	if !ok {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) != len(labels) {
			continue
		}
		match := true
		for _, l := range m.GetLabel() {
			if labels[l.GetName()] != l.GetValue() {
				match = false
			}
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Untyped != nil:
			return m.Untyped.GetValue(), true
		}
	}
	return 0, false
}

// scrape fetches and parses a Prometheus endpoint.
func scrape(t *testing.T, hc *http.Client, url string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body, err := get(t, hc, url)
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET %s: %d %v", url, code, err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse %s: %v", url, err)
	}
	return families
}

func checkCoordinatorMetrics(t *testing.T, hc *http.Client, url string) {
	t.Helper()
	f := scrape(t, hc, url)
	if v, ok := sample(f, "coordinator_peers_connected", map[string]string{"role": "agent"}); !ok || v != 1 {
		t.Errorf("coordinator_peers_connected{role=agent} = %v (present %v), want 1", v, ok)
	}
	if _, ok := sample(f, "coordinator_peers_connected", map[string]string{"role": "client"}); !ok {
		t.Error("coordinator_peers_connected{role=client} missing")
	}
	if _, ok := sample(f, "coordinator_tunnels", nil); !ok {
		t.Error("coordinator_tunnels missing")
	}
	if v, _ := sample(f, "coordinator_messages_rejected_total", map[string]string{"reason": "unauthorized"}); v < 1 {
		t.Errorf("coordinator_messages_rejected_total{reason=unauthorized} = %v after a wrong token, want at least 1", v)
	}
	h := f["coordinator_node_update_fanout_seconds"]
	if h == nil || len(h.GetMetric()) != 1 || h.GetMetric()[0].GetHistogram().GetSampleCount() == 0 {
		t.Error("coordinator_node_update_fanout_seconds has no observations after agents and clients exchanged nodes")
	} else {
		hist := h.GetMetric()[0].GetHistogram()
		t.Logf("coordinator node update fan-out: %d updates, mean %.3f ms", hist.GetSampleCount(), 1000*hist.GetSampleSum()/float64(hist.GetSampleCount()))
	}
}

// TestDockerfileBuildsFromSource builds the default target (the workspace
// with the agent compiled in the Go build stage) and the minimal agent
// target from the repository, with a local stand-in for the golang image:
// the busybox base plus this machine's Go toolchain and caches.
func TestDockerfileBuildsFromSource(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles the agent inside an image build; skipped in -short mode")
	}
	lab := netlab.New(t)
	ns := lab.Namespace("src")
	pm := podmantest.New(t, ns.Path())
	root := repoRoot(t)
	pm.BusyboxBase("localhost/src-base:1")
	pm.LocalGoImage("localhost/src-go:1")
	args := map[string]string{
		"BASE_IMAGE": "localhost/src-base:1",
		"GO_IMAGE":   "localhost/src-go:1",
		"TARGETARCH": runtime.GOARCH,
	}
	start := time.Now()
	pm.Build(podmantest.BuildOptions{RepoRoot: root, Tag: "localhost/src-workspace:1", BuildArgs: args, Volumes: pm.GoBuildVolumes()})
	pm.Build(podmantest.BuildOptions{RepoRoot: root, Target: "agent", Tag: "localhost/src-agent:1", BuildArgs: args, Volumes: pm.GoBuildVolumes()})
	t.Logf("workspace and agent images built from source in %v", time.Since(start).Round(100*time.Millisecond))

	run := []string{"run", "--rm", "--pull=never", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}
	for _, c := range []struct {
		image string
		argv  []string
		user  string
	}{
		{"localhost/src-agent:1", []string{"version", "--json"}, "65534"},
		{"localhost/src-workspace:1", []string{"--entrypoint", "/usr/local/bin/agent", "localhost/src-workspace:1", "version", "--json"}, "1000"},
	} {
		argv := append(append([]string{}, run...), c.argv...)
		if c.argv[0] != "--entrypoint" {
			argv = append(append(append([]string{}, run...), c.image), c.argv...)
		}
		out := pm.MustRun(time.Minute, argv...)
		var info struct {
			GoVersion        string `json:"go_version"`
			Platform         string `json:"platform"`
			TailscaleVersion string `json:"tailscale_version"`
		}
		if err := json.Unmarshal([]byte(out), &info); err != nil {
			t.Fatalf("%s: agent version --json: %v\n%s", c.image, err, out)
		}
		if info.Platform != "linux/"+runtime.GOARCH || info.TailscaleVersion == "" {
			t.Errorf("%s: agent version reports %+v", c.image, info)
		}
		if user := pm.MustRun(time.Minute, "image", "inspect", "--format", "{{.Config.User}}", c.image); !strings.HasPrefix(strings.TrimSpace(user), c.user) {
			t.Errorf("%s runs as %q, want uid %s", c.image, strings.TrimSpace(user), c.user)
		}
	}
	// Static: the binary runs in the scratch image above, which has no C
	// library; stripped: no symbol table.
	out := pm.MustRun(time.Minute, "run", "--rm", "--pull=never", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
		"--entrypoint", "/bin/sh", "localhost/src-workspace:1", "-c", "wc -c < /usr/local/bin/agent")
	var size int64
	fmt.Sscan(strings.TrimSpace(out), &size)
	t.Logf("agent binary in the image: %.1f MiB", float64(size)/(1<<20))
}

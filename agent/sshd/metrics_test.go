package sshd_test

import (
	"bufio"
	"bytes"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/agent/sshd"
	"github.com/agentd/agent/internal/testkit/sshtest"
	"github.com/agentd/agent/metrics"
)

// series reads the registry as Prometheus does (its HTTP handler, text
// format) and returns every sample by its exposition name, e.g.
// `agent_connections_active{kind="ssh"}`.
func series(t *testing.T, reg *metrics.Registry) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	reg.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	out := map[string]float64{}
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// sample is one series' value, failing the test when the series is missing.
func sample(t *testing.T, s map[string]float64, name string) float64 {
	t.Helper()
	v, ok := s[name]
	if !ok {
		t.Fatalf("no series %s in the scrape", name)
	}
	return v
}

// waitIdle polls until no SSH connection or session is counted as active;
// the server finishes a connection shortly after the client is gone.
func waitIdle(t *testing.T, reg *metrics.Registry) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		s := series(t, reg)
		var busy []string
		for name, v := range s {
			if v != 0 && (strings.HasPrefix(name, `agent_connections_active{kind="ssh"}`) ||
				strings.HasPrefix(name, `agent_sessions_active{kind="ssh"}`) ||
				strings.HasPrefix(name, "agent_ssh_sessions_active")) {
				busy = append(busy, fmt.Sprintf("%s=%v", name, v))
			}
		}
		if len(busy) == 0 {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("still counted as active a minute after every client left: %v", busy)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// within reports whether got is the transferred size plus at most the SSH
// framing (packet headers, MACs, key exchange, window adjustments).
func within(got float64, size int) bool {
	return got >= float64(size) && got <= float64(size)*1.05+64<<10
}

// TestMetricsWithOpenSSH: real OpenSSH clients against a server with
// metrics; connections, sessions by type and bytes are counted, and the
// active gauges return to zero when the clients disconnect (including one
// killed mid-session).
func TestMetricsWithOpenSSH(t *testing.T) {
	sshtest.RequireTools(t, "ssh", "sftp")
	reg := metrics.NewRegistry()
	_, addr := startServer(t, sshd.Options{Metrics: metrics.NewAgent(reg)})
	tg := target(addr)
	connections := 0

	const size = 4 << 20
	r := tg.SSH(t, bytes.NewReader(make([]byte, size)), nil, "wc -c")
	connections++
	if r.Code != 0 || strings.TrimSpace(r.Stdout) != strconv.Itoa(size) {
		t.Fatalf("upload: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
	}
	s := waitIdle(t, reg)
	if in := sample(t, s, `agent_bytes_total{direction="in",kind="ssh"}`); !within(in, size) {
		t.Errorf("bytes in after a %d-byte upload: %v", size, in)
	}
	r = tg.SSH(t, nil, nil, fmt.Sprintf("head -c %d /dev/zero", size))
	connections++
	if r.Code != 0 || len(r.Stdout) != size {
		t.Fatalf("download: code %d, %d bytes, stderr %q", r.Code, len(r.Stdout), r.Stderr)
	}
	s = waitIdle(t, reg)
	if out := sample(t, s, `agent_bytes_total{direction="out",kind="ssh"}`); !within(out, size) {
		t.Errorf("bytes out after a %d-byte download: %v", size, out)
	}

	r = tg.SSH(t, strings.NewReader("exit 0\n"), []string{"-tt"}, "")
	connections++
	if r.Code != 0 {
		t.Fatalf("login shell: code %d stderr %q", r.Code, r.Stderr)
	}
	batch := filepath.Join(t.TempDir(), "batch")
	if err := os.WriteFile(batch, []byte("pwd\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sshtest.Run(t, nil, "sftp", append(tg.SSHArgs(), "-q", "-b", batch, tg.Host)...)
	connections++
	t.Run("LocalForward", func(t *testing.T) { sshtest.LocalForward(t, tg) })
	connections++

	// A client killed while its command runs: the connection and the
	// session stop counting as active once the server noticed.
	marker := fmt.Sprintf("sleep 3600.%d", time.Now().UnixNano()%1000000)
	cmd := exec.Command("ssh", append(tg.SSHArgs(), tg.Host, marker)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	connections++
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	sshtest.WaitProcess(t, marker, time.Minute)
	s = series(t, reg)
	if v := sample(t, s, `agent_connections_active{kind="ssh"}`); v != 1 {
		t.Errorf(`agent_connections_active{kind="ssh"} = %v with one client connected, want 1`, v)
	}
	if v := sample(t, s, `agent_ssh_sessions_active{type="exec"}`); v != 1 {
		t.Errorf(`agent_ssh_sessions_active{type="exec"} = %v with one command running, want 1`, v)
	}
	_ = cmd.Process.Kill()
	<-done
	sshtest.WaitNoProcess(t, marker, time.Minute)
	s = waitIdle(t, reg)

	if v := sample(t, s, `agent_connections_total{kind="ssh"}`); v != float64(connections) {
		t.Errorf(`agent_connections_total{kind="ssh"} = %v, want %d (one per client run)`, v, connections)
	}
	sessions := 0.0
	for _, c := range []struct {
		typ string
		min float64
	}{{"exec", 3}, {"shell", 1}, {"sftp", 1}, {"port_forward", 1}, {"agent_forward", 0}} {
		v := sample(t, s, fmt.Sprintf(`agent_ssh_sessions_total{type=%q}`, c.typ))
		sessions += v
		exact := c.typ != "port_forward" // the forward check may retry its connection
		if v < c.min || exact && v != c.min {
			t.Errorf(`agent_ssh_sessions_total{type=%q} = %v, want %v`, c.typ, v, c.min)
		}
	}
	if v := sample(t, s, `agent_sessions_total{kind="ssh"}`); v != sessions {
		t.Errorf(`agent_sessions_total{kind="ssh"} = %v, want %v (the sum over SSH session types)`, v, sessions)
	}
}

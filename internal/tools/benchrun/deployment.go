package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/agentd/agent/internal/benchtable"
)

// The deployment measurements run the built binary as a real deployment:
// `agent coordinator`, `agent run` against it, and `agent ssh` as the
// laptop, all on loopback inside a private network namespace (so nothing
// reaches the machine's own interfaces), in a child of this program.

const (
	deploymentChildArg = "deployment-child"
	sshRuns            = 7
	loadBytes          = 1 << 30
	rssTargetMB        = 40
	loadRSSTargetMB    = 48               // issue 13: during a 1 GiB transfer
	afterLoad          = 10 * time.Second // when the memory should be back near idle
)

// deploymentResult is what the child measured; the parent turns it into rows.
type deploymentResult struct {
	SSHTrueMS     []float64 `json:"ssh_true_ms"`
	OpenSSHTrueMS []float64 `json:"openssh_true_ms,omitempty"`
	OpenSSHNote   string    `json:"openssh_note,omitempty"`
	IdleRSSKiB    int64     `json:"idle_rss_kib"`
	IdleHWMKiB    int64     `json:"idle_hwm_kib"`
	LoadRSSKiB    int64     `json:"load_rss_kib"` // highest VmRSS sampled during the transfer
	LoadHWMKiB    int64     `json:"load_hwm_kib"`
	// The highest sample's split: anonymous memory (the heap, stacks) and
	// file pages (the binary's code and read-only data, shared and
	// reclaimable).
	LoadAnonKiB int64   `json:"load_anon_kib"`
	LoadFileKiB int64   `json:"load_file_kib"`
	IdleAnonKiB int64   `json:"idle_anon_kib"`
	IdleFileKiB int64   `json:"idle_file_kib"`
	LoadMBps    float64 `json:"load_mb_s"`
	AfterRSSKiB int64   `json:"after_rss_kib"` // afterLoad after the transfer ended
	// scp uploads through `agent ssh --stdio` and, the reference, to
	// OpenSSH's sshd through `agent port-forward` (MB/s).
	ProxySCPMBps   float64 `json:"proxy_scp_mb_s,omitempty"`
	ForwardSCPMBps float64 `json:"forward_scp_mb_s,omitempty"`
	ProxySCPNote   string  `json:"proxy_scp_note,omitempty"`
	// ProxySCPError fails the scp row alone: the memory rows measured
	// before it stand.
	ProxySCPError string `json:"proxy_scp_error,omitempty"`
}

var deploymentRowNames = []string{
	"agent ssh WORKSPACE true (end to end)",
	"agent run RSS, idle after a client connected",
	"agent run RSS, during an SSH transfer",
	"agent run RSS, 10 s after the transfer",
	"scp upload through agent ssh --stdio (ProxyCommand)",
}

// measureDeployment runs the child in a new network namespace: as root
// without a user namespace (OpenSSH's sshd, the reference, needs real
// root), otherwise in a user namespace, where the reference cannot run.
func measureDeployment(ctx context.Context, log io.Writer, bin string) []benchtable.Row {
	if _, err := exec.LookPath("unshare"); err != nil {
		return skipRows(deploymentRowNames, "needs unshare (util-linux) for a private network namespace")
	}
	nsArgs := []string{"--net"}
	if os.Geteuid() != 0 {
		nsArgs = []string{"--user", "--map-root-user", "--net"}
	}
	if out, err := exec.CommandContext(ctx, "unshare", append(nsArgs, "true")...).CombinedOutput(); err != nil {
		return skipRows(deploymentRowNames, fmt.Sprintf("no private network namespace here (unshare %s: %s)",
			strings.Join(nsArgs, " "), strings.TrimSpace(string(out))))
	}
	ctx, cancel := context.WithTimeout(ctx, 8*time.Minute)
	defer cancel()
	var res deploymentResult
	if err := runNamespaceChild(ctx, log, nsArgs, nil, "deployment measurements", &res, deploymentChildArg, bin, strconv.Itoa(os.Geteuid())); err != nil {
		return failRows(deploymentRowNames, err)
	}
	return res.rows()
}

func (r deploymentResult) rows() []benchtable.Row {
	ssh := benchtable.Reference{Name: "ssh to OpenSSH sshd on loopback", Note: r.OpenSSHNote}
	if len(r.OpenSSHTrueMS) > 0 {
		ssh.Value = &benchtable.Value{Value: benchtable.Median(r.OpenSSHTrueMS), Unit: "ms"}
	}
	target := benchtable.Reference{Name: "target", Value: &benchtable.Value{Value: rssTargetMB, Unit: "MB"}}
	loadTarget := benchtable.Reference{Name: "target", Value: &benchtable.Value{Value: loadRSSTargetMB, Unit: "MB"}}
	mb := func(kib int64) benchtable.Value {
		return benchtable.Value{Value: float64(kib) * 1024 / 1e6, Unit: "MB"}
	}
	return []benchtable.Row{
		benchtable.Measured(deploymentRowNames[0], benchtable.Value{Value: benchtable.Median(r.SSHTrueMS), Unit: "ms"}, ssh,
			fmt.Sprintf("median of %d (min %.0f, max %.0f): new tailnet node, coordinator, DERP, SSH", len(r.SSHTrueMS), slices.Min(r.SSHTrueMS), slices.Max(r.SSHTrueMS))),
		benchtable.Measured(deploymentRowNames[1], mb(r.IdleRSSKiB), target, fmt.Sprintf("VmHWM %s; heap and stacks %s, the binary's pages %s",
			mb(r.IdleHWMKiB), mb(r.IdleAnonKiB), mb(r.IdleFileKiB))),
		benchtable.Measured(deploymentRowNames[2], mb(r.LoadRSSKiB), loadTarget,
			fmt.Sprintf("highest VmRSS sampled: heap and stacks %s, the binary's pages %s; VmHWM %s; %d MiB at %.0f MB/s",
				mb(r.LoadAnonKiB), mb(r.LoadFileKiB), mb(r.LoadHWMKiB), loadBytes>>20, r.LoadMBps)),
		benchtable.Measured(deploymentRowNames[3], mb(r.AfterRSSKiB), benchtable.Reference{Name: "idle", Value: ptr(mb(r.IdleRSSKiB))},
			"VmRSS with no session open"),
		r.proxySCPRow(),
	}
}

func (r deploymentResult) proxySCPRow() benchtable.Row {
	name := deploymentRowNames[4]
	if r.ProxySCPNote != "" {
		return benchtable.Skipped(name, r.ProxySCPNote)
	}
	if r.ProxySCPError != "" {
		return benchtable.Failed(name, errors.New(r.ProxySCPError))
	}
	ref := benchtable.Value{Value: r.ForwardSCPMBps, Unit: "MB/s"}
	return benchtable.Measured(name, benchtable.Value{Value: r.ProxySCPMBps, Unit: "MB/s"},
		benchtable.Reference{Name: "scp to OpenSSH sshd in the workspace through agent port-forward", Value: &ref},
		fmt.Sprintf("%d MiB, aes128-gcm, best of 2, alternating", proxySCPBytes>>20))
}

func ptr[T any](v T) *T { return &v }

// deploymentChild runs inside the new network namespace and prints a
// deploymentResult as JSON. uid is the caller's real user ID (0: root, so
// OpenSSH's sshd can serve as the reference).
func deploymentChild(ctx context.Context, bin string, uid int) error {
	// Its first connection also brings the agent's side up; it is timed
	// like the others but kept out of the median's runs.
	d, done, err := upDeployment(ctx, bin, "bench0", "bench1")
	if err != nil {
		return err
	}
	defer done()
	var res deploymentResult
	for range sshRuns {
		ms, err := d.sshTrue(ctx)
		if err != nil {
			return err
		}
		res.SSHTrueMS = append(res.SSHTrueMS, ms)
	}
	time.Sleep(3 * time.Second) // idle: no session open
	idle, err := procMemory(d.agent.Process.Pid)
	if err != nil {
		return err
	}
	res.IdleRSSKiB, res.IdleHWMKiB, res.IdleAnonKiB, res.IdleFileKiB = idle.RSS, idle.HWM, idle.Anon, idle.File
	if err := d.loaded(ctx, &res); err != nil {
		return err
	}
	if uid != 0 {
		res.ProxySCPNote = "needs root to run sshd"
	} else if res.ProxySCPMBps, res.ForwardSCPMBps, err = d.proxySCP(ctx); err != nil {
		res.ProxySCPError = err.Error()
	}
	if uid != 0 {
		res.OpenSSHNote = "needs root to run sshd"
	} else if ms, err := openSSHTrue(ctx, d.dir); err != nil {
		res.OpenSSHNote = err.Error()
	} else {
		res.OpenSSHTrueMS = ms
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

type deployment struct {
	bin, dir    string
	url, fp     string
	userToken   string
	coord       *exec.Cmd
	agent       *exec.Cmd
	clientEnv   []string
	processLogs *os.File
}

func (d *deployment) start(ctx context.Context) error {
	logs, err := os.Create(filepath.Join(d.dir, "processes.log"))
	if err != nil {
		return err
	}
	d.processLogs = logs
	port, err := freePort()
	if err != nil {
		return err
	}
	coordDir := filepath.Join(d.dir, "coordinator")
	d.url = "https://127.0.0.1:" + strconv.Itoa(port)
	d.coord = d.process(ctx, "coordinator", "--data-dir", coordDir, "--listen", "127.0.0.1:"+strconv.Itoa(port),
		"--stun-addr", "127.0.0.1:3478", "--metrics-addr", "")
	if err := d.coord.Start(); err != nil {
		return fmt.Errorf("start agent coordinator: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var info struct {
			Running     bool   `json:"running"`
			Fingerprint string `json:"fingerprint"`
		}
		out, err := exec.CommandContext(ctx, d.bin, "admin", "--data-dir", coordDir, "--json", "info").Output()
		if err == nil && json.Unmarshal(out, &info) == nil && info.Running {
			d.fp = info.Fingerprint
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent coordinator did not come up within 30 s: %v %s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	admin := func(v any, args ...string) error {
		out, err := exec.CommandContext(ctx, d.bin, append([]string{"admin", "--data-dir", coordDir, "--json"}, args...)...).Output()
		if err != nil {
			return fmt.Errorf("agent admin %s: %w", strings.Join(args, " "), err)
		}
		if v == nil {
			return nil
		}
		return json.Unmarshal(out, v)
	}
	var agentCreated, tokenCreated struct {
		Secret string `json:"secret"`
	}
	if err := admin(nil, "user", "create", "bench"); err != nil {
		return err
	}
	if err := admin(&agentCreated, "agent", "create", "ws", "--owner", "bench"); err != nil {
		return err
	}
	tokenFile := filepath.Join(d.dir, "agent-token")
	if err := os.WriteFile(tokenFile, []byte(agentCreated.Secret+"\n"), 0o600); err != nil {
		return err
	}
	if err := admin(&tokenCreated, "token", "create", "--user", "bench"); err != nil {
		return err
	}
	d.userToken = tokenCreated.Secret
	d.agent = d.process(ctx, "run", "--coordinator-url", d.url, "--token-file", tokenFile, "--fingerprint", d.fp,
		"--data-dir", filepath.Join(d.dir, "agent"), "--health-addr", "")
	if err := d.agent.Start(); err != nil {
		return fmt.Errorf("start agent run: %w", err)
	}
	home := filepath.Join(d.dir, "home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return err
	}
	d.clientEnv = append(os.Environ(), "HOME="+home, "AGENT_URL="+d.url, "AGENT_TOKEN="+d.userToken, "AGENT_FINGERPRINT="+d.fp)
	return nil
}

func (d *deployment) process(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, d.bin, args...)
	cmd.Stdout, cmd.Stderr = d.processLogs, d.processLogs
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 5 * time.Second
	// If this process dies, so do the ones it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// stop ends the agent, then the coordinator, each by its own PID.
func (d *deployment) stop() {
	for _, cmd := range []*exec.Cmd{d.agent, d.coord} {
		if cmd == nil || cmd.Process == nil {
			continue
		}
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	if d.processLogs != nil {
		d.processLogs.Close()
	}
}

// sshTrue times `agent ssh ws true` from start to exit; the first try may
// wait for the agent to finish joining.
func (d *deployment) sshTrue(ctx context.Context) (float64, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		runCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		cmd := exec.CommandContext(runCtx, d.bin, "ssh", "ws", "--", "true")
		cmd.Env = d.clientEnv
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		start := time.Now()
		err := cmd.Run()
		elapsed := time.Since(start)
		cancel()
		if err == nil {
			return float64(elapsed.Microseconds()) / 1000, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("agent ssh ws true: %w: %s (processes' log: %s)", err, strings.TrimSpace(stderr.String()), d.tailLog())
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (d *deployment) tailLog() string {
	data, _ := os.ReadFile(d.processLogs.Name())
	return lastLines(string(data), 5)
}

// loaded streams loadBytes from the workspace over `agent ssh` and samples
// the agent's RSS meanwhile.
func (d *deployment) loaded(ctx context.Context, res *deploymentResult) error {
	cmd := exec.CommandContext(ctx, d.bin, "ssh", "ws", "--", fmt.Sprintf("head -c %d /dev/zero", loadBytes))
	cmd.Env = d.clientEnv
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	counter := &countingWriter{}
	cmd.Stdout = counter
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				return fmt.Errorf("agent ssh ws head -c: %w: %s", err, strings.TrimSpace(stderr.String()))
			}
			if counter.n != loadBytes {
				return fmt.Errorf("agent ssh ws head -c %d delivered %d bytes", loadBytes, counter.n)
			}
			res.LoadMBps = float64(loadBytes) / 1e6 / time.Since(start).Seconds()
			m, err := procMemory(d.agent.Process.Pid)
			if err != nil {
				return err
			}
			res.LoadHWMKiB = m.HWM
			time.Sleep(afterLoad)
			m, err = procMemory(d.agent.Process.Pid)
			res.AfterRSSKiB = m.RSS
			return err
		case <-tick.C:
			m, err := procMemory(d.agent.Process.Pid)
			if err != nil {
				return err
			}
			if m.RSS > res.LoadRSSKiB {
				res.LoadRSSKiB, res.LoadAnonKiB, res.LoadFileKiB = m.RSS, m.Anon, m.File
			}
		}
	}
}

type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return len(p), nil
}

// procMem is a process's memory from /proc/PID/status, KiB.
type procMem struct {
	RSS, HWM   int64 // VmRSS, VmHWM
	Anon, File int64 // RssAnon, RssFile: VmRSS's heap-and-stacks and file-page parts
}

// procMemory reads a process's memory figures.
func procMemory(pid int) (procMem, error) {
	var m procMem
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return m, fmt.Errorf("read the agent's memory: %w", err)
	}
	fields := map[string]*int64{"VmRSS": &m.RSS, "VmHWM": &m.HWM, "RssAnon": &m.Anon, "RssFile": &m.File}
	for _, line := range strings.Split(string(data), "\n") {
		name, value, ok := strings.Cut(line, ":")
		if f := fields[name]; ok && f != nil {
			kib, perr := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(value), " kB"), 10, 64)
			if perr != nil {
				return m, fmt.Errorf("the agent's %s in /proc status: %w", name, perr)
			}
			*f = kib
		}
	}
	if m.RSS == 0 {
		return m, errors.New("no VmRSS in /proc status")
	}
	return m, nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func skipRows(names []string, reason string) []benchtable.Row {
	var rows []benchtable.Row
	for _, n := range names {
		rows = append(rows, benchtable.Skipped(n, reason))
	}
	return rows
}

func failRows(names []string, err error) []benchtable.Row {
	var rows []benchtable.Row
	for _, n := range names {
		rows = append(rows, benchtable.Failed(n, err))
	}
	return rows
}

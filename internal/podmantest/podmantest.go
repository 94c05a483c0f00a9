// Package podmantest builds and runs container images with podman inside a
// network namespace that a test made, so that podman's bridge, veths and NAT
// rules live in that namespace and never on the machine's own network.
//
// Every Podman has private storage (vfs driver), run and tmp directories in
// the test's temporary directory, runs containers with runc and the cgroupfs
// manager (this machine's cgroup layout rules out crun and the systemd
// manager), and removes its containers when the test ends. Images are built
// with chroot isolation from local files only: no registry is reachable.
package podmantest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Podman runs podman with private state in one network namespace.
type Podman struct {
	t       testing.TB
	bin     string
	nsenter string
	netns   string // path of the network namespace file, e.g. /run/netns/NAME
	dir     string // root of the private state
}

// New returns a Podman whose containers run in the network namespace at
// netnsPath. It skips the test, saying why, when the process is not root or
// podman, runc or nsenter is missing. Call it after creating the namespace
// (so that its cleanup, which removes the containers, runs before the
// namespace is deleted).
func New(t testing.TB, netnsPath string) *Podman {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("podmantest: needs root to run podman with runc in a test network namespace (CI runs the tests as root)")
	}
	var bins [3]string
	for i, name := range []string{"podman", "runc", "nsenter"} {
		p, err := lookPath(name)
		if err != nil {
			t.Skipf("podmantest: %s not found (apt-get install podman runc util-linux)", name)
		}
		bins[i] = p
	}
	if _, err := os.Stat(netnsPath); err != nil {
		t.Fatalf("podmantest: network namespace %s: %v", netnsPath, err)
	}
	// Not t.TempDir: podman refuses a run root longer than 50 characters.
	dir, err := os.MkdirTemp("", "pm-")
	if err != nil {
		t.Fatal(err)
	}
	p := &Podman{t: t, bin: bins[0], nsenter: bins[2], netns: netnsPath, dir: dir}
	t.Cleanup(p.cleanup)
	return p
}

// lookPath finds a tool in PATH or in the sbin directories a non-login
// root shell may lack.
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or the sbin directories", name)
}

// globalArgs are podman's options for private, registry-free operation.
func (p *Podman) globalArgs() []string {
	return []string{
		"--root", filepath.Join(p.dir, "storage"),
		"--runroot", filepath.Join(p.dir, "run"),
		"--tmpdir", filepath.Join(p.dir, "tmp"),
		"--storage-driver", "vfs",
		"--runtime", "runc",
		"--cgroup-manager", "cgroupfs",
		"--events-backend", "file",
	}
}

// Command returns `nsenter --net=NETNS podman GLOBAL-OPTIONS args...`.
// nsenter (not `ip netns exec`) keeps the machine's /sys and cgroup mounts,
// which podman needs.
func (p *Podman) Command(ctx context.Context, args ...string) *exec.Cmd {
	argv := append([]string{"--net=" + p.netns, p.bin}, p.globalArgs()...)
	argv = append(argv, args...)
	cmd := exec.CommandContext(ctx, p.nsenter, argv...)
	// Containers policy and registries files are the machine's; nothing here
	// reaches a registry because every image is local.
	cmd.Env = append(os.Environ(), "TMPDIR="+filepath.Join(p.dir, "tmp"))
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Run runs podman with args and returns its stdout; the error carries stderr.
func (p *Podman) Run(ctx context.Context, args ...string) (string, error) {
	if err := os.MkdirAll(filepath.Join(p.dir, "tmp"), 0o700); err != nil {
		return "", err
	}
	cmd := p.Command(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("podman %s: %w\n%s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// MustRun is Run that fails the test on error, within timeout.
func (p *Podman) MustRun(timeout time.Duration, args ...string) string {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := p.Run(ctx, args...)
	if err != nil {
		p.t.Fatal(err)
	}
	return out
}

// BusyboxBase makes a minimal base image from the machine's static busybox:
// /bin/sh and the usual tools, /etc/passwd with root, /tmp. It stands in for
// debian:bookworm-slim, which cannot be pulled here. It skips the test when
// busybox-static is not installed.
func (p *Podman) BusyboxBase(ref string) {
	p.t.Helper()
	p.importBusybox(ref, nil)
}

// LocalGoImage makes an image that stands in for the golang image in
// Dockerfile.agent's build stage: the busybox base with Go's environment.
// The toolchain, module cache and build cache are this machine's, mounted
// into the build with GoBuildVolumes; modules come only from that cache
// (GOPROXY=off), since no proxy is reachable from a test namespace.
func (p *Podman) LocalGoImage(ref string) {
	p.t.Helper()
	p.importBusybox(ref, []string{
		"ENV PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"ENV GOPATH=/go",
		"ENV GOCACHE=/root/.cache/go-build",
		"ENV GOPROXY=off",
		"ENV GOTOOLCHAIN=local",
	})
}

// GoBuildVolumes are the podman build --volume specs that LocalGoImage
// expects: this machine's GOROOT (read-only), module cache (read-only) and
// build cache (writable, so the build inside reuses earlier compilations).
func (p *Podman) GoBuildVolumes() []string {
	p.t.Helper()
	out, err := exec.Command("go", "env", "GOROOT", "GOMODCACHE", "GOCACHE").Output()
	if err != nil {
		p.t.Fatalf("go env: %v", err)
	}
	f := strings.Fields(string(out))
	if len(f) != 3 {
		p.t.Fatalf("go env GOROOT GOMODCACHE GOCACHE printed %q", out)
	}
	return []string{f[0] + ":/usr/local/go:ro", f[1] + ":/go/pkg/mod:ro", f[2] + ":/root/.cache/go-build"}
}

func (p *Podman) importBusybox(ref string, changes []string) {
	p.t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		p.t.Skip("podmantest: busybox not found (apt-get install busybox-static)")
	}
	if out, err := exec.Command("ldd", bb).CombinedOutput(); err == nil && !bytes.Contains(out, []byte("not a dynamic executable")) {
		p.t.Skipf("podmantest: %s is dynamically linked; the image needs busybox-static", bb)
	}
	rootfs, err := os.MkdirTemp(p.dir, "rootfs-")
	if err != nil {
		p.t.Fatal(err)
	}
	// The image's / (MkdirTemp makes it 0700, which locks out every user but root).
	if err := os.Chmod(rootfs, 0o755); err != nil {
		p.t.Fatal(err)
	}
	for _, d := range []string{"bin", "etc", "tmp", "root", "home", "var/lib", "usr/local/bin", "proc", "sys", "dev"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			p.t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(rootfs, "tmp"), 0o1777); err != nil {
		p.t.Fatal(err)
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		p.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "busybox"), data, 0o755); err != nil {
		p.t.Fatal(err)
	}
	list, err := exec.Command(bb, "--list").Output()
	if err != nil {
		p.t.Fatalf("busybox --list: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(list))
	for sc.Scan() {
		applet := strings.TrimSpace(sc.Text())
		if applet == "" || applet == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", applet)); err != nil && !os.IsExist(err) {
			p.t.Fatal(err)
		}
	}
	files := map[string]string{
		"etc/passwd":   "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/group":    "root:x:0:\nnogroup:x:65534:\n",
		"etc/hosts":    "127.0.0.1 localhost\n",
		"etc/hostname": "workspace\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(rootfs, name), []byte(content), 0o644); err != nil {
			p.t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tar := exec.CommandContext(ctx, "tar", "-C", rootfs, "-c", ".")
	importArgs := []string{"import"}
	for _, c := range changes {
		importArgs = append(importArgs, "--change", c)
	}
	imp := p.Command(ctx, append(importArgs, "-", ref)...)
	pipe, err := tar.StdoutPipe()
	if err != nil {
		p.t.Fatal(err)
	}
	imp.Stdin = pipe
	var impErr bytes.Buffer
	imp.Stderr = &impErr
	if err := os.MkdirAll(filepath.Join(p.dir, "tmp"), 0o700); err != nil {
		p.t.Fatal(err)
	}
	if err := tar.Start(); err != nil {
		p.t.Fatal(err)
	}
	if err := imp.Run(); err != nil {
		p.t.Fatalf("podman import: %v\n%s", err, impErr.String())
	}
	if err := tar.Wait(); err != nil {
		p.t.Fatalf("tar of the base root file system: %v", err)
	}
}

// BuildOptions describe one `podman build` of Dockerfile.agent.
type BuildOptions struct {
	// RepoRoot is the repository checkout (holds Dockerfile.agent and scripts/).
	RepoRoot string
	// AgentBinary is a static agent binary to bake in (the *-from-binary
	// targets). Empty means a build from source: the context is RepoRoot.
	AgentBinary string
	// Volumes are --volume specs for the build's RUN steps.
	Volumes []string
	// Target is the Dockerfile stage, e.g. "workspace-from-binary".
	Target string
	// Tag names the image.
	Tag string
	// BuildArgs are extra --build-arg NAME=VALUE pairs, e.g. BASE_IMAGE.
	BuildArgs map[string]string
}

// Build builds an image from Dockerfile.agent. With a prebuilt binary the
// build context is a fresh directory holding only the binary and
// scripts/start-workspace, as the documented prebuilt-binary build expects;
// without one it is the repository.
func (p *Podman) Build(o BuildOptions) {
	p.t.Helper()
	ctxDir := o.RepoRoot
	if o.AgentBinary != "" {
		var err error
		if ctxDir, err = os.MkdirTemp(p.dir, "context-"); err != nil {
			p.t.Fatal(err)
		}
		copyFile(p.t, o.AgentBinary, filepath.Join(ctxDir, "agent"), 0o755)
		copyFile(p.t, filepath.Join(o.RepoRoot, "scripts", "start-workspace"), filepath.Join(ctxDir, "scripts", "start-workspace"), 0o755)
	}
	args := []string{"build", "--isolation", "chroot", "--pull=never",
		"-f", filepath.Join(o.RepoRoot, "Dockerfile.agent"), "-t", o.Tag}
	if o.Target != "" {
		args = append(args, "--target", o.Target)
	}
	for k, v := range o.BuildArgs {
		args = append(args, "--build-arg", k+"="+v)
	}
	for _, v := range o.Volumes {
		args = append(args, "--volume", v)
	}
	args = append(args, ctxDir)
	p.MustRun(5*time.Minute, args...)
}

func copyFile(t testing.TB, from, to string, mode os.FileMode) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(to, mode); err != nil {
		t.Fatal(err)
	}
}

// RunOptions describe one detached container.
type RunOptions struct {
	Image string
	Name  string
	// Env is NAME=VALUE pairs.
	Env []string
	// Mounts are podman --volume specs, e.g. "/host/path:/container/path:ro".
	Mounts []string
	// User overrides the image's user ("uid:gid").
	User string
	// DNS are nameserver addresses for the container's resolv.conf (by
	// default podman copies the machine's, which a test namespace cannot reach).
	DNS []string
	// Entrypoint overrides the image's entrypoint; Args follow the image name.
	Entrypoint string
	Args       []string
}

// Container is a running container of a Podman.
type Container struct {
	p    *Podman
	Name string
	ID   string
}

// Start runs a detached container with the limits this machine needs
// (runc refuses the default nofile/nproc limits in a test namespace). The
// container is removed when the test ends; its logs are shown if it failed.
func (p *Podman) Start(o RunOptions) *Container {
	p.t.Helper()
	args := []string{"run", "-d", "--pull=never", "--name", o.Name,
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}
	for _, d := range o.DNS {
		args = append(args, "--dns", d)
	}
	for _, e := range o.Env {
		args = append(args, "--env", e)
	}
	for _, m := range o.Mounts {
		args = append(args, "--volume", m)
	}
	if o.User != "" {
		args = append(args, "--user", o.User)
	}
	if o.Entrypoint != "" {
		args = append(args, "--entrypoint", o.Entrypoint)
	}
	args = append(args, o.Image)
	args = append(args, o.Args...)
	id := strings.TrimSpace(p.MustRun(2*time.Minute, args...))
	c := &Container{p: p, Name: o.Name, ID: id}
	p.t.Cleanup(func() {
		if p.t.Failed() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			out, _ := p.Command(ctx, "logs", o.Name).CombinedOutput()
			p.t.Logf("podmantest: logs of container %s:\n%s", o.Name, out)
		}
	})
	return c
}

// Exec runs a command in the container and returns its combined output.
func (c *Container) Exec(ctx context.Context, args ...string) (string, error) {
	cmd := c.p.Command(ctx, append([]string{"exec", c.Name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("podman exec %s %s: %w\n%s", c.Name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Inspect returns one field of `podman inspect` in Go template syntax, e.g.
// "{{.NetworkSettings.IPAddress}}" or "{{.State.Pid}}".
func (c *Container) Inspect(format string) string {
	c.p.t.Helper()
	return strings.TrimSpace(c.p.MustRun(30*time.Second, "inspect", "--format", format, c.Name))
}

// Gateway is the address of podman's default bridge network in the test
// namespace: where containers reach the test's own servers.
func (p *Podman) Gateway() string {
	p.t.Helper()
	return strings.TrimSpace(p.MustRun(30*time.Second, "network", "inspect", "podman", "--format", "{{range .Subnets}}{{.Gateway}}{{end}}"))
}

// Bridge is the name of the default network's bridge in the test namespace
// (podman0 with netavark, cni-podman0 with the CNI plugins).
func (p *Podman) Bridge() string {
	p.t.Helper()
	return strings.TrimSpace(p.MustRun(30*time.Second, "network", "inspect", "podman", "--format", "{{.NetworkInterface}}"))
}

// IP is the container's address on podman's bridge.
func (c *Container) IP() string {
	c.p.t.Helper()
	return c.Inspect("{{.NetworkSettings.IPAddress}}")
}

// Logs returns the container's output so far.
func (c *Container) Logs() string {
	c.p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, _ := c.p.Command(ctx, "logs", c.Name).CombinedOutput()
	return string(out)
}

// Stop sends the image's stop signal (SIGTERM) and waits up to grace
// before SIGKILL, as a runtime does; it returns how long the container took
// to stop and its exit code.
func (c *Container) Stop(grace time.Duration) (took time.Duration, exitCode int) {
	c.p.t.Helper()
	start := time.Now()
	c.p.MustRun(grace+30*time.Second, "stop", "--time", fmt.Sprint(int(grace.Seconds())), c.Name)
	took = time.Since(start)
	var code int
	fmt.Sscan(c.Inspect("{{.State.ExitCode}}"), &code)
	return took, code
}

// cleanup removes every container and unmounts whatever podman left
// mounted below the private state, so the temporary directory can go.
func (p *Podman) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := p.Run(ctx, "rm", "--all", "--force", "--time", "0"); err != nil {
		p.t.Logf("podmantest: removing containers: %v", err)
	}
	p.unmountBelow(p.dir)
	if err := os.RemoveAll(p.dir); err != nil {
		p.t.Logf("podmantest: removing %s: %v", p.dir, err)
	}
}

func (p *Podman) unmountBelow(dir string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mounts []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			mounts = append(mounts, fields[4])
		}
	}
	// Deepest first.
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := syscall.Unmount(mounts[i], syscall.MNT_DETACH); err != nil {
			p.t.Logf("podmantest: unmount %s: %v", mounts[i], err)
		}
	}
}

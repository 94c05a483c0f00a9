// Package netlab builds throw-away network topologies for tests out of Linux
// network namespaces, veth pairs, bridges and nftables rules.
//
// Everything a Lab creates lives in namespaces it made itself: veth pairs are
// created directly inside their namespaces (`ip -n A link add ... peer ...
// netns B`), so no interface ever appears, even briefly, in the machine's own
// network namespace. Namespace names carry a random suffix, so parallel test
// binaries never collide. A Lab removes everything it made in t.Cleanup, also
// when the test fails or panics.
//
// The lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2 and, for
// NAT and filtering, nftables. Without them New skips the test with the
// reason.
//
// Use only documentation ranges (192.0.2.0/24, 198.51.100.0/24,
// 203.0.113.0/24) and 10.0.0.0/8 or 100.64.0.0/10 inside a lab.
package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"github.com/agentd/agent/internal/syncbuf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// maxIfName is the kernel's limit on interface names (IFNAMSIZ-1).
const maxIfName = 15

// Lab owns a set of namespaces and everything inside them.
type Lab struct {
	t     testing.TB
	ipBin string

	mu         sync.Mutex
	namespaces []*Namespace
	etcDirs    []string
	nftBin     string
}

// New returns an empty lab whose namespaces are deleted when the test ends.
// It skips the test when the process is not root or iproute2 is missing.
func New(t testing.TB) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("netlab: needs root to create network namespaces (CI runs the tests as root)")
	}
	ipBin, err := lookPath("ip")
	if err != nil {
		t.Skip("netlab: iproute2's ip command not found (apt-get install iproute2)")
	}
	l := &Lab{t: t, ipBin: ipBin}
	t.Cleanup(l.cleanup)
	return l
}

// lookPath finds a tool in PATH or in the sbin directories that a
// non-login root shell may lack in its PATH.
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or sbin directories", name)
}

func randomSuffix(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("netlab: reading random bytes: %v", err))
	}
	return hex.EncodeToString(b)[:n]
}

// Namespace creates a network namespace with loopback up. The real name is
// the given name (cut to 8 characters) plus "-" and a random suffix, at most
// 15 characters; Namespace.Name returns it.
func (l *Lab) Namespace(name string) *Namespace {
	l.t.Helper()
	base := name
	if len(base) > 8 {
		base = base[:8]
	}
	var full string
	for range 10 {
		full = base + "-" + randomSuffix(6)
		if _, err := os.Stat(filepath.Join("/run/netns", full)); os.IsNotExist(err) {
			break
		}
	}
	out, err := exec.Command(l.ipBin, "netns", "add", full).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if strings.Contains(msg, "Operation not permitted") || strings.Contains(msg, "Permission denied") {
			l.t.Skipf("netlab: cannot create network namespaces here (%s); run as root with CAP_SYS_ADMIN", msg)
		}
		l.t.Fatalf("netlab: ip netns add %s: %v: %s", full, err, msg)
	}
	ns := &Namespace{lab: l, label: name, name: full}
	l.mu.Lock()
	l.namespaces = append(l.namespaces, ns)
	l.mu.Unlock()
	ns.IP("link", "set", "lo", "up")
	return ns
}

// Link creates a veth pair between two namespaces: ifA in a, ifB in b, both
// up. addrA and addrB are CIDR addresses ("10.1.0.1/24") or "" for none (for
// example for a port that will join a bridge). Interface names are at most 15
// characters.
func (l *Lab) Link(a *Namespace, ifA, addrA string, b *Namespace, ifB, addrB string) {
	l.t.Helper()
	for _, n := range []string{ifA, ifB} {
		if len(n) == 0 || len(n) > maxIfName {
			l.t.Fatalf("netlab: interface name %q must be 1 to %d characters", n, maxIfName)
		}
	}
	a.IP("link", "add", ifA, "type", "veth", "peer", "name", ifB, "netns", b.name)
	for _, side := range []struct {
		ns   *Namespace
		ifc  string
		addr string
	}{{a, ifA, addrA}, {b, ifB, addrB}} {
		if side.addr != "" {
			side.ns.IP("addr", "add", side.addr, "dev", side.ifc)
		}
		side.ns.IP("link", "set", side.ifc, "up")
	}
}

// Exec runs a command in the machine's namespace with the lab's tools; it is
// used internally and by Namespace helpers.
func (l *Lab) run(ctx context.Context, stdin string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

func (l *Lab) nft() string {
	l.t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.nftBin == "" {
		p, err := lookPath("nft")
		if err != nil {
			l.t.Skip("netlab: nftables' nft command not found (apt-get install nftables)")
		}
		l.nftBin = p
	}
	return l.nftBin
}

func (l *Lab) cleanup() {
	l.mu.Lock()
	namespaces := l.namespaces
	etcDirs := l.etcDirs
	l.namespaces, l.etcDirs = nil, nil
	l.mu.Unlock()
	for i := len(namespaces) - 1; i >= 0; i-- {
		namespaces[i].stopProcesses()
	}
	for i := len(namespaces) - 1; i >= 0; i-- {
		ns := namespaces[i]
		if out, err := exec.Command(l.ipBin, "netns", "del", ns.name).CombinedOutput(); err != nil {
			l.t.Logf("netlab: deleting namespace %s: %v: %s", ns.name, err, strings.TrimSpace(string(out)))
		}
	}
	for _, d := range etcDirs {
		if err := os.RemoveAll(d); err != nil {
			l.t.Logf("netlab: removing %s: %v", d, err)
		}
	}
}

// Namespace is one network namespace of a lab.
type Namespace struct {
	lab   *Lab
	label string
	name  string

	mu    sync.Mutex
	procs []*exec.Cmd
}

// Name is the namespace's name under /run/netns (label plus random suffix).
func (ns *Namespace) Name() string { return ns.name }

// Label is the short name the test gave the namespace.
func (ns *Namespace) Label() string { return ns.label }

// Path is the namespace's file, for nsenter --net=PATH or setns(2).
func (ns *Namespace) Path() string { return filepath.Join("/run/netns", ns.name) }

// IP runs `ip -n NS args...` and fails the test on error. It returns the
// command's output.
func (ns *Namespace) IP(args ...string) string {
	ns.lab.t.Helper()
	out, err := ns.lab.run(context.Background(), "", ns.lab.ipBin, append([]string{"-n", ns.name}, args...)...)
	if err != nil {
		ns.lab.t.Fatalf("netlab[%s]: %v", ns.label, err)
	}
	return out
}

// TryIP is IP returning the error instead of failing the test, for fault
// injection from goroutines other than the test's own.
func (ns *Namespace) TryIP(args ...string) (string, error) {
	return ns.lab.run(context.Background(), "", ns.lab.ipBin, append([]string{"-n", ns.name}, args...)...)
}

// Command returns a command that runs name inside the namespace through `ip
// netns exec`. That also gives the program a private mount namespace with
// /sys remounted for this network namespace, and bind-mounts the files
// written with WriteEtc over /etc. (Podman needs nsenter --net=Path()
// instead, because ip netns exec hides the cgroup mounts.)
func (ns *Namespace) Command(name string, args ...string) *exec.Cmd {
	return exec.Command(ns.lab.ipBin, append([]string{"netns", "exec", ns.name, name}, args...)...)
}

// CommandContext is Command bound to a context.
func (ns *Namespace) CommandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, ns.lab.ipBin, append([]string{"netns", "exec", ns.name, name}, args...)...)
}

// Run runs args[0] with the rest as arguments inside the namespace and returns
// its combined output. The error includes the output.
func (ns *Namespace) Run(ctx context.Context, args ...string) (string, error) {
	if len(args) == 0 {
		return "", fmt.Errorf("netlab: Run needs a program name")
	}
	return ns.lab.run(ctx, "", ns.lab.ipBin, append([]string{"netns", "exec", ns.name}, args...)...)
}

// MustRun is Run that fails the test on error, with a 30 s limit.
func (ns *Namespace) MustRun(args ...string) string {
	ns.lab.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := ns.Run(ctx, args...)
	if err != nil {
		ns.lab.t.Fatalf("netlab[%s]: %v", ns.label, err)
	}
	return out
}

// Start starts a long-running program inside the namespace. Its output is
// kept and logged if the test fails; the lab kills it (by its process group)
// before deleting the namespace.
func (ns *Namespace) Start(name string, args ...string) *exec.Cmd {
	ns.lab.t.Helper()
	cmd := ns.Command(name, args...)
	out := &syncbuf.Buffer{}
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		ns.lab.t.Fatalf("netlab[%s]: starting %s: %v", ns.label, name, err)
	}
	ns.mu.Lock()
	ns.procs = append(ns.procs, cmd)
	ns.mu.Unlock()
	t := ns.lab.t
	label := ns.label
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("netlab[%s]: output of %s:\n%s", label, name, out.String())
		}
	})
	return cmd
}

func (ns *Namespace) stopProcesses() {
	ns.mu.Lock()
	procs := ns.procs
	ns.procs = nil
	ns.mu.Unlock()
	for _, cmd := range procs {
		if cmd.Process == nil || cmd.ProcessState != nil {
			continue
		}
		// The process group holds `ip netns exec` and the program it runs.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	}
}

// Route adds a route, written as after `ip route add`, e.g.
// ns.Route("default via 10.1.0.1").
func (ns *Namespace) Route(spec string) {
	ns.lab.t.Helper()
	ns.IP(append([]string{"route", "add"}, strings.Fields(spec)...)...)
}

// Addr adds a CIDR address to an interface.
func (ns *Namespace) Addr(ifname, cidr string) {
	ns.lab.t.Helper()
	ns.IP("addr", "add", cidr, "dev", ifname)
}

// SetMTU sets an interface's MTU.
func (ns *Namespace) SetMTU(ifname string, mtu int) {
	ns.lab.t.Helper()
	ns.IP("link", "set", ifname, "mtu", fmt.Sprint(mtu))
}

// Bridge creates a bridge, brings it up and gives it addr (CIDR) unless addr
// is empty.
func (ns *Namespace) Bridge(name, addr string) {
	ns.lab.t.Helper()
	if len(name) > maxIfName {
		ns.lab.t.Fatalf("netlab: bridge name %q is longer than %d characters", name, maxIfName)
	}
	ns.IP("link", "add", name, "type", "bridge")
	if addr != "" {
		ns.IP("addr", "add", addr, "dev", name)
	}
	ns.IP("link", "set", name, "up")
}

// Attach makes ifname a port of bridge.
func (ns *Namespace) Attach(ifname, bridge string) {
	ns.lab.t.Helper()
	ns.IP("link", "set", ifname, "master", bridge, "up")
}

// Sysctl writes a sysctl of this namespace (net.* keys are per namespace),
// e.g. ns.Sysctl("net.ipv4.ping_group_range", "0 2147483647").
func (ns *Namespace) Sysctl(key, value string) {
	ns.lab.t.Helper()
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	ns.MustRun("sh", "-c", `printf '%s\n' "$1" > "$2"`, "sh", value, path)
}

// EnableForwarding turns on IPv4 (and IPv6) forwarding in the namespace.
func (ns *Namespace) EnableForwarding() {
	ns.lab.t.Helper()
	ns.Sysctl("net.ipv4.ip_forward", "1")
	ns.Sysctl("net.ipv6.conf.all.forwarding", "1")
}

// Nft loads an nftables script into the namespace (`nft -f -`).
func (ns *Namespace) Nft(script string) {
	ns.lab.t.Helper()
	nft := ns.lab.nft()
	if _, err := ns.lab.run(context.Background(), script, ns.lab.ipBin, "netns", "exec", ns.name, nft, "-f", "-"); err != nil {
		ns.lab.t.Fatalf("netlab[%s]: %v\nscript:\n%s", ns.label, err, script)
	}
}

// TryNft is Nft returning the error, for use off the test goroutine.
func (ns *Namespace) TryNft(script string) error {
	nft := ns.lab.nft()
	_, err := ns.lab.run(context.Background(), script, ns.lab.ipBin, "netns", "exec", ns.name, nft, "-f", "-")
	return err
}

// NATMode says how a router maps private source ports to public ones.
type NATMode int

const (
	// NATEndpointIndependent is Linux's default masquerade: a flow keeps its
	// source port when it is free, so one private socket appears with the same
	// public address and port to every destination (endpoint-independent
	// mapping, "easy NAT"). Filtering is still address-and-port dependent:
	// conntrack only admits replies from a destination the host has sent to,
	// which is what UDP hole punching needs.
	NATEndpointIndependent NATMode = iota
	// NATEndpointDependent uses `masquerade random`: every flow gets a random
	// public port, so the mapping differs per destination ("hard NAT";
	// STUN servers see different ports and direct paths need a relay or
	// birthday tricks).
	NATEndpointDependent
)

// Firewall says what a NAT router does with unsolicited inbound UDP to its
// own public address.
type Firewall int

const (
	// DropUnsolicited is a home router's firewall: new inbound UDP to the
	// public address is dropped before its conntrack entry is confirmed, so
	// only replies to flows from the LAN get in.
	DropUnsolicited Firewall = iota
	// AcceptUnsolicited is a Kubernetes node masquerading its pods with the
	// default INPUT policy accept: a peer's packet that arrives before the
	// pod's own leaves a confirmed conntrack entry for the tuple, and
	// masquerade then gives the pod's outbound flow to that peer another
	// public port.
	AcceptUnsolicited
)

// Masquerade NATs everything leaving through outIf to outIf's address,
// with a home router's firewall (DropUnsolicited).
func (ns *Namespace) Masquerade(outIf string, mode NATMode) {
	ns.lab.t.Helper()
	ns.MasqueradeWith(outIf, mode, DropUnsolicited)
}

// MasqueradeWith is Masquerade with the given treatment of unsolicited
// inbound UDP.
func (ns *Namespace) MasqueradeWith(outIf string, mode NATMode, fw Firewall) {
	ns.lab.t.Helper()
	action := "masquerade"
	if mode == NATEndpointDependent {
		action = "masquerade random"
	}
	// The input rule is a home router's firewall: unsolicited UDP to the
	// public address is dropped before its conntrack entry is confirmed.
	// Without it, a peer's first hole-punching packet leaves an entry that
	// owns the public port, and masquerade then moves our own outbound flow
	// to another port, so the mapping would no longer be endpoint
	// independent.
	input := fmt.Sprintf("\t\tiifname %q meta l4proto udp ct state new drop\n", outIf)
	if fw == AcceptUnsolicited {
		input = ""
	}
	ns.Nft(fmt.Sprintf(`table ip netlab_nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname %q %s
	}
	chain input {
		type filter hook input priority filter; policy accept;
%s	}
}
`, outIf, action, input))
}

// DropUDP drops UDP that the namespace forwards or sends, except to or from
// the given ports (for example 53 to keep DNS working). Remove it again with
// AllowUDP.
func (ns *Namespace) DropUDP(exceptPorts ...int) {
	ns.lab.t.Helper()
	if err := ns.TryDropUDP(exceptPorts...); err != nil {
		ns.lab.t.Fatalf("netlab[%s]: %v", ns.label, err)
	}
}

// TryDropUDP is DropUDP returning the error.
func (ns *Namespace) TryDropUDP(exceptPorts ...int) error {
	var accept strings.Builder
	if len(exceptPorts) > 0 {
		ports := make([]string, len(exceptPorts))
		for i, p := range exceptPorts {
			ports[i] = fmt.Sprint(p)
		}
		set := strings.Join(ports, ", ")
		fmt.Fprintf(&accept, "\t\tudp dport { %s } accept\n\t\tudp sport { %s } accept\n", set, set)
	}
	script := fmt.Sprintf(`table inet netlab_dropudp {
	chain forward {
		type filter hook forward priority filter; policy accept;
%s		meta l4proto udp drop
	}
	chain output {
		type filter hook output priority filter; policy accept;
%s		meta l4proto udp drop
	}
}
`, accept.String(), accept.String())
	return ns.TryNft(script)
}

// AllowUDP removes the rules DropUDP added.
func (ns *Namespace) AllowUDP() {
	ns.lab.t.Helper()
	ns.Nft("delete table inet netlab_dropudp\n")
}

// WriteEtc writes a file that programs started with Command or Run see at
// /etc/<name> (ip netns exec bind-mounts /etc/netns/<ns>/<name> over it),
// for example "resolv.conf" or "hosts". The target must exist under /etc.
func (ns *Namespace) WriteEtc(name, content string) {
	ns.lab.t.Helper()
	dir := filepath.Join("/etc/netns", ns.name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		ns.lab.t.Fatalf("netlab[%s]: %v", ns.label, err)
	}
	ns.lab.mu.Lock()
	known := false
	for _, d := range ns.lab.etcDirs {
		known = known || d == dir
	}
	if !known {
		ns.lab.etcDirs = append(ns.lab.etcDirs, dir)
	}
	ns.lab.mu.Unlock()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
		ns.lab.t.Fatalf("netlab[%s]: %v", ns.label, err)
	}
}

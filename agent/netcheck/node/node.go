// Package node is the node doctor behind `agent netcheck --host`: it checks
// a node's container networking from the outside (bridges, veth attachment,
// systemd-networkd and udev configuration and state) and writes the guard
// that keeps networkd and udev off container interfaces (--fix).
package node

import (
	"log/slog"

	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentd/agent/agent/netcheck"
	"github.com/agentd/agent/agent/netcheck/internal/netstate"
	"io/fs"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/agentd/agent/agent/netcheck/networkd"
	"github.com/vishvananda/netlink"
)

// containerGlobs are the interface names container runtimes and CNI plugins
// create: Docker, bridge CNI, kubenet, podman, flannel, Calico, Cilium,
// Weave, kube-proxy IPVS and node-local DNS.
func containerGlobs() []string {
	return []string{"veth*", "docker*", "br-*", "cni*", "cbr0", "podman*", "flannel*", "cali*", "vxlan.calico", "tunl0",
		"cilium*", "lxc*", "weave", "vethwe*", "kube-ipvs0", "nodelocaldns"}
}

// sampleVeth is the name of a veth that does not exist yet, to predict what
// networkd and udev would do to the next container.
const sampleVeth = "veth0c0ffee"

// expectedBridge is a bridge some configuration says should exist.
type expectedBridge struct {
	name string
	// gateway is the address it should carry, if known.
	gateway netip.Prefix
	source  string
	// onDemand bridges (CNI's bridge plugin) are created with the first
	// container that uses them, so their absence alone proves nothing.
	onDemand bool
	// leaseDir is where host-local IPAM records the addresses it handed
	// out on this bridge's network: leases there mean containers use it.
	leaseDir string
	// masq: the configuration asks the node to masquerade the subnet.
	masq bool
	// defaultNet: the first CNI configuration by file name, the network
	// kubelet and CRI runtimes give every pod.
	defaultNet bool
	// mtu is the MTU the configuration gives containers (0: the kernel's
	// 1500 for veths).
	mtu int
}

// leases lists the addresses host-local IPAM still holds for containers on
// this bridge's network.
func (e expectedBridge) leases() []string {
	if e.leaseDir == "" {
		return nil
	}
	entries, _ := os.ReadDir(e.leaseDir)
	var out []string
	for _, f := range entries {
		if _, err := netip.ParseAddr(f.Name()); err == nil {
			out = append(out, f.Name())
		}
	}
	return out
}

// inventory is the node's container networking as found in netlink and
// configuration.
type inventory struct {
	st        *netstate.State
	expected  []expectedBridge
	container []netlink.Link // container interfaces present
	// protected are the uplink and its bridge/ports, which no guard pattern
	// may match.
	protected []string
	// problems are configuration files that could not be read or parsed.
	problems []configProblem
}

// configProblem is a configuration file netcheck could not use.
type configProblem struct {
	path, what string
	err        error
}

func matchesAny(globs []string, name string) bool {
	for _, g := range globs {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

func takeInventory(st *netstate.State, o *Options) *inventory {
	inv := &inventory{st: st}
	// Uplinks: default-route devices, their masters, and a bridge uplink's
	// ports other than container interfaces.
	prot := map[string]bool{}
	for _, r := range st.DefaultRoutes() {
		l := st.ByIdx[r.LinkIndex]
		if l == nil {
			continue
		}
		prot[l.Attrs().Name] = true
		if m := st.ByIdx[l.Attrs().MasterIndex]; m != nil {
			prot[m.Attrs().Name] = true
		}
		if l.Type() == "bridge" {
			for _, p := range st.Links {
				if p.Attrs().MasterIndex == l.Attrs().Index && !matchesAny(containerGlobs(), p.Attrs().Name) {
					prot[p.Attrs().Name] = true
				}
			}
		}
	}
	// A veth with its own global address and no bridge is a link of the
	// node (an uplink to a router or another namespace), not a container's:
	// bridge CNIs address the bridge, routed CNIs use host routes.
	for _, l := range st.Links {
		a := l.Attrs()
		if l.Type() == "veth" && a.MasterIndex == 0 && len(st.GlobalAddrs(a.Index)) > 0 && !matchesAny(containerGlobs(), a.Name) {
			prot[a.Name] = true
		}
	}
	for n := range prot {
		inv.protected = append(inv.protected, n)
	}
	sort.Strings(inv.protected)

	inv.expected = expectedBridges(o, inv)
	isExpected := func(n string) bool {
		for _, e := range inv.expected {
			if e.name == n {
				return true
			}
		}
		return false
	}
	for _, l := range st.Links {
		n := l.Attrs().Name
		if prot[n] || n == "lo" {
			continue
		}
		switch {
		case l.Type() == "veth":
			inv.container = append(inv.container, l)
		case l.Type() == "bridge" && (isExpected(n) || matchesAny(containerGlobs(), n) || hasVethPorts(st, l)):
			inv.container = append(inv.container, l)
		case matchesAny(containerGlobs(), n):
			inv.container = append(inv.container, l)
		}
	}
	return inv
}

func hasVethPorts(st *netstate.State, br netlink.Link) bool {
	for _, l := range st.Links {
		if l.Attrs().MasterIndex == br.Attrs().Index && l.Type() == "veth" {
			return true
		}
	}
	return false
}

// expectedBridges reads CNI bridge plugin configurations, Docker's daemon
// configuration and --bridge.
func expectedBridges(o *Options, inv *inventory) []expectedBridge {
	var out []expectedBridge
	seen := map[string]bool{}
	addB := func(b expectedBridge) {
		if seen[b.name] {
			return
		}
		seen[b.name] = true
		out = append(out, b)
	}
	for _, n := range o.Bridges {
		addB(expectedBridge{name: n, source: "--bridge"})
	}
	cniDir := filepath.Join(o.Root, "etc/cni/net.d")
	entries, err := os.ReadDir(cniDir)
	sawCNI := false
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		inv.problems = append(inv.problems, configProblem{path: "/etc/cni/net.d", what: "unreadable", err: err})
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".conf") && !strings.HasSuffix(e.Name(), ".conflist") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(cniDir, e.Name()))
		if err != nil {
			inv.problems = append(inv.problems, configProblem{path: "/etc/cni/net.d/" + e.Name(), what: "unreadable", err: err})
			continue
		}
		bridges, err := cniBridges(data)
		if err != nil {
			inv.problems = append(inv.problems, configProblem{path: "/etc/cni/net.d/" + e.Name(), what: "unparsable", err: err})
			continue
		}
		for _, b := range bridges {
			b.source = "/etc/cni/net.d/" + e.Name()
			b.defaultNet = !sawCNI
			sawCNI = true
			if b.leaseDir != "" {
				b.leaseDir = filepath.Join(o.Root, b.leaseDir)
			}
			addB(b)
		}
	}
	// dockerd creates its bridge when it starts, with or without
	// containers, and /run is emptied at boot: a socket there means a
	// running daemon whose bridge must exist. An installed but stopped
	// Docker expects nothing.
	_, err = os.Stat(filepath.Join(o.Root, "run/docker.sock"))
	dockerUsed := err == nil
	if dockerUsed {
		b := expectedBridge{name: "docker0", gateway: netip.MustParsePrefix("172.17.0.1/16"), source: "docker (default bridge)", masq: true}
		data, err := os.ReadFile(filepath.Join(o.Root, "etc/docker/daemon.json"))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			inv.problems = append(inv.problems, configProblem{path: "/etc/docker/daemon.json", what: "unreadable", err: err})
		}
		if err == nil {
			var dc struct {
				Bridge string `json:"bridge"`
				BIP    string `json:"bip"`
				MTU    int    `json:"mtu"`
			}
			if err := json.Unmarshal(data, &dc); err != nil {
				inv.problems = append(inv.problems, configProblem{path: "/etc/docker/daemon.json", what: "unparsable", err: err})
			} else {
				if dc.Bridge == "none" {
					dockerUsed = false
				} else if dc.Bridge != "" {
					b.name = dc.Bridge
				}
				if p, err := netip.ParsePrefix(dc.BIP); err == nil {
					b.gateway = p
				}
				b.mtu = dc.MTU
				b.source = "/etc/docker/daemon.json"
			}
		}
		if dockerUsed {
			addB(b)
		}
	}
	return out
}

// cniBridges extracts bridge plugin settings from a .conf or .conflist.
func cniBridges(data []byte) ([]expectedBridge, error) {
	type ipam struct {
		Type    string `json:"type"`
		DataDir string `json:"dataDir"`
		Subnet  string `json:"subnet"`
		Gateway string `json:"gateway"`
		Ranges  [][]struct {
			Subnet  string `json:"subnet"`
			Gateway string `json:"gateway"`
		} `json:"ranges"`
	}
	type plugin struct {
		Type      string `json:"type"`
		Bridge    string `json:"bridge"`
		IsGateway bool   `json:"isGateway"`
		IPMasq    bool   `json:"ipMasq"`
		MTU       int    `json:"mtu"`
		IPAM      ipam   `json:"ipam"`
	}
	var conf struct {
		plugin
		Name    string   `json:"name"`
		Plugins []plugin `json:"plugins"`
	}
	if err := json.Unmarshal(data, &conf); err != nil {
		return nil, err
	}
	plugins := append([]plugin{conf.plugin}, conf.Plugins...)
	var out []expectedBridge
	for _, p := range plugins {
		if p.Type != "bridge" {
			continue
		}
		b := expectedBridge{name: p.Bridge, onDemand: true, masq: p.IPMasq, mtu: p.MTU}
		if b.name == "" {
			b.name = "cni0"
		}
		if p.IPAM.Type == "host-local" && conf.Name != "" && !strings.ContainsAny(conf.Name, "/\\") {
			dir := "/var/lib/cni/networks"
			if p.IPAM.DataDir != "" {
				dir = p.IPAM.DataDir
			}
			b.leaseDir = filepath.Join(dir, conf.Name)
		}
		subnet, gw := p.IPAM.Subnet, p.IPAM.Gateway
		if subnet == "" && len(p.IPAM.Ranges) > 0 && len(p.IPAM.Ranges[0]) > 0 {
			subnet, gw = p.IPAM.Ranges[0][0].Subnet, p.IPAM.Ranges[0][0].Gateway
		}
		if pfx, err := netip.ParsePrefix(subnet); err == nil {
			a := pfx.Masked().Addr().Next()
			if g, err := netip.ParseAddr(gw); err == nil {
				a = g
			}
			b.gateway = netip.PrefixFrom(a, pfx.Bits())
		}
		out = append(out, b)
	}
	return out, nil
}

// Options configure a node check. The zero value checks the node this
// process runs on.
type Options struct {
	Logger *slog.Logger `json:"-"`
	// Root is where the node's file tree is (default /; a DaemonSet mounts
	// the host at /host).
	Root string
	// Bridges are bridges that must exist, be up and have an IPv4 address,
	// in addition to those found in CNI and Docker configuration.
	Bridges []string
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Root == "" {
		o.Root = "/"
	}
	return o
}

// Run performs the node checks and returns the report. It never returns
// nil; problems running a check become findings.
func Run(ctx context.Context, opts Options) *netcheck.Report {
	o := opts.withDefaults()
	return run(ctx, &o)
}

func run(ctx context.Context, o *Options) *netcheck.Report {
	started := time.Now()
	rep := &netcheck.Report{Mode: "host", Scope: "full"}
	st, err := netstate.Read()
	if err != nil {
		c := netcheck.NewCheck("bridges", "Container bridges")
		c.Fail(netcheck.StatusBroken, "netlink.unavailable", fmt.Sprintf("cannot read the node's network configuration: %v", err), nil,
			netcheck.Remedy{Text: "run on the node's network namespace (hostNetwork: true)"})
		rep.Add(c.Done())
		rep.Finish(started)
		return rep
	}
	inv := takeInventory(st, o)
	rep.Add(bridgesCheck(inv))
	rep.Add(vethsCheck(inv))
	rep.Add(forwardingCheck(inv))
	rep.Add(firewallCheck(ctx, inv))
	cfg, cerr := networkd.Load(o.Root)
	active, aerr := networkd.StateAvailable(o.Root)
	if aerr != nil {
		o.Logger.Debug("networkd state", "err", aerr)
	}
	if cerr != nil {
		c := netcheck.NewCheck("networkd", "systemd-networkd configuration")
		c.Fail(netcheck.StatusDegraded, "networkd.unreadable", "cannot read systemd-networkd/udev configuration, so whether networkd would manage container interfaces is not checked: "+cerr.Error(), nil,
			netcheck.Remedy{Text: fmt.Sprintf("netcheck runs as uid %d: run the node check as root, or check that --root %s is the node's file tree with /etc/systemd, /usr/lib/systemd and /run/systemd mounted", os.Getuid(), o.Root)})
		rep.Add(c.Done())
	} else {
		rep.Add(networkdConfigCheck(cfg, inv, o, active))
		rep.Add(udevLinkCheck(cfg, inv, o))
		rep.Add(foreignRoutesCheck(cfg, active, o))
	}
	rep.Add(networkdStateCheck(inv, o, active))
	rep.SortChecks()
	if f := firstBroken(rep); f != nil {
		rep.Summary = f.Problem
	}
	rep.Finish(started)
	return rep
}

func firstBroken(r *netcheck.Report) *netcheck.Finding {
	for i := range r.Findings {
		if r.Findings[i].Severity == netcheck.StatusBroken {
			return &r.Findings[i]
		}
	}
	return nil
}

// guardRemedy is the remedy every networkd/udev hazard points at.
func guardRemedy(o *Options, text string) netcheck.Remedy {
	cmd := "agent netcheck --host --fix"
	if o.Root != "/" {
		cmd += " --root " + o.Root
	}
	r := netcheck.Remedy{Text: text + "; `" + cmd + "` writes the guard (preview with --dry-run), then reload:",
		Commands: []string{cmd + " --dry-run", cmd, "networkctl reload", "udevadm control --reload"}}
	if plan, err := PlanGuard(*o); err == nil {
		for _, f := range plan.Files {
			if f.Change != "unchanged" {
				r.Files = append(r.Files, netcheck.FileChange{Path: f.Path, Content: f.Content})
			}
		}
	}
	return r
}

func bridgesCheck(inv *inventory) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("bridges", "Container bridges exist, are up and addressed")
	st := inv.st
	var names, unused []string
	checked := map[string]bool{}
	for _, e := range inv.expected {
		checked[e.name] = true
		l := linkByName(st, e.name)
		if l == nil {
			leases := e.leases()
			var orphans []string
			// Detached veths count against a missing bridge only if it is
			// the network pods get (the first CNI configuration, Docker,
			// --bridge) or containers hold addresses on it; otherwise a
			// stale configuration would take the blame for a veth
			// detached from a bridge that exists.
			if len(leases) > 0 || e.defaultNet || !e.onDemand {
				orphans = vethsWithoutMaster(st, inv.protected)
			}
			if e.onDemand && len(orphans) == 0 && len(leases) == 0 {
				// A stale or unused CNI configuration (podman moved to
				// netavark, say): nothing is attached, nothing lost.
				unused = append(unused, fmt.Sprintf("%s (%s): not present, and no container holds an address on it or lacks its bridge; the bridge plugin creates it with the first container", e.name, e.source))
				continue
			}
			ev := []string{fmt.Sprintf("%s is configured by %s but does not exist", e.name, e.source)}
			if len(orphans) > 0 {
				ev = append(ev, fmt.Sprintf("veths without a bridge: %s", strings.Join(orphans, ", ")))
			}
			if len(leases) > 0 {
				ev = append(ev, fmt.Sprintf("host-local IPAM in %s still holds %s for containers on it", e.leaseDir, strings.Join(leases, ", ")))
			}
			c.Fail(netcheck.StatusBroken, "bridge.missing", fmt.Sprintf("bridge %s is gone: every container on it has lost its network", e.name), ev,
				netcheck.Remedy{Text: "something deleted the bridge (systemd-networkd managing it does this); recreate it by restarting the container runtime or the pods, and install the networkd guard so it does not happen again",
					Commands: recreateBridgeCommands(e)})
			names = append(names, e.name)
			continue
		}
		names = append(names, e.name)
		checkBridge(c, st, l, e.gateway, e.source, true)
		checkMTU(c, st, l, e)
	}
	if len(unused) > 0 {
		c.Detail("unused", unused)
	}
	for _, p := range inv.problems {
		configFinding(c, p)
	}
	for _, l := range inv.container {
		if l.Type() == "bridge" && !checked[l.Attrs().Name] {
			names = append(names, l.Attrs().Name)
			checkBridge(c, st, l, netip.Prefix{}, "", false)
		}
	}
	c.Detail("bridges", names)
	if len(names) == 0 && len(c.Findings) == 0 {
		if len(unused) > 0 {
			c.Skip("no container bridge in use; configured but not created yet: " + strings.Join(unused, "; "))
			return c.Done()
		}
		c.Skip("no container bridges configured or present")
		return c.Done()
	}
	if c.Status == netcheck.StatusOK {
		c.Summary = fmt.Sprintf("%s up, with their addresses", strings.Join(names, ", "))
	} else {
		c.Summary = fmt.Sprintf("%d problem(s) with %s", len(c.Findings), strings.Join(names, ", "))
	}
	return c.Done()
}

// configFinding says which configuration could not be used, why, and
// what to do: nothing is skipped silently.
func configFinding(c *netcheck.CheckBuilder, p configProblem) {
	if p.what == "unparsable" {
		c.Fail(netcheck.StatusDegraded, "config.unparsable", fmt.Sprintf("%s is not valid JSON, so the bridges it configures are not checked", p.path),
			[]string{fmt.Sprintf("%s: %v", p.path, p.err)},
			netcheck.Remedy{Text: "fix the file (the container runtime cannot use it either); `jq . " + p.path + "` shows where it breaks"})
		return
	}
	text := fmt.Sprintf("netcheck (uid %d) cannot read %s; ", os.Getuid(), p.path)
	if errors.Is(p.err, fs.ErrPermission) {
		text += "hardened nodes keep CNI configuration 0600 root: run the node check as root (the DaemonSet's runAsUser: 0, read-only mounts), or run `agent netcheck --host` with sudo on the node"
	} else {
		text += "check that --root points at the node's file tree and the path is mounted"
	}
	c.Fail(netcheck.StatusDegraded, "config.unreadable", fmt.Sprintf("cannot read %s: the bridges it configures are not checked", p.path),
		[]string{fmt.Sprintf("%s: %v", p.path, p.err)}, netcheck.Remedy{Text: text})
}

func recreateBridgeCommands(e expectedBridge) []string {
	cmds := []string{"ip link add " + e.name + " type bridge"}
	if e.gateway.IsValid() {
		cmds = append(cmds, fmt.Sprintf("ip addr add %s dev %s", e.gateway, e.name))
	}
	cmds = append(cmds, "ip link set "+e.name+" up")
	if strings.HasPrefix(e.name, "docker") {
		cmds = []string{"systemctl restart docker   # recreates " + e.name + " and reattaches containers on restart"}
	}
	return cmds
}

// tunnelMTU is the smallest MTU the workspace's tunnels fit in (the same
// threshold the workspace check uses).
const tunnelMTU = 1378

// checkMTU compares the bridge and its veths with the MTU the configuration
// gives the containers: a smaller bridge or host veth silently drops the
// containers' full-size packets (no fragmentation-needed across a bridge),
// the black hole the workspace's mtu check sees from inside.
func checkMTU(c *netcheck.CheckBuilder, st *netstate.State, br netlink.Link, e expectedBridge) {
	want := e.mtu
	if want == 0 {
		want = 1500
	}
	var small []netlink.Link
	if br.Attrs().MTU < want {
		small = append(small, br)
	}
	for _, p := range st.Links {
		if p.Attrs().MasterIndex == br.Attrs().Index && p.Type() == "veth" && p.Attrs().MTU < want {
			small = append(small, p)
		}
	}
	if len(small) == 0 {
		return
	}
	var ev, cmds []string
	lowest := want
	for _, l := range small {
		ev = append(ev, fmt.Sprintf("%s mtu %d", l.Attrs().Name, l.Attrs().MTU))
		lowest = min(lowest, l.Attrs().MTU)
	}
	// Ports first: a bridge cannot be raised above its smallest port.
	for i := len(small) - 1; i >= 0; i-- {
		cmds = append(cmds, fmt.Sprintf("ip link set %s mtu %d", small[i].Attrs().Name, want))
	}
	source := "the kernel's default for container veths"
	if e.mtu != 0 {
		source = e.source + " (\"mtu\")"
	}
	ev = append(ev, fmt.Sprintf("containers on %s get MTU %d from %s", br.Attrs().Name, want, source))
	sev := netcheck.StatusDegraded
	if lowest < tunnelMTU {
		sev = netcheck.StatusBroken
	}
	c.Fail(sev, "bridge.mtu_mismatch", fmt.Sprintf("%s or its veths have a smaller MTU (%d) than its containers (%d): their full-size packets are dropped without an error, so bulk transfers stall", br.Attrs().Name, lowest, want), ev,
		netcheck.Remedy{Text: "give the bridge and its veths the containers' MTU (or lower the MTU in the CNI configuration, and restart the pods, if the network beyond needs the smaller size)", Commands: cmds})
}

func checkBridge(c *netcheck.CheckBuilder, st *netstate.State, l netlink.Link, want netip.Prefix, source string, expected bool) {
	n := l.Attrs().Name
	ports := 0
	for _, p := range st.Links {
		if p.Attrs().MasterIndex == l.Attrs().Index {
			ports++
		}
	}
	if !netstate.AdminUp(l) {
		c.Fail(netcheck.StatusBroken, "bridge.down", fmt.Sprintf("bridge %s is down", n),
			[]string{fmt.Sprintf("%s flags %v, %d ports", n, l.Attrs().Flags, ports)},
			netcheck.Remedy{Text: "bring it up and install the networkd guard", Commands: []string{"ip link set " + n + " up"}})
		return
	}
	v4 := netstate.IPv4Of(st.Addrs[l.Attrs().Index])
	if len(v4) == 0 && (expected || ports > 0) {
		cmd := fmt.Sprintf("ip addr add GATEWAY/PREFIX dev %s   # the address the containers use as gateway", n)
		if want.IsValid() {
			cmd = fmt.Sprintf("ip addr add %s dev %s", want, n)
		}
		ev := []string{fmt.Sprintf("%s has no IPv4 address; %d ports attached", n, ports)}
		if source != "" && want.IsValid() {
			ev = append(ev, fmt.Sprintf("%s expects %s", source, want))
		} else if expected {
			ev = append(ev, fmt.Sprintf("%s is expected (%s) to carry the containers' gateway address", n, source))
		}
		c.Fail(netcheck.StatusBroken, "bridge.no_address", fmt.Sprintf("bridge %s has lost its address: containers on it cannot reach their gateway", n), ev,
			netcheck.Remedy{Text: "put the gateway address back (or restart the runtime) and install the networkd guard (systemd-networkd removes addresses it did not configure)", Commands: []string{cmd}})
		return
	}
	if want.IsValid() && len(v4) > 0 {
		found := false
		for _, a := range v4 {
			if a == want.String() {
				found = true
			}
		}
		if !found {
			c.Fail(netcheck.StatusDegraded, "bridge.unexpected_address", fmt.Sprintf("bridge %s has %v, but %s expects %s", n, v4, source, want),
				[]string{fmt.Sprintf("%s addresses: %v", n, v4)},
				netcheck.Remedy{Text: "check which tool changed the bridge's address", Commands: []string{fmt.Sprintf("ip addr add %s dev %s", want, n)}})
		}
	}
}

func linkByName(st *netstate.State, name string) netlink.Link {
	for _, l := range st.Links {
		if l.Attrs().Name == name {
			return l
		}
	}
	return nil
}

// vethsWithoutMaster lists container veths that are in no bridge and carry
// no route (a routed CNI's veths have a host route through them).
func vethsWithoutMaster(st *netstate.State, protected []string) []string {
	var out []string
	for _, l := range st.Links {
		a := l.Attrs()
		if slices.Contains(protected, a.Name) {
			continue
		}
		if l.Type() == "veth" && a.MasterIndex == 0 && a.NetNsID >= 0 && st.RoutesVia(a.Index) == 0 && len(st.GlobalAddrs(a.Index)) == 0 {
			out = append(out, a.Name)
		}
	}
	sort.Strings(out)
	return out
}

func vethsCheck(inv *inventory) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("veths", "Container veths attached to a bridge")
	st := inv.st
	total, attached := 0, 0
	for _, l := range st.Links {
		if l.Type() == "veth" && l.Attrs().NetNsID >= 0 && !slices.Contains(inv.protected, l.Attrs().Name) {
			total++
			if l.Attrs().MasterIndex > 0 {
				attached++
			}
		}
	}
	c.Detail("container_veths", total)
	c.Detail("attached", attached)
	if total == 0 {
		c.Skip("no container veths")
		return c.Done()
	}
	bridge := ""
	for _, e := range inv.expected {
		if e.defaultNet || (len(inv.expected) == 1) || (!e.onDemand && linkByName(st, e.name) != nil) {
			bridge = e.name
			break
		}
	}
	if bridge == "" {
		// The bridge most veths are on.
		count := map[int]int{}
		best := 0
		for _, l := range st.Links {
			if l.Type() == "veth" && l.Attrs().MasterIndex > 0 {
				count[l.Attrs().MasterIndex]++
				if count[l.Attrs().MasterIndex] > count[best] {
					best = l.Attrs().MasterIndex
				}
			}
		}
		if m := st.ByIdx[best]; m != nil {
			bridge = m.Attrs().Name
		}
	}
	detached := vethsWithoutMaster(st, inv.protected)
	for _, n := range detached {
		l := linkByName(st, n)
		ev := []string{fmt.Sprintf("%s (ifindex %d, peer ifindex %d in netns id %d) has no master, no address and no route", n, l.Attrs().Index, l.Attrs().ParentIndex, l.Attrs().NetNsID)}
		remedy := netcheck.Remedy{Text: "reattach it (or restart the container) and install the networkd guard: systemd-networkd managing veths removes them from their bridge",
			Commands: []string{fmt.Sprintf("ip link set %s master %s up", n, bridge)}}
		if bridge == "" {
			// Guessing a bridge name would give a command that fails or
			// attaches the container to the wrong network.
			remedy.Commands = nil
			remedy.Text = "restart the container behind it (its runtime reattaches the new veth), or reattach it by hand with `ip link set " + n + " master <bridge> up`, where <bridge> is its network's bridge"
			if len(inv.problems) > 0 {
				remedy.Text += "; netcheck cannot name the bridge because it could not read " + inv.problems[0].path + " (see the config finding)"
			} else {
				remedy.Text += "; no container bridge is configured or present, so netcheck cannot name it"
			}
		}
		c.Fail(netcheck.StatusBroken, "veth.no_master", fmt.Sprintf("veth %s is detached from its bridge: the container behind it has no network past its eth0", n), ev, remedy)
	}
	for _, l := range st.Links {
		a := l.Attrs()
		if l.Type() == "veth" && a.NetNsID >= 0 && !netstate.AdminUp(l) && !slices.Contains(inv.protected, a.Name) {
			c.Fail(netcheck.StatusBroken, "veth.down", fmt.Sprintf("veth %s is down: the container behind it has no carrier", a.Name),
				[]string{fmt.Sprintf("%s flags %v", a.Name, a.Flags)},
				netcheck.Remedy{Text: "bring it up", Commands: []string{"ip link set " + a.Name + " up"}})
		}
	}
	if c.Status == netcheck.StatusOK {
		c.Summary = fmt.Sprintf("%d container veths, %d in a bridge, none detached", total, attached)
	} else {
		c.Summary = fmt.Sprintf("%d of %d container veths detached", len(detached), total)
	}
	return c.Done()
}

// ifaceFor describes a link the way systemd's [Match] sees it.
func ifaceFor(l netlink.Link) networkd.Interface {
	a := l.Attrs()
	kind := l.Type()
	if kind == "device" {
		kind = ""
	}
	typ := netstate.DevType(a.Name)
	if typ == "" {
		switch {
		case a.Name == "lo":
			typ = "loopback"
		case len(a.HardwareAddr) == 6:
			typ = "ether"
		default:
			typ = "none"
		}
	}
	driver := kind
	if kind == "" {
		if target, err := os.Readlink(filepath.Join("/sys/class/net", a.Name, "device/driver")); err == nil {
			driver = filepath.Base(target)
		}
	}
	return networkd.Interface{Name: a.Name, Kind: kind, Type: typ, Driver: driver, MAC: a.HardwareAddr.String(), AltNames: a.AltNames}
}

// subjects are the interfaces the configuration is judged for: container
// interfaces present, the expected bridges, and a veth to come.
func subjects(inv *inventory) []networkd.Interface {
	var out []networkd.Interface
	seen := map[string]bool{}
	for _, l := range inv.container {
		out = append(out, ifaceFor(l))
		seen[l.Attrs().Name] = true
	}
	for _, e := range inv.expected {
		if !seen[e.name] {
			out = append(out, networkd.Interface{Name: e.name, Kind: "bridge", Type: "bridge", Driver: "bridge"})
			seen[e.name] = true
		}
	}
	out = append(out, networkd.Interface{Name: sampleVeth, Kind: "veth", Type: "ether", Driver: "veth"})
	return out
}

func networkdInstalled(root string) bool {
	for _, p := range []string{"lib/systemd/systemd-networkd", "usr/lib/systemd/systemd-networkd"} {
		if _, err := os.Stat(filepath.Join(root, p)); err == nil {
			return true
		}
	}
	return false
}

func networkdConfigCheck(cfg *networkd.Config, inv *inventory, o *Options, active bool) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("networkd", "systemd-networkd configuration for container interfaces")
	if !active && !networkdInstalled(o.Root) {
		c.Skip("systemd-networkd is not installed")
		return c.Done()
	}
	var hazards []string
	var files []string
	for _, ifc := range subjects(inv) {
		sel := cfg.NetworkFor(ifc)
		if sel == nil || sel.File.Unmanaged() {
			continue
		}
		why := "its [Match] selects it"
		what := ifc.Name
		if ifc.Name == sampleVeth {
			what = "every new container veth (e.g. " + sampleVeth + ")"
		}
		hazards = append(hazards, fmt.Sprintf("%s → %s (%s; not Unmanaged=yes)", what, sel.File.Path, why))
		files = append(files, sel.File.Path)
	}
	c.Detail("network_files", len(cfg.Networks))
	for _, f := range cfg.CatchAll() {
		c.Fail(netcheck.StatusDegraded, "networkd.catch_all_file", fmt.Sprintf("%s has no [Match] keys: current networkd ignores it, older versions (the 2016 CoreOS outage) apply it to every interface, containers included", f.Path),
			[]string{fmt.Sprintf("%s: no Name=, Kind=, Type=, Driver= or other [Match] key", f.Path)},
			netcheck.Remedy{Text: "give it a [Match] naming the interfaces it is meant for (e.g. Name=en* eth0), so its effect does not depend on the systemd version"})
	}
	if len(hazards) == 0 && len(c.Findings) == 0 {
		c.Summary = fmt.Sprintf("no .network file would manage container interfaces (%d files read)", len(cfg.Networks))
		return c.Done()
	}
	if len(hazards) == 0 {
		c.Summary = fmt.Sprintf("%d .network file(s) without [Match]", len(c.Findings))
		return c.Done()
	}
	sort.Strings(files)
	c.Summary = fmt.Sprintf("%d container interface(s) would be managed by networkd", len(hazards))
	c.Fail(netcheck.StatusDegraded, "networkd.would_manage", "systemd-networkd configuration matches container interfaces: when it manages them it removes their addresses and bridge membership",
		hazards, guardRemedy(o, "mark container interfaces Unmanaged=yes in a .network file that sorts first"))
	return c.Done()
}

func networkdStateCheck(inv *inventory, o *Options, active bool) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("networkd-state", "systemd-networkd's own view of container interfaces")
	if !active {
		c.Skip("systemd-networkd is not running (no state in /run/systemd/netif/links)")
		return c.Done()
	}
	var managed []string
	unmanaged := 0
	for _, l := range inv.container {
		s, err := networkd.ReadLinkState(o.Root, l.Attrs().Index)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				managed = append(managed, fmt.Sprintf("%s: unreadable state: %v", l.Attrs().Name, err))
			}
			continue
		}
		if s.Managed() {
			nf := s.NetworkFile
			if nf == "" {
				nf = "(none recorded)"
			}
			managed = append(managed, fmt.Sprintf("%s: %s ADMIN_STATE=%s OPER_STATE=%s NETWORK_FILE=%s", l.Attrs().Name, s.Path, s.AdminState, s.OperState, nf))
		} else {
			unmanaged++
		}
	}
	c.Detail("managed", len(managed))
	c.Detail("unmanaged", unmanaged)
	if len(managed) == 0 {
		c.Summary = fmt.Sprintf("networkd leaves all %d container interfaces it knows unmanaged", unmanaged)
		return c.Done()
	}
	c.Summary = fmt.Sprintf("networkd manages %d container interface(s)", len(managed))
	c.Fail(netcheck.StatusBroken, "networkd.manages_container_link", "systemd-networkd has taken over container interfaces: it will wipe their addresses and detach them from their bridges", managed,
		guardRemedy(o, "make networkd leave them alone"))
	return c.Done()
}

func udevLinkCheck(cfg *networkd.Config, inv *inventory, o *Options) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("udev-link", "udev .link MAC address policy for veths and bridges")
	var hazards []string
	for _, ifc := range subjects(inv) {
		sel := cfg.LinkFor(ifc)
		if sel == nil {
			continue
		}
		if p, src := sel.File.MACAddressPolicy(); p == "persistent" || p == "random" {
			what := ifc.Name
			if ifc.Name == sampleVeth {
				what = "new veths (e.g. " + sampleVeth + ")"
			}
			hazards = append(hazards, fmt.Sprintf("%s → %s MACAddressPolicy=%s (%s)", what, sel.File.Path, p, src))
		}
	}
	c.Detail("link_files", len(cfg.Links))
	if len(hazards) == 0 {
		c.Summary = fmt.Sprintf("no .link file rewrites container MAC addresses (%d files read)", len(cfg.Links))
		return c.Done()
	}
	c.Summary = fmt.Sprintf("%d container interface(s) get a udev-chosen MAC", len(hazards))
	c.Fail(netcheck.StatusDegraded, "udev.mac_policy", "udev rewrites the MAC address of new veths/bridges (MACAddressPolicy), racing CNIs that already programmed the old one (static neighbour entries, flannel VTEPs)",
		hazards, guardRemedy(o, "give container interfaces a .link file with MACAddressPolicy=none that sorts first"))
	return c.Done()
}

func foreignRoutesCheck(cfg *networkd.Config, active bool, o *Options) *netcheck.CheckBuilder {
	c := netcheck.NewCheck("foreign-routes", "networkd ManageForeignRoutes")
	if !active {
		c.Skip("systemd-networkd is not running")
		return c.Done()
	}
	routes, src := cfg.ManageForeign("ManageForeignRoutes")
	rules, src2 := cfg.ManageForeign("ManageForeignRoutingPolicyRules")
	c.Detail("manage_foreign_routes", routes)
	c.Detail("manage_foreign_routing_policy_rules", rules)
	if !routes && !rules {
		c.Summary = "networkd keeps routes and rules it did not create"
		return c.Done()
	}
	var ev []string
	for _, x := range []struct {
		key string
		on  bool
		src string
	}{{"ManageForeignRoutes", routes, src}, {"ManageForeignRoutingPolicyRules", rules, src2}} {
		if x.on {
			where := "default"
			if x.src != "" {
				where = x.src
			}
			ev = append(ev, fmt.Sprintf("%s=yes (%s)", x.key, where))
		}
	}
	c.Summary = "networkd removes routes/rules it did not create"
	c.Fail(netcheck.StatusDegraded, "networkd.manage_foreign", "systemd-networkd deletes routes and policy rules it did not create (CNI routes, tailscale rules) when it starts or reconfigures",
		ev, guardRemedy(o, "set ManageForeignRoutes=no and ManageForeignRoutingPolicyRules=no"))
	return c.Done()
}

// Watch checks the node until ctx ends, calling fn with a report at the
// start, whenever the status changes, and every full interval; netlink
// events on the node trigger an immediate check.
func Watch(ctx context.Context, opts Options, wopts netcheck.WatchOptions, fn func(*netcheck.Report)) error {
	o := opts.withDefaults()
	check := func() *netcheck.Report { return run(ctx, &o) }
	return netcheck.WatchWith(ctx, o.Logger, wopts, check, check, fn)
}

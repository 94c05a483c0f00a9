package networkd

import (
	"os"
	"path/filepath"
	"testing"
)

var (
	veth   = Interface{Name: "veth1a2b3c", Kind: "veth", Type: "ether", Driver: "veth"}
	bridge = Interface{Name: "cni0", Kind: "bridge", Type: "bridge", Driver: "bridge"}
	uplink = Interface{Name: "eth0", Type: "ether", Driver: "virtio_net", Path: "pci-0000:00:03.0", AltNames: []string{"enp0s3"}}
	lo     = Interface{Name: "lo", Type: "loopback"}
)

func TestMatchRules(t *testing.T) {
	tests := []struct {
		name  string
		match string
		ifc   Interface
		link  bool
		want  bool
		empty bool
	}{
		{"no match section matches all", "", veth, false, true, true},
		{"empty match section matches all", "[Match]\n", bridge, false, true, true},
		{"name glob", "[Match]\nName=veth*\n", veth, false, true, false},
		{"name glob list OR", "[Match]\nName=docker* veth* cni*\n", bridge, false, true, false},
		{"name glob miss", "[Match]\nName=en*\n", veth, false, false, false},
		{"negated list", "[Match]\nName=!veth* cni*\n", veth, false, false, false},
		{"negated list passes others", "[Match]\nName=!veth* cni*\n", uplink, false, true, false},
		{"negation wins over positive", "[Match]\nName=*\nName=!veth*\n", veth, false, false, false},
		{"positive and negative lines", "[Match]\nName=e*\nName=!eth1\n", uplink, false, true, false},
		{"altname matches", "[Match]\nName=enp0s3\n", uplink, false, true, false},
		{"empty assignment resets", "[Match]\nName=en*\nName=\nName=veth*\n", veth, false, true, false},
		{"AND across keys", "[Match]\nName=veth*\nKind=bridge\n", veth, false, false, false},
		{"kind list", "[Match]\nKind=veth bridge vxlan\n", veth, false, true, false},
		{"flatcar zz-default excludes veth", "[Match]\nName=*\nType=!loopback bridge tunnel vxlan wireguard\nDriver=!veth dummy\n", veth, false, false, false},
		{"flatcar zz-default excludes bridge", "[Match]\nName=*\nType=!loopback bridge tunnel vxlan wireguard\nDriver=!veth dummy\n", bridge, false, false, false},
		{"flatcar zz-default takes uplink", "[Match]\nName=*\nType=!loopback bridge tunnel vxlan wireguard\nDriver=!veth dummy\n", uplink, false, true, false},
		{"flatcar zz-default skips lo", "[Match]\nName=*\nType=!loopback bridge tunnel vxlan wireguard\nDriver=!veth dummy\n", lo, false, false, false},
		{"docker 50-docker.network", "[Match]\nType=bridge\nName=docker*\n", Interface{Name: "docker0", Kind: "bridge", Type: "bridge", Driver: "bridge"}, false, true, false},
		{"path never matches virtual", "[Match]\nPath=pci-*\n", veth, false, false, false},
		{"path negated matches virtual", "[Match]\nPath=!pci-*\n", veth, false, true, false},
		{"mac address case-insensitive", "[Match]\nMACAddress=02:42:AC:11:00:02\n", Interface{Name: "x", MAC: "02:42:ac:11:00:02"}, false, true, false},
		{"property cannot match container link", "[Match]\nProperty=ID_BUS=pci\n", veth, false, false, false},
		{"host condition assumed", "[Match]\nName=veth*\nHost=node1\n", veth, false, true, false},
		{"link: OriginalName", "[Match]\nOriginalName=*\n", veth, true, true, false},
		{"link: Name is not a .link key", "[Match]\nName=en*\n", veth, true, true, true},
		{"network: OriginalName is not a .network key", "[Match]\nOriginalName=en*\n", veth, false, true, true},
		{"link: driver", "[Match]\nDriver=veth bridge vxlan\n", bridge, true, true, false},
		{"malformed glob matches nothing", "[Match]\nName=[veth\n", veth, false, false, false},
		{"continuation line", "[Match]\nName=docker* \\\n  veth*\n", veth, false, true, false},
		{"comments ignored", "# c\n; c\n[Match]\n# Name=en*\nName=veth*\n", veth, false, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, err := ParseUnit("test", []byte(tt.match))
			if err != nil {
				t.Fatal(err)
			}
			r := Match(u, tt.ifc, tt.link)
			if r.Matches != tt.want || r.Empty != tt.empty {
				t.Errorf("Match = %+v, want matches=%v empty=%v", r, tt.want, tt.empty)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	for _, bad := range []string{"Name=x\n", "[Match\nName=x\n", "[Match]\nnonsense\n"} {
		if _, err := ParseUnit("bad", []byte(bad)); err == nil {
			t.Errorf("ParseUnit(%q) accepted", bad)
		}
	}
}

func write(t *testing.T, root, p, content string) {
	t.Helper()
	full := filepath.Join(root, p)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, root, target, p string) {
	t.Helper()
	full := filepath.Join(root, p)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, full); err != nil {
		t.Fatal(err)
	}
}

func TestLoadPrecedence(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, root string)
		ifc     Interface
		want    string // node path of the selected file, "" for none
		managed bool
	}{
		{
			name: "order is by file name across directories",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/10-a.network", "[Match]\nName=veth*\n[Link]\nUnmanaged=yes\n")
				write(t, root, "/etc/systemd/network/50-b.network", "[Network]\nDHCP=yes\n")
			},
			ifc: veth, want: "/usr/lib/systemd/network/10-a.network", managed: false,
		},
		{
			name: "same name in /etc replaces /usr/lib",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/10-a.network", "[Match]\nName=veth*\n[Link]\nUnmanaged=yes\n")
				write(t, root, "/etc/systemd/network/10-a.network", "[Match]\nName=en*\n")
				write(t, root, "/etc/systemd/network/99-all.network", "[Match]\nName=*\n[Network]\nDHCP=yes\n")
			},
			ifc: veth, want: "/etc/systemd/network/99-all.network", managed: true,
		},
		{
			name: "/run beats /usr/lib",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/10-a.network", "[Match]\nName=x*\n")
				write(t, root, "/run/systemd/network/10-a.network", "[Match]\nName=veth*\n")
			},
			ifc: veth, want: "/run/systemd/network/10-a.network", managed: true,
		},
		{
			name: "symlink to /dev/null masks",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/10-a.network", "[Match]\nName=veth*\n")
				symlink(t, root, "/dev/null", "/etc/systemd/network/10-a.network")
			},
			ifc: veth, want: "",
		},
		{
			name: "empty file masks",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/10-a.network", "[Match]\nName=veth*\n")
				write(t, root, "/etc/systemd/network/10-a.network", "")
			},
			ifc: veth, want: "",
		},
		{
			name: "drop-in turns a file unmanaged",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/50-all.network", "[Match]\nName=*\n[Network]\nDHCP=yes\n")
				write(t, root, "/etc/systemd/network/50-all.network.d/10-unmanaged.conf", "[Link]\nUnmanaged=yes\n")
			},
			ifc: veth, want: "/usr/lib/systemd/network/50-all.network", managed: false,
		},
		{
			name: "drop-in changes the match",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/50-x.network", "[Match]\nName=en*\n")
				write(t, root, "/run/systemd/network/50-x.network.d/a.conf", "[Match]\nName=\nName=veth*\n")
			},
			ifc: veth, want: "/usr/lib/systemd/network/50-x.network", managed: true,
		},
		{
			name: "same-name drop-in in /etc replaces /usr/lib's",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/50-all.network", "[Match]\nName=*\n")
				write(t, root, "/usr/lib/systemd/network/50-all.network.d/a.conf", "[Link]\nUnmanaged=yes\n")
				write(t, root, "/etc/systemd/network/50-all.network.d/a.conf", "[Link]\nUnmanaged=no\n")
			},
			ifc: veth, want: "/usr/lib/systemd/network/50-all.network", managed: true,
		},
		{
			name: "drop-ins apply in name order",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/50-all.network", "[Match]\nName=*\n")
				write(t, root, "/etc/systemd/network/50-all.network.d/b.conf", "[Link]\nUnmanaged=no\n")
				write(t, root, "/run/systemd/network/50-all.network.d/a.conf", "[Link]\nUnmanaged=yes\n")
			},
			ifc: veth, want: "/usr/lib/systemd/network/50-all.network", managed: true,
		},
		{
			name: "/lib on split-usr systems",
			setup: func(t *testing.T, root string) {
				write(t, root, "/lib/systemd/network/70-v.network", "[Match]\nKind=veth\n")
			},
			ifc: veth, want: "/lib/systemd/network/70-v.network", managed: true,
		},
		{
			name: "/lib symlinked to usr/lib is read once",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/lib/systemd/network/70-v.network", "[Match]\nKind=veth\n")
				symlink(t, root, "usr/lib", "/lib")
			},
			ifc: veth, want: "/usr/lib/systemd/network/70-v.network", managed: true,
		},
		{
			name: "a file without [Match] is ignored (current networkd)",
			setup: func(t *testing.T, root string) {
				write(t, root, "/etc/systemd/network/00-nomatch.network", "[Network]\nDHCP=yes\n")
				write(t, root, "/etc/systemd/network/50-v.network", "[Match]\nKind=veth\n")
			},
			ifc: veth, want: "/etc/systemd/network/50-v.network", managed: true,
		},
		{
			name: "symlink to another file is followed",
			setup: func(t *testing.T, root string) {
				write(t, root, "/usr/share/net/real.network", "[Match]\nName=veth*\n[Link]\nUnmanaged=yes\n")
				symlink(t, root, "/usr/share/net/real.network", "/etc/systemd/network/05-l.network")
			},
			ifc: veth, want: "/etc/systemd/network/05-l.network", managed: false,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			tt.setup(t, root)
			c, err := Load(root)
			if err != nil {
				t.Fatal(err)
			}
			sel := c.NetworkFor(tt.ifc)
			got := ""
			if sel != nil {
				got = sel.File.Path
			}
			if got != tt.want {
				t.Fatalf("NetworkFor = %q, want %q", got, tt.want)
			}
			if sel != nil && !sel.File.Unmanaged() != tt.managed {
				t.Errorf("managed = %v, want %v (files %v)", !sel.File.Unmanaged(), tt.managed, sel.File.Unit.Files)
			}
		})
	}
}

func TestLinkFilesAndNetworkdConf(t *testing.T) {
	root := t.TempDir()
	write(t, root, "/usr/lib/systemd/network/99-default.link", "[Match]\nOriginalName=*\n[Link]\nNamePolicy=keep kernel database onboard slot path\nMACAddressPolicy=persistent\n")
	write(t, root, "/usr/lib/systemd/network/00-empty.link", "[Link]\nMACAddressPolicy=none\n")
	c, err := Load(root)
	if err != nil {
		t.Fatal(err)
	}
	sel := c.LinkFor(veth)
	if sel == nil || sel.File.Name != "99-default.link" {
		t.Fatalf("LinkFor(veth) = %+v, want 99-default.link (00-empty.link has no [Match] and is ignored)", sel)
	}
	if p, _ := sel.File.MACAddressPolicy(); p != "persistent" {
		t.Errorf("policy %q", p)
	}
	if b, _ := c.ManageForeign("ManageForeignRoutes"); !b {
		t.Error("ManageForeignRoutes defaults to yes")
	}

	write(t, root, "/etc/systemd/network/10-c.link", "[Match]\nKind=veth bridge\n[Link]\nMACAddressPolicy=none\n")
	write(t, root, "/etc/systemd/networkd.conf", "[Network]\nManageForeignRoutes=yes\n")
	write(t, root, "/etc/systemd/networkd.conf.d/10-keep.conf", "[Network]\nManageForeignRoutes=no\n")
	c, err = Load(root)
	if err != nil {
		t.Fatal(err)
	}
	if sel := c.LinkFor(bridge); sel == nil || sel.File.Name != "10-c.link" {
		t.Fatalf("LinkFor(bridge) = %+v", sel)
	}
	if p, _ := c.LinkFor(bridge).File.MACAddressPolicy(); p != "none" {
		t.Errorf("policy %q", p)
	}
	if b, src := c.ManageForeign("ManageForeignRoutes"); b || src == "" {
		t.Errorf("ManageForeignRoutes = %v from %q, want no from the drop-in", b, src)
	}
}

func TestReadLinkState(t *testing.T) {
	root := t.TempDir()
	write(t, root, "/run/systemd/netif/links/7", "# This is private data. Do not parse.\nADMIN_STATE=configured\nOPER_STATE=routable\nNETWORK_FILE=/etc/systemd/network/99-all.network\n")
	st, err := ReadLinkState(root, 7)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Managed() || st.NetworkFile != "/etc/systemd/network/99-all.network" || st.OperState != "routable" {
		t.Errorf("state %+v", st)
	}
	if _, err := ReadLinkState(root, 8); !os.IsNotExist(err) {
		t.Errorf("missing state: %v", err)
	}
	if ok, err := StateAvailable(root); !ok || err != nil {
		t.Errorf("StateAvailable = %v, %v", ok, err)
	}
}

// Package netstate reads one rtnetlink snapshot of the current network
// namespace, shared by the workspace and node checks.
package netstate

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// State is one rtnetlink snapshot of the current network namespace. The
// dumps need no privileges.
type State struct {
	Links  []netlink.Link
	Addrs  map[int][]netlink.Addr
	Routes []netlink.Route
	ByIdx  map[int]netlink.Link
}

// retryDump repeats a dump that the kernel interrupted because the table
// changed mid-dump (NLM_F_DUMP_INTR).
func retryDump[T any](f func() (T, error)) (T, error) {
	var v T
	var err error
	for range 5 {
		v, err = f()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, err
}

func Read() (*State, error) {
	links, err := retryDump(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("listing links over rtnetlink: %w", err)
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("listing addresses over rtnetlink: %w", err)
	}
	routes, err := retryDump(func() ([]netlink.Route, error) { return netlink.RouteList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("listing routes over rtnetlink: %w", err)
	}
	s := &State{Links: links, Addrs: map[int][]netlink.Addr{}, Routes: routes, ByIdx: map[int]netlink.Link{}}
	for _, l := range links {
		s.ByIdx[l.Attrs().Index] = l
	}
	for _, a := range addrs {
		s.Addrs[a.LinkIndex] = append(s.Addrs[a.LinkIndex], a)
	}
	return s, nil
}

func IsDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

// DefaultRoutes returns the main table's default routes, IPv4 first.
func (s *State) DefaultRoutes() []netlink.Route {
	var v4, v6 []netlink.Route
	for _, r := range s.Routes {
		if !IsDefault(r) || r.Type != unix.RTN_UNICAST {
			continue
		}
		if r.Family == netlink.FAMILY_V6 {
			v6 = append(v6, r)
		} else {
			v4 = append(v4, r)
		}
	}
	return append(v4, v6...)
}

// GlobalAddrs returns a link's addresses of universe scope.
func (s *State) GlobalAddrs(idx int) []netlink.Addr {
	var out []netlink.Addr
	for _, a := range s.Addrs[idx] {
		if a.Scope == unix.RT_SCOPE_UNIVERSE {
			out = append(out, a)
		}
	}
	return out
}

// OnLink reports whether gw is covered by a connected prefix or a link route
// on the interface.
func (s *State) OnLink(idx int, gw net.IP) bool {
	for _, a := range s.Addrs[idx] {
		if a.IPNet != nil && a.IPNet.Contains(gw) {
			return true
		}
	}
	for _, r := range s.Routes {
		if r.LinkIndex == idx && r.Dst != nil && r.Gw == nil && r.Dst.Contains(gw) {
			return true
		}
	}
	return false
}

// RoutesVia counts non-default routes that point at a link (a routed CNI
// veth has a /32 host route through it).
func (s *State) RoutesVia(idx int) int {
	n := 0
	for _, r := range s.Routes {
		if r.LinkIndex != idx || IsDefault(r) {
			continue
		}
		// Every IPv6-enabled link gets fe80::/64; only real routes count.
		if r.Dst != nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast()) {
			continue
		}
		n++
	}
	return n
}

func Carrier(l netlink.Link) bool {
	return l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
}

func AdminUp(l netlink.Link) bool {
	return l.Attrs().Flags&net.FlagUp != 0
}

func IPv4Of(addrs []netlink.Addr) []string {
	var out []string
	for _, a := range addrs {
		if a.IP.To4() != nil {
			out = append(out, a.IPNet.String())
		}
	}
	return out
}

func AddrStrings(addrs []netlink.Addr) []string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, a.IPNet.String())
	}
	return out
}

func ToAddr(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// SysfsValue reads /sys/class/net/<ifname>/<attr> (for the current network
// namespace's sysfs).
func SysfsValue(ifname, attr string) string {
	b, err := os.ReadFile(filepath.Join("/sys/class/net", ifname, attr))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// DevType is udev's DEVTYPE from the link's uevent, empty if none.
func DevType(ifname string) string {
	b, err := os.ReadFile(filepath.Join("/sys/class/net", ifname, "uevent"))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "DEVTYPE="); ok {
			return v
		}
	}
	return ""
}

package netcheck

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

// netState is one rtnetlink snapshot of the current network namespace. The
// dumps need no privileges.
type netState struct {
	links  []netlink.Link
	addrs  map[int][]netlink.Addr
	routes []netlink.Route
	byIdx  map[int]netlink.Link
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

func readNetState() (*netState, error) {
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
	s := &netState{links: links, addrs: map[int][]netlink.Addr{}, routes: routes, byIdx: map[int]netlink.Link{}}
	for _, l := range links {
		s.byIdx[l.Attrs().Index] = l
	}
	for _, a := range addrs {
		s.addrs[a.LinkIndex] = append(s.addrs[a.LinkIndex], a)
	}
	return s, nil
}

func isDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

// defaultRoutes returns the main table's default routes, IPv4 first.
func (s *netState) defaultRoutes() []netlink.Route {
	var v4, v6 []netlink.Route
	for _, r := range s.routes {
		if !isDefault(r) || r.Type != unix.RTN_UNICAST {
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

// globalAddrs returns a link's addresses of universe scope.
func (s *netState) globalAddrs(idx int) []netlink.Addr {
	var out []netlink.Addr
	for _, a := range s.addrs[idx] {
		if a.Scope == unix.RT_SCOPE_UNIVERSE {
			out = append(out, a)
		}
	}
	return out
}

// onLink reports whether gw is covered by a connected prefix or a link route
// on the interface.
func (s *netState) onLink(idx int, gw net.IP) bool {
	for _, a := range s.addrs[idx] {
		if a.IPNet != nil && a.IPNet.Contains(gw) {
			return true
		}
	}
	for _, r := range s.routes {
		if r.LinkIndex == idx && r.Dst != nil && r.Gw == nil && r.Dst.Contains(gw) {
			return true
		}
	}
	return false
}

// routesVia counts non-default routes that point at a link (a routed CNI
// veth has a /32 host route through it).
func (s *netState) routesVia(idx int) int {
	n := 0
	for _, r := range s.routes {
		if r.LinkIndex != idx || isDefault(r) {
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

func carrier(l netlink.Link) bool {
	return l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
}

func adminUp(l netlink.Link) bool {
	return l.Attrs().Flags&net.FlagUp != 0
}

func ipv4Of(addrs []netlink.Addr) []string {
	var out []string
	for _, a := range addrs {
		if a.IP.To4() != nil {
			out = append(out, a.IPNet.String())
		}
	}
	return out
}

func addrStrings(addrs []netlink.Addr) []string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, a.IPNet.String())
	}
	return out
}

func toAddr(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// sysfsValue reads /sys/class/net/<ifname>/<attr> (for the current network
// namespace's sysfs).
func sysfsValue(ifname, attr string) string {
	b, err := os.ReadFile(filepath.Join("/sys/class/net", ifname, attr))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// devType is udev's DEVTYPE from the link's uevent, empty if none.
func devType(ifname string) string {
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

// Package forwardclient is the laptop side of port forwarding: local TCP and
// UDP listeners whose connections and datagrams are carried to ports in a
// workspace through a Dialer (the tailnet, in the real program).
package forwardclient

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/agentd/agent/protocol"
)

// maxRange bounds one port range, so a typo such as 1-65535 does not open
// tens of thousands of sockets.
const maxRange = 1024

// Mapping is one local port carried to one workspace port.
type Mapping struct {
	// Network is "tcp" or "udp".
	Network string
	// Bind is the local address to listen on; the zero Addr means the
	// forwarder's default (loopback).
	Bind netip.Addr
	// Local is the local port; 0 lets the system choose one.
	Local uint16
	// Remote is the workspace port.
	Remote uint16
}

func (m Mapping) String() string {
	local := strconv.Itoa(int(m.Local))
	if m.Bind.IsValid() {
		local = netip.AddrPortFrom(m.Bind, m.Local).String()
	}
	return fmt.Sprintf("%s %s:%d", m.Network, local, m.Remote)
}

const mappingForms = "use LOCAL:REMOTE, PORT, a range like 8000-8010, or ADDRESS:LOCAL:REMOTE"

// ParseMappings reads port-forward specifications for one network ("tcp" or
// "udp"). Accepted forms: "5432" (same port both sides), "8080:3000" (local
// 8080 to workspace 3000), "8000-8010" and "8000-8010:9000-9010" (ranges of
// equal length), "127.0.0.1:9000:9000", "[::1]:9000:9000", and
// "127.0.0.1:9000" (an address and one port for both sides).
func ParseMappings(network string, specs []string) ([]Mapping, error) {
	if network != "tcp" && network != "udp" {
		return nil, fmt.Errorf("unknown network %q: use tcp or udp", network)
	}
	var out []Mapping
	for _, spec := range specs {
		ms, err := parseMapping(network, spec)
		if err != nil {
			return nil, fmt.Errorf("invalid %s mapping %q: %w", network, spec, err)
		}
		out = append(out, ms...)
	}
	return out, nil
}

func parseMapping(network, spec string) ([]Mapping, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return nil, fmt.Errorf("empty; %s", mappingForms)
	}
	var bind netip.Addr
	rest := spec
	if strings.HasPrefix(spec, "[") {
		end := strings.Index(spec, "]")
		if end < 0 || !strings.HasPrefix(spec[end+1:], ":") {
			return nil, fmt.Errorf("an IPv6 address must look like [::1]:LOCAL:REMOTE")
		}
		a, err := netip.ParseAddr(spec[1:end])
		if err != nil || !a.Is6() {
			return nil, fmt.Errorf("%q is not an IPv6 address", spec[1:end])
		}
		bind, rest = a, spec[end+2:]
	} else if parts := strings.Split(spec, ":"); len(parts) == 3 {
		a, err := netip.ParseAddr(parts[0])
		if err != nil {
			return nil, fmt.Errorf("%q is not an IP address", parts[0])
		}
		bind, rest = a, parts[1]+":"+parts[2]
	} else if len(parts) == 2 && strings.Contains(parts[0], ".") {
		a, err := netip.ParseAddr(parts[0])
		if err != nil {
			return nil, fmt.Errorf("%q is not an IP address", parts[0])
		}
		bind, rest = a, parts[1]
	} else if len(parts) > 3 {
		return nil, fmt.Errorf("too many colons; write IPv6 addresses in brackets; %s", mappingForms)
	}

	localSpec, remoteSpec, twoSided := strings.Cut(rest, ":")
	if !twoSided {
		remoteSpec = localSpec
	}
	if strings.Contains(remoteSpec, ":") {
		return nil, fmt.Errorf("too many colons; %s", mappingForms)
	}
	lo, lhi, err := parseRange(localSpec, true)
	if err != nil {
		return nil, err
	}
	ro, rhi, err := parseRange(remoteSpec, false)
	if err != nil {
		return nil, err
	}
	if lhi-lo != rhi-ro {
		return nil, fmt.Errorf("local range %s has %d ports but workspace range %s has %d", localSpec, lhi-lo+1, remoteSpec, rhi-ro+1)
	}
	if lo == 0 && lhi != 0 {
		return nil, fmt.Errorf("local port 0 (any free port) cannot start a range")
	}
	out := make([]Mapping, 0, rhi-ro+1)
	for i := 0; i <= rhi-ro; i++ {
		local := lo + i
		if lo == 0 {
			local = 0
		}
		out = append(out, Mapping{Network: network, Bind: bind, Local: uint16(local), Remote: uint16(ro + i)})
	}
	return out, nil
}

// parseRange reads "N" or "A-B". Local ports may be 0 (any free port);
// workspace ports 1-9 belong to the agent.
func parseRange(s string, local bool) (lo, hi int, err error) {
	a, b, isRange := strings.Cut(s, "-")
	lo, err = parsePort(a, local)
	if err != nil {
		return 0, 0, err
	}
	hi = lo
	if isRange {
		if hi, err = parsePort(b, local); err != nil {
			return 0, 0, err
		}
		if hi < lo {
			return 0, 0, fmt.Errorf("range %s runs backwards; write the lower port first", s)
		}
		if hi-lo+1 > maxRange {
			return 0, 0, fmt.Errorf("range %s has %d ports; at most %d per range", s, hi-lo+1, maxRange)
		}
	}
	if !local {
		if lo <= protocol.ReservedPorts {
			return 0, 0, fmt.Errorf("workspace ports 1-%d belong to the agent and cannot be forwarded (got %d)", protocol.ReservedPorts, lo)
		}
	}
	return lo, hi, nil
}

func parsePort(s string, allowZero bool) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 65535 || (n == 0 && !allowZero) {
		return 0, fmt.Errorf("port %q is not a number from 1 to 65535; %s", s, mappingForms)
	}
	return n, nil
}

// hostPort formats a listening address for messages.
func hostPort(a netip.Addr, port uint16) string {
	return net.JoinHostPort(a.String(), strconv.Itoa(int(port)))
}

package tailnet

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"tailscale.com/tailcfg"
)

// DefaultRegionID is the region ID the coordinator's embedded relay uses.
// Custom (non-Tailscale) regions conventionally start at 900.
const DefaultRegionID = 900

// DERPMap lists the relay regions a node may use. It is our own JSON-friendly
// shape of Tailscale's DERP map, so the coordinator can serve it and peers can
// store it without importing tailscale.com.
type DERPMap struct {
	Regions []DERPRegion `json:"regions"`
}

// DERPRegion is one relay region: one or more relay nodes that share a
// packet-forwarding mesh.
type DERPRegion struct {
	ID    int        `json:"id"`
	Code  string     `json:"code"`
	Name  string     `json:"name"`
	Nodes []DERPNode `json:"nodes"`
}

// DERPNode is one relay server.
type DERPNode struct {
	Name string `json:"name"`
	// HostName is the DNS name used for dialing and for TLS SNI.
	HostName string `json:"host_name"`
	// IPv4 and IPv6 are optional literal addresses that skip DNS; "none"
	// disables that address family for this node.
	IPv4 string `json:"ipv4,omitempty"`
	IPv6 string `json:"ipv6,omitempty"`
	// DERPPort is the HTTPS port; 0 means 443.
	DERPPort int `json:"derp_port,omitempty"`
	// STUNPort is the UDP STUN port; 0 means 3478, -1 disables STUN.
	STUNPort int `json:"stun_port,omitempty"`
	// STUNPort2 is a second STUN port on the same host, 0 for none. Only
	// standalone network checks (Netcheck) use it: answers from two
	// ports tell whether a NAT keeps one public port for every
	// destination. Older clients ignore the field.
	STUNPort2 int `json:"stun_port2,omitempty"`
	// CertFingerprint, if set, is the hex SHA-256 of the server's DER
	// certificate. The client then accepts exactly that certificate (a
	// self-signed one, typically) instead of verifying a CA chain.
	CertFingerprint string `json:"cert_fingerprint,omitempty"`
	// InsecureForTests skips TLS verification. Tests only.
	InsecureForTests bool `json:"insecure_for_tests,omitempty"`
}

// CertFingerprint returns the fingerprint DERPNode.CertFingerprint expects
// for a DER-encoded certificate.
func CertFingerprint(derCert []byte) string {
	sum := sha256.Sum256(derCert)
	return hex.EncodeToString(sum[:])
}

// CoordinatorDERPMap builds the map for a coordinator that embeds the relay:
// one region (DefaultRegionID) with one node at hostPort, answering STUN on
// stunPort (-1: none), whose self-signed certificate has the given
// fingerprint (empty: verify the chain with the system roots as usual).
func CoordinatorDERPMap(hostPort string, stunPort int, certFingerprint string) (*DERPMap, error) {
	host, portStr, err := net.SplitHostPort(hostPort)
	if err != nil {
		return nil, fmt.Errorf("coordinator address %q: want host:port: %w", hostPort, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port <= 0 || port > 65535 {
		return nil, fmt.Errorf("coordinator address %q: port %q is not a number in 1-65535", hostPort, portStr)
	}
	node := relayNode(fmt.Sprintf("%da", DefaultRegionID), host, port, stunPort, certFingerprint)
	m := &DERPMap{Regions: []DERPRegion{{
		ID:    DefaultRegionID,
		Code:  "coord",
		Name:  "Coordinator",
		Nodes: []DERPNode{node},
	}}}
	return m, m.Validate()
}

func relayNode(name, host string, port, stunPort int, certFingerprint string) DERPNode {
	node := DERPNode{
		Name:            name,
		HostName:        host,
		DERPPort:        port,
		STUNPort:        stunPort,
		CertFingerprint: certFingerprint,
	}
	// A literal address skips DNS and pins the family; the other family is
	// switched off so the client does not try to resolve an IP as a name.
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Is4() {
			node.IPv4, node.IPv6 = ip.String(), "none"
		} else {
			node.IPv4, node.IPv6 = "none", ip.String()
		}
	}
	return node
}

// AddRelay appends to the coordinator's region (DefaultRegionID) a node
// named name for the relay at baseURL ("https://host[:port]") with the
// given certificate fingerprint, unless a node there already has that
// host and port. The nodes of a region are tried in order, so a peer
// whose relay stops moves to the next one; the relays must be meshed.
// Such a node answers no STUN: its port is not known here.
func (m *DERPMap) AddRelay(name, baseURL, certFingerprint string) error {
	u, err := url.Parse(baseURL)
	if err != nil || u.Hostname() == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return fmt.Errorf("relay URL %q: want https://host[:port]", baseURL)
	}
	port := 443
	if u.Scheme == "http" {
		port = 80
	}
	if p := u.Port(); p != "" {
		port, err = strconv.Atoi(p)
		if err != nil || port <= 0 || port > 65535 {
			return fmt.Errorf("relay URL %q: port %q is not a number in 1-65535", baseURL, p)
		}
	}
	var region *DERPRegion
	for i := range m.Regions {
		if m.Regions[i].ID == DefaultRegionID {
			region = &m.Regions[i]
		}
	}
	if region == nil {
		return fmt.Errorf("DERP map has no region %d to add relay %q to", DefaultRegionID, baseURL)
	}
	host := u.Hostname()
	for _, n := range region.Nodes {
		if strings.EqualFold(n.HostName, host) && n.DERPPort == port {
			return nil
		}
	}
	region.Nodes = append(region.Nodes, relayNode(name, host, port, -1, certFingerprint))
	return nil
}

// keepWorkingRegions returns m, except that a region whose first node is
// unchanged since old keeps old's definition. Magicsock closes the
// connection to any region whose definition changes at all, and replica
// churn changes only the fallback nodes listed after the first: taking
// them would drop a working relay connection (seconds without relayed
// traffic) for nodes used only once the first one fails. The fallbacks
// of old then stay in use until the first node changes.
func (m *DERPMap) keepWorkingRegions(old *DERPMap) *DERPMap {
	out := m.Clone()
	if old == nil {
		return out
	}
	for i, r := range out.Regions {
		for _, o := range old.Regions {
			if o.ID == r.ID && o.Code == r.Code && o.Name == r.Name &&
				len(o.Nodes) > 0 && len(r.Nodes) > 0 && o.Nodes[0] == r.Nodes[0] {
				o.Nodes = slices.Clone(o.Nodes)
				out.Regions[i] = o
			}
		}
	}
	return out
}

// Validate reports the first problem that would make the map unusable.
func (m *DERPMap) Validate() error {
	if m == nil || len(m.Regions) == 0 {
		return errors.New("DERP map has no regions")
	}
	seen := map[int]bool{}
	for _, r := range m.Regions {
		if r.ID <= 0 {
			return fmt.Errorf("DERP region %q: id %d must be positive", r.Code, r.ID)
		}
		if seen[r.ID] {
			return fmt.Errorf("DERP region id %d appears twice", r.ID)
		}
		seen[r.ID] = true
		if r.Code == "" {
			return fmt.Errorf("DERP region %d has no code", r.ID)
		}
		if len(r.Nodes) == 0 {
			return fmt.Errorf("DERP region %d (%s) has no nodes", r.ID, r.Code)
		}
		for _, n := range r.Nodes {
			if n.HostName == "" {
				return fmt.Errorf("DERP region %d node %q has no host name", r.ID, n.Name)
			}
			if n.DERPPort < 0 || n.DERPPort > 65535 {
				return fmt.Errorf("DERP region %d node %q: port %d out of range", r.ID, n.Name, n.DERPPort)
			}
			if n.STUNPort < -1 || n.STUNPort > 65535 {
				return fmt.Errorf("DERP region %d node %q: STUN port %d out of range", r.ID, n.Name, n.STUNPort)
			}
			if n.STUNPort2 < 0 || n.STUNPort2 > 65535 || (n.STUNPort2 != 0 && n.STUNPort2 == n.STUNPort) {
				return fmt.Errorf("DERP region %d node %q: second STUN port %d must be 1-65535 and differ from the first", r.ID, n.Name, n.STUNPort2)
			}
			if fp := n.CertFingerprint; fp != "" {
				if b, err := hex.DecodeString(fp); err != nil || len(b) != sha256.Size {
					return fmt.Errorf("DERP region %d node %q: cert fingerprint must be 64 hex digits (sha256 of the DER certificate)", r.ID, n.Name)
				}
			}
			for _, ip := range []string{n.IPv4, n.IPv6} {
				if ip == "" || ip == "none" {
					continue
				}
				if _, err := netip.ParseAddr(ip); err != nil {
					return fmt.Errorf("DERP region %d node %q: %q is not an IP address", r.ID, n.Name, ip)
				}
			}
		}
	}
	return nil
}

// Clone returns a deep copy.
func (m *DERPMap) Clone() *DERPMap {
	if m == nil {
		return nil
	}
	c := &DERPMap{Regions: make([]DERPRegion, len(m.Regions))}
	for i, r := range m.Regions {
		r.Nodes = append([]DERPNode(nil), r.Nodes...)
		c.Regions[i] = r
	}
	return c
}

// regionCode returns the code of region id, or "" if unknown.
func (m *DERPMap) regionCode(id int) string {
	if m == nil {
		return ""
	}
	for _, r := range m.Regions {
		if r.ID == id {
			return r.Code
		}
	}
	return ""
}

// secondSTUNRegionBase offsets the IDs of the STUN-only regions that
// withSecondSTUN adds; they never leave a standalone network check.
const secondSTUNRegionBase = 1 << 20

// withSecondSTUN is toTailcfg plus, for each node with a second STUN port,
// a STUN-only region (to be avoided as home) probing that port, so that a
// network check gets two answers and can tell the NAT's mapping.
func (m *DERPMap) withSecondSTUN() *tailcfg.DERPMap {
	dm := m.toTailcfg()
	for _, r := range m.Regions {
		for i, n := range r.Nodes {
			if n.STUNPort2 == 0 || n.STUNPort < 0 {
				continue
			}
			id := secondSTUNRegionBase + r.ID*16 + i
			dm.Regions[id] = &tailcfg.DERPRegion{
				RegionID: id, RegionCode: r.Code + "-stun2", RegionName: r.Name + " (second STUN port)", Avoid: true,
				Nodes: []*tailcfg.DERPNode{{
					Name: fmt.Sprintf("%d-stun2", id), RegionID: id, HostName: n.HostName,
					IPv4: n.IPv4, IPv6: n.IPv6, STUNPort: n.STUNPort2, STUNOnly: true,
				}},
			}
		}
	}
	return dm
}

// toTailcfg converts the map to Tailscale's type.
func (m *DERPMap) toTailcfg() *tailcfg.DERPMap {
	dm := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{}}
	if m == nil {
		return dm
	}
	for _, r := range m.Regions {
		reg := &tailcfg.DERPRegion{RegionID: r.ID, RegionCode: r.Code, RegionName: r.Name}
		for i, n := range r.Nodes {
			name := n.Name
			if name == "" {
				name = fmt.Sprintf("%d%c", r.ID, 'a'+i%26)
			}
			tn := &tailcfg.DERPNode{
				Name:             name,
				RegionID:         r.ID,
				HostName:         n.HostName,
				IPv4:             n.IPv4,
				IPv6:             n.IPv6,
				DERPPort:         n.DERPPort,
				STUNPort:         n.STUNPort,
				InsecureForTests: n.InsecureForTests,
			}
			if n.CertFingerprint != "" {
				tn.CertName = "sha256-raw:" + strings.ToLower(n.CertFingerprint)
			}
			reg.Nodes = append(reg.Nodes, tn)
		}
		dm.Regions[r.ID] = reg
	}
	return dm
}

package protocol

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/agentd/agent/tailnet"
)

// ValidAgentName checks an agent name: a DNS label (lowercase letters,
// digits and '-', not starting or ending with '-', 1-63 characters), so it
// can appear in host names such as an SSH config alias.
func ValidAgentName(name string) error {
	if err := validName(name, false); err != nil {
		return fmt.Errorf("agent name %q: %w", name, err)
	}
	return nil
}

// ValidUserName checks a user name: like an agent name, but '.' and '_' are
// allowed as well (e.g. "jane.doe").
func ValidUserName(name string) error {
	if err := validName(name, true); err != nil {
		return fmt.Errorf("user name %q: %w", name, err)
	}
	return nil
}

func validName(name string, userPunct bool) error {
	if name == "" {
		return errors.New("is empty")
	}
	if len(name) > MaxNameLength {
		return fmt.Errorf("is longer than %d characters", MaxNameLength)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		punct := c == '-' || userPunct && (c == '.' || c == '_')
		switch {
		case alnum:
		case punct && i > 0 && i < len(name)-1:
		case punct:
			return errors.New("must start and end with a lowercase letter or digit")
		default:
			return fmt.Errorf("contains %q; use lowercase letters, digits and '-'", c)
		}
	}
	return nil
}

// TailnetPrefix is the unique-local /48 every tailnet address lives in.
// Agents live in its :a::/64, clients in its :c::/64; the low 64 bits are the
// node ID, so an agent's address follows from its stable ID.
func TailnetPrefix() netip.Prefix {
	return netip.MustParsePrefix("fd5e:a9e1:7c3b::/48")
}

const (
	agentSubnet  = 0xa
	clientSubnet = 0xc
)

// AgentAddress is the stable tailnet address of the agent with this ID.
func AgentAddress(id tailnet.NodeID) netip.Prefix { return nodeAddress(agentSubnet, id) }

// ClientAddress is the tailnet address of a client session with this ID.
func ClientAddress(id tailnet.NodeID) netip.Prefix { return nodeAddress(clientSubnet, id) }

// IsAgentAddress reports whether a is in the agents' part of the tailnet.
func IsAgentAddress(a netip.Addr) bool { return subnetOf(a) == agentSubnet }

// IsClientAddress reports whether a is in the clients' part of the tailnet.
func IsClientAddress(a netip.Addr) bool { return subnetOf(a) == clientSubnet }

func nodeAddress(subnet uint16, id tailnet.NodeID) netip.Prefix {
	b := TailnetPrefix().Addr().As16()
	b[6], b[7] = byte(subnet>>8), byte(subnet)
	for i := 0; i < 8; i++ {
		b[15-i] = byte(uint64(id) >> (8 * i))
	}
	return netip.PrefixFrom(netip.AddrFrom16(b), 128)
}

func subnetOf(a netip.Addr) int {
	if !a.Is6() || !TailnetPrefix().Contains(a) {
		return -1
	}
	b := a.As16()
	return int(b[6])<<8 | int(b[7])
}

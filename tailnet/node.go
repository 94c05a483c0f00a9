// Package tailnet is the project's only door to tailscale.com: a userspace
// WireGuard engine (magicsock + gVisor netstack, no TUN, no root), the node
// description peers exchange through the coordinator, and the DERP and STUN
// servers the coordinator embeds. Nothing outside this package imports
// tailscale.com, so a change of Tailscale's internals changes one folder.
package tailnet

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"tailscale.com/types/key"
)

// NodeID identifies a node on the tailnet. The coordinator assigns it; it is
// stable for an agent across restarts and never zero.
type NodeID uint64

// Node is what one peer must know about another to reach it: the keys, the
// tailnet addresses, the UDP endpoints it can be reached on directly, and the
// DERP region it is connected to for relaying and disco. It is the payload
// the coordinator relays, so it carries only plain, JSON-friendly types.
type Node struct {
	ID NodeID `json:"id"`
	// Key is the WireGuard public key, "nodekey:<hex>".
	Key string `json:"key"`
	// DiscoKey is the disco public key, "discokey:<hex>". It changes on every
	// restart of the peer's engine.
	DiscoKey string `json:"disco"`
	// Addresses are the node's tailnet addresses, as single-host prefixes.
	Addresses []netip.Prefix `json:"addresses"`
	// Endpoints are UDP addresses where the node may be reached directly.
	Endpoints []netip.AddrPort `json:"endpoints,omitempty"`
	// HomeDERP is the DERP region the node is connected to; 0 until known.
	HomeDERP int `json:"home_derp"`
	// AsOf is when the node last changed, by the sender's clock.
	AsOf time.Time `json:"as_of"`
}

// Limits on a node description, so that a peer cannot make us hold or relay
// an unbounded amount of data.
const (
	MaxNodeAddresses = 8
	MaxNodeEndpoints = 64
)

// Validate reports whether the node can be handed to the engine. A node that
// fails here would be silently ignored by magicsock, so we refuse it loudly.
func (n *Node) Validate() error {
	if n.ID == 0 {
		return errors.New("node id is zero")
	}
	var nk key.NodePublic
	if err := nk.UnmarshalText([]byte(n.Key)); err != nil {
		return fmt.Errorf("node key %q: %w", n.Key, err)
	}
	if nk.IsZero() {
		return errors.New("node key is zero")
	}
	var dk key.DiscoPublic
	if err := dk.UnmarshalText([]byte(n.DiscoKey)); err != nil {
		return fmt.Errorf("disco key %q: %w", n.DiscoKey, err)
	}
	if dk.IsZero() {
		return errors.New("disco key is zero")
	}
	if len(n.Addresses) == 0 {
		return errors.New("node has no tailnet address")
	}
	if len(n.Addresses) > MaxNodeAddresses {
		return fmt.Errorf("node has %d addresses, at most %d allowed", len(n.Addresses), MaxNodeAddresses)
	}
	for _, p := range n.Addresses {
		if !p.IsValid() || !p.IsSingleIP() {
			return fmt.Errorf("tailnet address %v is not a single-host prefix", p)
		}
	}
	if len(n.Endpoints) > MaxNodeEndpoints {
		return fmt.Errorf("node has %d endpoints, at most %d allowed", len(n.Endpoints), MaxNodeEndpoints)
	}
	for _, ep := range n.Endpoints {
		if !ep.IsValid() {
			return fmt.Errorf("endpoint %v is not a valid address and port", ep)
		}
	}
	if n.HomeDERP < 0 {
		return fmt.Errorf("home DERP region %d is negative", n.HomeDERP)
	}
	return nil
}

// Clone returns a deep copy, so that a node can be handed to another
// goroutine without sharing its slices.
func (n *Node) Clone() *Node {
	if n == nil {
		return nil
	}
	c := *n
	c.Addresses = append([]netip.Prefix(nil), n.Addresses...)
	c.Endpoints = append([]netip.AddrPort(nil), n.Endpoints...)
	return &c
}

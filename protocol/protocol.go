// Package protocol defines the messages peers and the coordinator exchange
// over the coordination WebSocket: JSON text frames, one message per frame,
// strictly decoded. Agents publish their node; clients ask for tunnels to
// agents by name; the coordinator relays nodes only between the two ends of a
// tunnel. docs/protocol.md is the reference for every message and rule.
package protocol

import (
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/agentd/agent/tailnet"
)

// Version is the newest protocol version this package speaks. Every message
// carries its connection's version in "v". Any change a peer of the previous
// version could not decode (a new message type, a new or renamed field) needs
// a new version, and with it a new WebSocket subprotocol name.
//
// Version 2 added the agent's network verdict: the network_status message and
// the network and offline fields of tunnel_status. Version 3 added the
// agent's proof of identity in its hello (PeerHello.Identity).
const Version = 3

// MinVersion is the oldest version this package still speaks, so that
// agents and clients of the previous release keep working with a newer
// coordinator and the other way round.
const MinVersion = 1

// Subprotocol is the WebSocket subprotocol naming the newest version.
const Subprotocol = subprotocolPrefix + "3"

const subprotocolPrefix = "agentd-coordinate.v"

// Subprotocols lists the subprotocols of every version spoken, newest
// first: what a peer offers when dialing and what the coordinator accepts.
func Subprotocols() []string {
	out := make([]string, 0, Version-MinVersion+1)
	for v := Version; v >= MinVersion; v-- {
		out = append(out, SubprotocolFor(v))
	}
	return out
}

// SubprotocolFor names version v's subprotocol.
func SubprotocolFor(v int) string { return subprotocolPrefix + strconv.Itoa(v) }

// VersionOf returns the version a subprotocol names, or 0 when it names
// none this package speaks.
func VersionOf(subprotocol string) int {
	n, ok := strings.CutPrefix(subprotocol, subprotocolPrefix)
	if !ok {
		return 0
	}
	v, err := strconv.Atoi(n)
	if err != nil || v < MinVersion || v > Version || SubprotocolFor(v) != subprotocol {
		return 0
	}
	return v
}

// CoordinatePath is the HTTP path of the coordination WebSocket.
const CoordinatePath = "/api/v1/coordinate"

// RoleHeader is the HTTP request header in which a peer says which role it
// means to take (RoleAgent or RoleClient). The coordinator refuses a token
// of the other kind with CodeWrongRole before the WebSocket upgrade, so an
// agent token pasted into a user command cannot take the agent's place.
// Peers that send no header get the role of their token.
const RoleHeader = "Agentd-Role"

// ChallengeHeader is the HTTP response header of the WebSocket upgrade
// carrying a fresh random challenge (base64) that an agent signs with its
// SSH host key in its hello (version 3), proving the identity the
// coordinator pinned.
const ChallengeHeader = "Agentd-Challenge"

// IdentityMessage is what an agent signs to prove its identity: a fixed
// context string and the connection's challenge, so a signature is good for
// that connection only.
func IdentityMessage(challenge string) []byte {
	return []byte("agentd identity v1\x00" + challenge)
}

// HostKeyPath answers, for a user token that may reach the agent, the SSH
// host key the coordinator vouches for: GET HostKeyPath?agent=NAME gives
// HostKeyAnswer.
const HostKeyPath = "/api/v1/host-key"

// HostKeyAnswer is the JSON answer of HostKeyPath.
type HostKeyAnswer struct {
	Agent string `json:"agent"`
	// HostKey is the agent's SSH public key in authorized_keys format
	// ("ssh-ed25519 AAAA..."), empty while no agent has proved one.
	HostKey string `json:"host_key"`
}

// WhoAmIPath answers, for a bearer token, who the token belongs to. It lets a
// client check a token without joining the tailnet.
const WhoAmIPath = "/api/v1/whoami"

// Limits.
const (
	// MaxMessageSize is the largest frame either side accepts.
	MaxMessageSize = 64 << 10
	// MaxNameLength bounds agent and user names.
	MaxNameLength = 63
	// MaxSoftwareLength bounds the free-form software string in a peer's hello.
	MaxSoftwareLength = 128
	// MaxResumeTokenLength bounds the opaque resume token.
	MaxResumeTokenLength = 512
	// MaxErrorTextLength bounds an error's human text.
	MaxErrorTextLength = 1024
)

// Type names a message.
type Type string

// Messages a peer sends to the coordinator.
const (
	// TypeHello is the first message in both directions.
	TypeHello Type = "hello"
	// TypeNode publishes or updates the sender's own node.
	TypeNode Type = "node"
	// TypeTunnel asks for a tunnel to an agent (clients only).
	TypeTunnel Type = "tunnel"
	// TypeUntunnel removes a tunnel (clients only).
	TypeUntunnel Type = "untunnel"
	// TypeDisconnect announces a graceful departure: peers are told
	// "disconnected" instead of "lost".
	TypeDisconnect Type = "disconnect"
	// TypeNetworkStatus reports the agent's network self-check verdict
	// (agents only, version 2).
	TypeNetworkStatus Type = "network_status"
)

// Messages the coordinator sends to a peer (TypeHello as well).
const (
	// TypePeer carries a peer's current node.
	TypePeer Type = "peer"
	// TypePeerGone says a peer is no longer reachable through the coordinator.
	TypePeerGone Type = "peer_gone"
	// TypeTunnelStatus answers a tunnel request that was granted.
	TypeTunnelStatus Type = "tunnel_status"
	// TypeError reports a problem with the peer's last message or session.
	TypeError Type = "error"
)

// Role is what a peer is, decided by its token.
type Role string

const (
	RoleAgent  Role = "agent"
	RoleClient Role = "client"
)

// WhoAmI is the JSON answer of WhoAmIPath.
type WhoAmI struct {
	Role    Role           `json:"role"`
	Name    string         `json:"name"`
	User    string         `json:"user"`
	TokenID string         `json:"token_id"`
	Expires time.Time      `json:"expires,omitzero"`
	NodeID  tailnet.NodeID `json:"node_id,omitempty"`
}

// PeerHello is the first message a peer sends.
type PeerHello struct {
	// Software names the sender's program and version, for the logs.
	Software string `json:"software,omitempty"`
	// ResumeToken, from an earlier Hello, asks for the same node ID and
	// addresses as that session had, so that a client keeps its tailnet
	// address across a reconnect. Agents have stable ones anyway.
	ResumeToken string `json:"resume_token,omitempty"`
	// Identity is an agent's proof of its identity (version 3, agents
	// only): the coordinator pins the host key at first registration and
	// refuses a different one, or none, afterwards.
	Identity *AgentIdentity `json:"identity,omitempty"`
}

// AgentIdentity proves that the agent holds the private half of its SSH
// host key.
type AgentIdentity struct {
	// HostKey is the public key in authorized_keys format.
	HostKey string `json:"host_key"`
	// Signature is the SSH signature (wire format, standard base64) of
	// IdentityMessage(challenge) by that key.
	Signature string `json:"signature"`
}

// MaxIdentityLength bounds the host key and the signature of an
// AgentIdentity.
const MaxIdentityLength = 2048

// Hello is the coordinator's first message: who the peer is on the tailnet.
type Hello struct {
	Role Role `json:"role"`
	// NodeID is the ID the peer must put in its node.
	NodeID tailnet.NodeID `json:"node_id"`
	// Addresses are the tailnet addresses the peer must use (single-host
	// IPv6 prefixes inside TailnetPrefix).
	Addresses []netip.Prefix `json:"addresses"`
	// Name is the agent's name (agents) or the user's name (clients).
	Name string `json:"name"`
	// User owns the agent (agents) or is the user (clients).
	User string `json:"user"`
	// DERPMap lists the relays, with the coordinator's own relay addressed by
	// the host the peer used to reach the coordinator.
	DERPMap *tailnet.DERPMap `json:"derp_map"`
	// ResumeToken lets the peer reclaim this node ID and these addresses on
	// its next connection (see PeerHello).
	ResumeToken string `json:"resume_token,omitempty"`
}

// NodeUpdate publishes the sender's node.
type NodeUpdate struct {
	Node tailnet.Node `json:"node"`
}

// TunnelRequest names an agent, in TypeTunnel and TypeUntunnel.
type TunnelRequest struct {
	Agent string `json:"agent"`
}

// TunnelStatus answers a granted tunnel request. The agent's node follows in
// a TypePeer message whenever the agent is (or comes) online.
type TunnelStatus struct {
	Agent     string         `json:"agent"`
	NodeID    tailnet.NodeID `json:"node_id"`
	Addresses []netip.Prefix `json:"addresses"`
	// Online says whether the agent is connected to the coordinator now.
	Online bool `json:"online"`

	// Version 2 only. In version 2 tunnel_status is sent again whenever
	// the agent connects, goes offline or reports a new network verdict.

	// Network is the agent's latest network verdict, kept after the agent
	// goes offline: the last thing it said before it was lost.
	Network *NetworkVerdict `json:"network,omitempty"`
	// OfflineSince is when the agent's connection ended; zero while it is
	// online, or when it has not connected since the coordinator started.
	OfflineSince time.Time `json:"offline_since,omitzero"`
	// OfflineReason is how it ended: GoneLost (the connection broke) or
	// GoneDisconnected (the agent stopped on purpose).
	OfflineReason GoneReason `json:"offline_reason,omitempty"`
}

// Peer is another peer's node, with who it is.
type Peer struct {
	Node tailnet.Node `json:"node"`
	Role Role         `json:"role"`
	// Name is the agent's name, or the user's name for a client.
	Name string `json:"name"`
	User string `json:"user"`
}

// GoneReason says why a peer left.
type GoneReason string

const (
	// GoneDisconnected: the peer said goodbye; forget it.
	GoneDisconnected GoneReason = "disconnected"
	// GoneLost: the peer's connection to the coordinator broke. Its tailnet
	// traffic may still flow; keep it until the data plane says otherwise.
	GoneLost GoneReason = "lost"
	// GoneRevoked: the peer is no longer allowed to reach you (grant or
	// token revoked); forget it now.
	GoneRevoked GoneReason = "revoked"
)

// LostGrace is how long an agent keeps the tunnel of a client reported
// GoneLost. The coordinator remembers lost clients as long, so that an
// access decision about one during its blip still reaches the agents.
const LostGrace = 15 * time.Minute

// PeerGone says a peer left.
type PeerGone struct {
	NodeID tailnet.NodeID `json:"node_id"`
	Name   string         `json:"name"`
	Reason GoneReason     `json:"reason"`
}

// Error reports a problem. Fatal errors are followed by the coordinator
// closing the connection; others (a refused tunnel) leave it open.
type Error struct {
	Code ErrorCode `json:"code"`
	// Message is one line for a human: what is wrong and what to do.
	Message string `json:"message"`
	// Agent names the agent of a refused tunnel request.
	Agent string `json:"agent,omitempty"`
	Fatal bool   `json:"fatal,omitempty"`
}

func (e *Error) Error() string {
	if e.Agent != "" {
		return string(e.Code) + ": " + e.Agent + ": " + e.Message
	}
	return string(e.Code) + ": " + e.Message
}

// ErrorCode classifies an error for programs.
type ErrorCode string

const (
	// Session and message errors (fatal).
	CodeBadMessage        ErrorCode = "bad_message"
	CodeUnexpectedMessage ErrorCode = "unexpected_message"
	CodeMessageTooLarge   ErrorCode = "message_too_large"
	CodeUnsupportedVer    ErrorCode = "unsupported_version"
	CodeNodeRejected      ErrorCode = "node_rejected"
	CodeKeyInUse          ErrorCode = "key_in_use"
	CodeSlowConsumer      ErrorCode = "slow_consumer"
	CodeReplaced          ErrorCode = "replaced"
	CodeInternal          ErrorCode = "internal"
	// Authentication errors (HTTP 401 before the upgrade, or fatal in-band
	// when a token stops being valid during a session). Retrying with the
	// same token cannot succeed.
	CodeTokenMissing ErrorCode = "token_missing"
	CodeTokenInvalid ErrorCode = "token_invalid"
	CodeTokenExpired ErrorCode = "token_expired"
	CodeTokenRevoked ErrorCode = "token_revoked"
	// CodeWrongRole: an agent token used by a client or a user token by an
	// agent (see RoleHeader).
	CodeWrongRole ErrorCode = "token_wrong_role"
	// CodeIdentityMismatch: an agent presented a host key other than the
	// one pinned for its token, or no proof at all once one is pinned.
	// Retrying cannot help until an admin resets the identity.
	CodeIdentityMismatch ErrorCode = "identity_mismatch"
	// Tunnel errors (not fatal).
	CodeNoSuchAgent ErrorCode = "no_such_agent"
	CodeForbidden   ErrorCode = "forbidden"
	// CodeLimitExceeded: a per-session limit (e.g. tunnels) was reached.
	CodeLimitExceeded ErrorCode = "limit_exceeded"
)

// Permanent reports whether reconnecting with the same credentials is
// pointless.
func (c ErrorCode) Permanent() bool {
	switch c {
	case CodeTokenMissing, CodeTokenInvalid, CodeTokenExpired, CodeTokenRevoked, CodeWrongRole, CodeIdentityMismatch, CodeUnsupportedVer:
		return true
	}
	return false
}

// Disconnect is the (empty) body of TypeDisconnect.
type Disconnect struct{}

// PeerMessage is a message from a peer to the coordinator. Exactly the body
// matching Type is set.
type PeerMessage struct {
	V          int            `json:"v"`
	Type       Type           `json:"type"`
	Hello      *PeerHello     `json:"hello,omitempty"`
	Node       *NodeUpdate    `json:"node,omitempty"`
	Tunnel     *TunnelRequest `json:"tunnel,omitempty"`
	Untunnel   *TunnelRequest `json:"untunnel,omitempty"`
	Disconnect *Disconnect    `json:"disconnect,omitempty"`
	// NetworkStatus: version 2 only.
	NetworkStatus *NetworkStatus `json:"network_status,omitempty"`
}

// ServerMessage is a message from the coordinator to a peer. Exactly the
// body matching Type is set.
type ServerMessage struct {
	V            int           `json:"v"`
	Type         Type          `json:"type"`
	Hello        *Hello        `json:"hello,omitempty"`
	Peer         *Peer         `json:"peer,omitempty"`
	PeerGone     *PeerGone     `json:"peer_gone,omitempty"`
	TunnelStatus *TunnelStatus `json:"tunnel_status,omitempty"`
	Error        *Error        `json:"error,omitempty"`
}

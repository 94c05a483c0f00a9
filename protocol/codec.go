package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"unicode"
	"unicode/utf8"
)

// EncodePeer encodes a peer's message for a connection speaking version v,
// stamping the version on a copy: one message may go out on several
// connections at once.
func EncodePeer(v int, m *PeerMessage) ([]byte, error) {
	c := *m
	c.V = v
	if _, err := validatePeer(&c); err != nil {
		return nil, fmt.Errorf("refusing to send invalid %q message: %w", c.Type, err)
	}
	return json.Marshal(&c)
}

// EncodeServer encodes a coordinator's message for a connection speaking
// version v, stamping the version. Fields newer than v must already be left
// out (ServerMessage.ForVersion). The version is stamped on a copy: the
// coordinator fans one message out to many sessions concurrently.
func EncodeServer(v int, m *ServerMessage) ([]byte, error) {
	c := *m
	c.V = v
	if _, err := validateServer(&c); err != nil {
		return nil, fmt.Errorf("refusing to send invalid %q message: %w", c.Type, err)
	}
	return json.Marshal(&c)
}

// DecodePeer strictly decodes a message a peer sent on a connection
// speaking version v: size limit, no unknown fields, no trailing data, the
// connection's version, a type that version knows with exactly its own
// body, and a valid body. The error is ready to send back.
func DecodePeer(v int, data []byte) (*PeerMessage, *Error) {
	var m PeerMessage
	if e := strictUnmarshal(data, &m); e != nil {
		return nil, e
	}
	if e := checkVersion(m.V, v); e != nil {
		return nil, e
	}
	if e, err := validatePeer(&m); err != nil {
		return nil, &Error{Code: e, Message: err.Error(), Fatal: true}
	}
	return &m, nil
}

// DecodeServer strictly decodes a message the coordinator sent on a
// connection speaking version v, with the same rules as DecodePeer.
func DecodeServer(v int, data []byte) (*ServerMessage, *Error) {
	var m ServerMessage
	if e := strictUnmarshal(data, &m); e != nil {
		return nil, e
	}
	if e := checkVersion(m.V, v); e != nil {
		return nil, e
	}
	if e, err := validateServer(&m); err != nil {
		return nil, &Error{Code: e, Message: err.Error(), Fatal: true}
	}
	return &m, nil
}

func strictUnmarshal(data []byte, v any) *Error {
	if len(data) > MaxMessageSize {
		return &Error{Code: CodeMessageTooLarge, Fatal: true,
			Message: fmt.Sprintf("message is %d bytes, the limit is %d", len(data), MaxMessageSize)}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &Error{Code: CodeBadMessage, Message: "not a valid message: " + oneLine(err.Error()), Fatal: true}
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return &Error{Code: CodeBadMessage, Message: "trailing data after the JSON object; send one message per frame", Fatal: true}
	}
	return nil
}

// checkVersion refuses a message whose version is not the connection's.
func checkVersion(got, conn int) *Error {
	if got != conn {
		return &Error{Code: CodeUnsupportedVer, Fatal: true,
			Message: fmt.Sprintf("message of protocol version %d on a connection that agreed on version %d; upgrade the older side", got, conn)}
	}
	return nil
}

// bodies counts the non-nil bodies among ptrs.
func bodies(ptrs ...bool) int {
	n := 0
	for _, set := range ptrs {
		if set {
			n++
		}
	}
	return n
}

func validatePeer(m *PeerMessage) (ErrorCode, error) {
	n := bodies(m.Hello != nil, m.Node != nil, m.Tunnel != nil, m.Untunnel != nil, m.Disconnect != nil, m.NetworkStatus != nil)
	var present bool
	var err error
	switch m.Type {
	case TypeHello:
		present = m.Hello != nil
		if present {
			if m.Hello.Identity != nil && m.V < 3 {
				return CodeBadMessage, fmt.Errorf("hello carries identity, a protocol version 3 field, on a version %d connection", m.V)
			}
			err = m.Hello.validate()
		}
	case TypeNode:
		present = m.Node != nil
		if present {
			err = m.Node.Node.Validate()
		}
	case TypeTunnel:
		present = m.Tunnel != nil
		if present {
			err = ValidAgentName(m.Tunnel.Agent)
		}
	case TypeUntunnel:
		present = m.Untunnel != nil
		if present {
			err = ValidAgentName(m.Untunnel.Agent)
		}
	case TypeDisconnect:
		present = m.Disconnect != nil
	case TypeNetworkStatus:
		if m.V < 2 {
			return CodeBadMessage, fmt.Errorf("message type %q needs protocol version 2, this connection speaks %d", m.Type, m.V)
		}
		present = m.NetworkStatus != nil
		if present {
			err = m.NetworkStatus.validate()
		}
	default:
		return CodeBadMessage, fmt.Errorf("unknown message type %q from a peer", m.Type)
	}
	if !present || n != 1 {
		return CodeBadMessage, fmt.Errorf("a %q message must carry exactly one body, %q", m.Type, m.Type)
	}
	if err != nil {
		if m.Type == TypeNode {
			return CodeNodeRejected, fmt.Errorf("node: %w", err)
		}
		return CodeBadMessage, fmt.Errorf("%s: %w", m.Type, err)
	}
	return "", nil
}

func validateServer(m *ServerMessage) (ErrorCode, error) {
	n := bodies(m.Hello != nil, m.Peer != nil, m.PeerGone != nil, m.TunnelStatus != nil, m.Error != nil)
	var present bool
	var err error
	switch m.Type {
	case TypeHello:
		present = m.Hello != nil
		if present {
			err = m.Hello.validate()
		}
	case TypePeer:
		present = m.Peer != nil
		if present {
			err = m.Peer.validate()
		}
	case TypePeerGone:
		present = m.PeerGone != nil
		if present {
			err = m.PeerGone.validate()
		}
	case TypeTunnelStatus:
		present = m.TunnelStatus != nil
		if present {
			err = m.TunnelStatus.validate()
		}
		if err == nil && present {
			err = checkServerFields(m, m.V)
		}
	case TypeError:
		present = m.Error != nil
		if present {
			err = m.Error.validate()
		}
	default:
		return CodeBadMessage, fmt.Errorf("unknown message type %q from the coordinator", m.Type)
	}
	if !present || n != 1 {
		return CodeBadMessage, fmt.Errorf("a %q message must carry exactly one body, %q", m.Type, m.Type)
	}
	if err != nil {
		return CodeBadMessage, fmt.Errorf("%s: %w", m.Type, err)
	}
	return "", nil
}

func (h *PeerHello) validate() error {
	if len(h.Software) > MaxSoftwareLength {
		return fmt.Errorf("software is %d bytes, at most %d allowed", len(h.Software), MaxSoftwareLength)
	}
	if !printable(h.Software) {
		return errors.New("software contains control characters")
	}
	if len(h.ResumeToken) > MaxResumeTokenLength {
		return fmt.Errorf("resume token is %d bytes, at most %d allowed", len(h.ResumeToken), MaxResumeTokenLength)
	}
	if !printable(h.ResumeToken) {
		return errors.New("resume token contains control characters")
	}
	if id := h.Identity; id != nil {
		if id.HostKey == "" || id.Signature == "" {
			return errors.New("identity needs both host_key and signature")
		}
		if len(id.HostKey) > MaxIdentityLength || len(id.Signature) > MaxIdentityLength {
			return fmt.Errorf("identity fields are at most %d bytes", MaxIdentityLength)
		}
		if !printable(id.HostKey) || !printable(id.Signature) {
			return errors.New("identity contains control characters")
		}
	}
	return nil
}

func (h *Hello) validate() error {
	if err := validRole(h.Role); err != nil {
		return err
	}
	if h.NodeID == 0 {
		return errors.New("node id is zero")
	}
	if err := validAddresses(h.Addresses); err != nil {
		return err
	}
	if err := validNameForRole(h.Role, h.Name); err != nil {
		return err
	}
	if err := ValidUserName(h.User); err != nil {
		return err
	}
	if h.DERPMap == nil {
		return errors.New("no DERP map")
	}
	if err := h.DERPMap.Validate(); err != nil {
		return err
	}
	if len(h.ResumeToken) > MaxResumeTokenLength || !printable(h.ResumeToken) {
		return errors.New("resume token is too long or not printable")
	}
	return nil
}

func (p *Peer) validate() error {
	if err := p.Node.Validate(); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if err := validRole(p.Role); err != nil {
		return err
	}
	if err := validNameForRole(p.Role, p.Name); err != nil {
		return err
	}
	return ValidUserName(p.User)
}

func (g *PeerGone) validate() error {
	if g.NodeID == 0 {
		return errors.New("node id is zero")
	}
	switch g.Reason {
	case GoneDisconnected, GoneLost, GoneRevoked:
	default:
		return fmt.Errorf("unknown reason %q", g.Reason)
	}
	if len(g.Name) > MaxNameLength || !printable(g.Name) {
		return errors.New("name is too long or not printable")
	}
	return nil
}

func (t *TunnelStatus) validate() error {
	if err := ValidAgentName(t.Agent); err != nil {
		return err
	}
	if t.NodeID == 0 {
		return errors.New("node id is zero")
	}
	if err := validAddresses(t.Addresses); err != nil {
		return err
	}
	return t.validateNetwork()
}

func (e *Error) validate() error {
	if e.Code == "" {
		return errors.New("error without a code")
	}
	if len(e.Code) > MaxNameLength || !printable(string(e.Code)) {
		return errors.New("error code is too long or not printable")
	}
	if len(e.Message) > MaxErrorTextLength || !printable(e.Message) {
		return fmt.Errorf("error text is longer than %d bytes or not one printable line", MaxErrorTextLength)
	}
	if e.Agent != "" {
		if err := ValidAgentName(e.Agent); err != nil {
			return err
		}
	}
	return nil
}

func validRole(r Role) error {
	switch r {
	case RoleAgent, RoleClient:
		return nil
	}
	return fmt.Errorf("unknown role %q", r)
}

func validNameForRole(r Role, name string) error {
	if r == RoleAgent {
		return ValidAgentName(name)
	}
	return ValidUserName(name)
}

func validAddresses(addrs []netip.Prefix) error {
	if len(addrs) == 0 {
		return errors.New("no tailnet address")
	}
	if len(addrs) > 8 {
		return fmt.Errorf("%d addresses, at most 8 allowed", len(addrs))
	}
	for _, p := range addrs {
		if !p.IsValid() || !p.IsSingleIP() {
			return fmt.Errorf("address %v is not a single-host prefix", p)
		}
	}
	return nil
}

// printable reports whether s is one line of printable text.
func printable(s string) bool {
	for _, r := range s {
		if !unicode.IsPrint(r) && r != ' ' {
			return false
		}
	}
	return true
}

// oneLine makes s safe to send back as an error text: its first line,
// bounded, with anything unprintable replaced.
func oneLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return strings.Map(func(r rune) rune {
		if r == utf8.RuneError || (!unicode.IsPrint(r) && r != ' ') {
			return '?'
		}
		return r
	}, s)
}

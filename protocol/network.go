package protocol

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Limits of the network verdict (version 2).
const (
	// MaxNetworkSummary bounds a verdict's one-line summary.
	MaxNetworkSummary = 512
	// MaxNetworkCodes bounds the finding codes of one verdict.
	MaxNetworkCodes = 16
	// MaxNetworkCodeLength bounds one finding code.
	MaxNetworkCodeLength = 64
	// MaxNetworkHistory bounds the earlier verdicts one network_status
	// carries.
	MaxNetworkHistory = 16
)

// NetworkHealth is an agent's verdict on its own network.
type NetworkHealth string

const (
	NetworkOK       NetworkHealth = "ok"
	NetworkDegraded NetworkHealth = "degraded"
	NetworkBroken   NetworkHealth = "broken"
)

// NetworkVerdict is one result of an agent's network self-check (agent
// netcheck): its status, the one-line summary and the finding codes
// (docs/netcheck.md lists them).
type NetworkVerdict struct {
	Status  NetworkHealth `json:"status"`
	Summary string        `json:"summary"`
	Codes   []string      `json:"codes,omitempty"`
	// At is when the check behind this verdict ran (the agent's clock).
	At time.Time `json:"at"`
	// Since is when the status last changed to this one.
	Since time.Time `json:"since"`
}

// NetworkStatus is the body of TypeNetworkStatus: the agent's current
// verdict, sent when it changes and again after every reconnect.
type NetworkStatus struct {
	Verdict NetworkVerdict `json:"verdict"`
	// History holds the agent's earlier verdicts, oldest first, sent with
	// the first network_status of each connection. A verdict reached while
	// the agent could not reach the coordinator arrives this way; the
	// coordinator logs those it had not seen.
	History []NetworkVerdict `json:"history,omitempty"`
}

func (s *NetworkStatus) validate() error {
	if err := s.Verdict.validate(); err != nil {
		return err
	}
	if len(s.History) > MaxNetworkHistory {
		return fmt.Errorf("%d history entries, at most %d allowed", len(s.History), MaxNetworkHistory)
	}
	for i := range s.History {
		if err := s.History[i].validate(); err != nil {
			return fmt.Errorf("history[%d]: %w", i, err)
		}
	}
	return nil
}

// Validate checks v against the protocol's rules.
func (v *NetworkVerdict) Validate() error { return v.validate() }

func (v *NetworkVerdict) validate() error {
	switch v.Status {
	case NetworkOK, NetworkDegraded, NetworkBroken:
	default:
		return fmt.Errorf("unknown network status %q; want ok, degraded or broken", v.Status)
	}
	if len(v.Summary) > MaxNetworkSummary {
		return fmt.Errorf("summary is %d bytes, at most %d allowed", len(v.Summary), MaxNetworkSummary)
	}
	if !utf8.ValidString(v.Summary) || !printable(v.Summary) {
		return errors.New("summary is not one printable line")
	}
	if len(v.Codes) > MaxNetworkCodes {
		return fmt.Errorf("%d codes, at most %d allowed", len(v.Codes), MaxNetworkCodes)
	}
	for _, c := range v.Codes {
		if err := validCode(c); err != nil {
			return err
		}
	}
	if v.At.IsZero() {
		return errors.New("verdict without a time (at)")
	}
	if v.Since.IsZero() {
		return errors.New("verdict without a since time")
	}
	return nil
}

// validCode checks a finding code such as "gateway.unreachable".
func validCode(c string) error {
	if c == "" || len(c) > MaxNetworkCodeLength {
		return fmt.Errorf("finding code %q: want 1-%d characters", c, MaxNetworkCodeLength)
	}
	for i := 0; i < len(c); i++ {
		b := c[i]
		if !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || b == '.' || b == '_' || b == '-') {
			return fmt.Errorf("finding code %q: use lowercase letters, digits, '.', '_' and '-'", c)
		}
	}
	return nil
}

// Fit returns v bounded to the protocol's limits: the summary made one
// printable line and cut at MaxNetworkSummary, invalid codes dropped and at
// most MaxNetworkCodes kept. The agent sends what netcheck says; this keeps
// an unusually long finding from costing it the whole message.
func (v NetworkVerdict) Fit() NetworkVerdict {
	s := strings.Map(func(r rune) rune {
		if r == '\n' || r == '\t' || r == '\r' {
			return ' '
		}
		if r == utf8.RuneError || (!unicode.IsPrint(r) && r != ' ') {
			return '?'
		}
		return r
	}, v.Summary)
	if len(s) > MaxNetworkSummary {
		cut := MaxNetworkSummary - len("...")
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "..."
	}
	v.Summary = s
	codes := make([]string, 0, min(len(v.Codes), MaxNetworkCodes))
	for _, c := range v.Codes {
		if len(codes) < MaxNetworkCodes && validCode(c) == nil {
			codes = append(codes, c)
		}
	}
	v.Codes = codes
	if len(v.Codes) == 0 {
		v.Codes = nil
	}
	return v
}

// ForVersion returns m as a peer speaking version v may receive it, with
// the fields newer than v left out.
func (m *ServerMessage) ForVersion(v int) *ServerMessage {
	if v >= 2 || m.TunnelStatus == nil {
		return m
	}
	c := *m
	ts := *m.TunnelStatus
	ts.Network, ts.OfflineSince, ts.OfflineReason = nil, time.Time{}, ""
	c.TunnelStatus = &ts
	return &c
}

// checkServerFields refuses fields newer than version v.
func checkServerFields(m *ServerMessage, v int) error {
	if v >= 2 || m.TunnelStatus == nil {
		return nil
	}
	ts := m.TunnelStatus
	if ts.Network != nil || !ts.OfflineSince.IsZero() || ts.OfflineReason != "" {
		return fmt.Errorf("tunnel_status carries version 2 fields (network, offline_since, offline_reason) on a version %d connection", v)
	}
	return nil
}

func (t *TunnelStatus) validateNetwork() error {
	if t.Network != nil {
		if err := t.Network.validate(); err != nil {
			return fmt.Errorf("network: %w", err)
		}
	}
	switch t.OfflineReason {
	case "":
	case GoneLost, GoneDisconnected:
		if t.Online {
			return errors.New("offline_reason set while online")
		}
	default:
		return fmt.Errorf("unknown offline_reason %q", t.OfflineReason)
	}
	if t.Online && !t.OfflineSince.IsZero() {
		return errors.New("offline_since set while online")
	}
	return nil
}

package coordclient

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/agentd/agent/protocol"
)

// CodeCertificateMismatch is the error code of a pin that does not match.
const CodeCertificateMismatch protocol.ErrorCode = "certificate_mismatch"

// NormalizeFingerprint accepts a certificate fingerprint as people paste it
// ("sha256:", colons, spaces, upper case) and returns 64 lowercase hex
// digits.
func NormalizeFingerprint(fp string) (string, error) {
	s := strings.ToLower(strings.TrimSpace(fp))
	s = strings.TrimPrefix(s, "sha256:")
	s = strings.NewReplacer(":", "", " ", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("fingerprint %q: want the 64 hex digits of a SHA-256 (agent admin info shows it)", fp)
	}
	return s, nil
}

// MismatchError is returned when the server's certificate does not have the
// pinned fingerprint.
type MismatchError struct {
	Got, Want string
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("the coordinator's certificate has fingerprint %s, not the pinned %s; if the certificate was replaced on purpose, get the new fingerprint from an admin (agent admin info) and run agent login again", e.Got, e.Want)
}

// TLSConfig returns the client TLS configuration for a coordinator. With a
// fingerprint, exactly the certificate whose DER encoding has that SHA-256
// is accepted (no CA, no host name check: the pin is stronger); without
// one, the system roots verify the chain as usual.
func TLSConfig(fingerprint string) (*tls.Config, error) {
	// The session cache lets a reconnect resume instead of repeating the
	// full handshake: the coordinator's ticket keys survive its restarts,
	// which matters when all its agents come back at once.
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}, ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	if fingerprint == "" {
		return cfg, nil
	}
	want, err := NormalizeFingerprint(fingerprint)
	if err != nil {
		return nil, err
	}
	wantRaw, _ := hex.DecodeString(want)
	// Verification is replaced, not skipped: VerifyConnection checks the pin
	// on every handshake, including resumed ones.
	cfg.InsecureSkipVerify = true
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("the coordinator sent no certificate")
		}
		sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
		if subtle.ConstantTimeCompare(sum[:], wantRaw) != 1 {
			return &MismatchError{Got: hex.EncodeToString(sum[:]), Want: want}
		}
		return nil
	}
	return cfg, nil
}

// HTTPClient returns an HTTP client for one-shot calls to the coordinator,
// with the same TLS pinning as the coordination connection.
func HTTPClient(fingerprint string) (*http.Client, error) {
	tlsCfg, err := TLSConfig(fingerprint)
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			TLSClientConfig:     tlsCfg,
			TLSHandshakeTimeout: 10 * time.Second,
			ForceAttemptHTTP2:   false,
		},
	}, nil
}

// ParseURL checks a coordinator base URL before any token is sent to it.
// Plain HTTP (http:// or ws://) is refused unless insecureHTTP is set, since
// the token would cross the network in cleartext, and it is always refused
// with a certificate pin, which plain HTTP has no certificate to honour.
// The result has scheme https or http.
func ParseURL(base, fingerprint string, insecureHTTP bool) (*url.URL, error) {
	u, err := url.Parse(strings.TrimSpace(base))
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("coordinator URL %q: want https://host[:port]", base)
	}
	switch u.Scheme {
	case "https", "wss":
		u.Scheme = "https"
	case "http", "ws":
		if fingerprint != "" {
			return nil, fmt.Errorf("coordinator URL %q is plain HTTP but a certificate fingerprint is pinned: a pin needs https://; fix the URL (or drop the pin)", base)
		}
		if !insecureHTTP {
			return nil, fmt.Errorf("coordinator URL %q is plain HTTP: the token would cross the network in cleartext; use https://, or pass --insecure-http (env AGENT_INSECURE_HTTP=1) if you accept that", base)
		}
		u.Scheme = "http"
	default:
		return nil, fmt.Errorf("coordinator URL %q: scheme must be https", base)
	}
	return u, nil
}

// WhoAmI asks the coordinator whom token belongs to, without joining the
// tailnet. A refused token is a *PermanentError. Plain HTTP is refused
// unless insecureHTTP is set (see ParseURL).
func WhoAmI(ctx context.Context, hc *http.Client, baseURL, fingerprint string, insecureHTTP bool, token string) (protocol.WhoAmI, error) {
	u, err := ParseURL(baseURL, fingerprint, insecureHTTP)
	if err != nil {
		return protocol.WhoAmI{}, err
	}
	u.RawQuery, u.Fragment = "", ""
	u.Path = strings.TrimRight(u.Path, "/") + protocol.WhoAmIPath
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return protocol.WhoAmI{}, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := hc.Do(req)
	if err != nil {
		var mm *MismatchError
		if errors.As(err, &mm) {
			return protocol.WhoAmI{}, &PermanentError{Err: &protocol.Error{Code: CodeCertificateMismatch, Message: mm.Error()}}
		}
		return protocol.WhoAmI{}, fmt.Errorf("reaching the coordinator at %s: %w", baseURL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return protocol.WhoAmI{}, fmt.Errorf("reading the coordinator's answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e protocol.Error
		if json.Unmarshal(body, &e) == nil && e.Code != "" {
			if e.Code.Permanent() {
				return protocol.WhoAmI{}, &PermanentError{Err: &e}
			}
			return protocol.WhoAmI{}, fmt.Errorf("the coordinator answered %s: %w", resp.Status, &e)
		}
		return protocol.WhoAmI{}, fmt.Errorf("the coordinator answered %s (is %s really a coordinator?)", resp.Status, baseURL)
	}
	var who protocol.WhoAmI
	if err := json.Unmarshal(body, &who); err != nil {
		return protocol.WhoAmI{}, fmt.Errorf("the coordinator's answer is not valid: %w", err)
	}
	return who, nil
}

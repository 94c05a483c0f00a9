package coordinator

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"time"

	"github.com/agentd/agent/tailnet"
)

// resumeTTL is how long a client may reclaim its node ID after its last
// hello.
const resumeTTL = 24 * time.Hour

// resumeClaims is what a resume token vouches for.
type resumeClaims struct {
	NodeID  tailnet.NodeID `json:"id"`
	User    string         `json:"u"`
	Expires int64          `json:"exp"`
}

// resumeSigner issues and checks resume tokens with a secret kept in the
// store, so tokens survive coordinator restarts.
type resumeSigner struct{ secret []byte }

func (s resumeSigner) issue(id tailnet.NodeID, user string, now time.Time) string {
	payload, _ := json.Marshal(resumeClaims{NodeID: id, User: user, Expires: now.Add(resumeTTL).Unix()})
	p := base64.RawURLEncoding.EncodeToString(payload)
	return p + "." + base64.RawURLEncoding.EncodeToString(s.mac(p))
}

func (s resumeSigner) check(tok, user string, now time.Time) (tailnet.NodeID, error) {
	p, sig, ok := strings.Cut(tok, ".")
	if !ok {
		return 0, errors.New("malformed resume token")
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || !hmac.Equal(got, s.mac(p)) {
		return 0, errors.New("resume token signature does not match")
	}
	payload, err := base64.RawURLEncoding.DecodeString(p)
	if err != nil {
		return 0, errors.New("malformed resume token")
	}
	var c resumeClaims
	if err := json.Unmarshal(payload, &c); err != nil {
		return 0, errors.New("malformed resume token")
	}
	if c.User != user {
		return 0, errors.New("resume token belongs to another user")
	}
	if now.Unix() > c.Expires {
		return 0, errors.New("resume token expired")
	}
	if c.NodeID == 0 {
		return 0, errors.New("resume token has no node id")
	}
	return c.NodeID, nil
}

func (s resumeSigner) mac(p string) []byte {
	m := hmac.New(sha256.New, s.secret)
	m.Write([]byte("agentd resume v1\x00" + p))
	return m.Sum(nil)
}

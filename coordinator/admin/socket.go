package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/agentd/agent/coordinator/store"
)

// request is the body of every admin call.
type request struct {
	Name    string          `json:"name,omitempty"`
	Owner   string          `json:"owner,omitempty"`
	User    string          `json:"user,omitempty"`
	Agent   string          `json:"agent,omitempty"`
	Kind    store.TokenKind `json:"kind,omitempty"`
	Subject string          `json:"subject,omitempty"`
	Expires time.Time       `json:"expires,omitzero"`
	Token   string          `json:"token,omitempty"`
}

// NewHandler serves ops over HTTP. On the admin socket only the socket's
// file mode (0600, in a 0700 directory) guards it: whoever can open it can
// administer the coordinator. Over HTTPS the coordinator puts an admin
// token check in front of it (under HTTPSPrefix).
func NewHandler(ops Ops) http.Handler {
	mux := http.NewServeMux()
	handle := func(path string, fn func(ctx context.Context, r request) (any, error)) {
		mux.HandleFunc("POST "+path, func(w http.ResponseWriter, hr *http.Request) {
			var r request
			dec := json.NewDecoder(io.LimitReader(hr.Body, 64<<10))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&r); err != nil {
				writeJSON(w, http.StatusBadRequest, &remoteError{Kind: "invalid", Message: "bad admin request: " + err.Error()})
				return
			}
			v, err := fn(hr.Context(), r)
			if err != nil {
				status := http.StatusBadRequest
				switch errorKind(err) {
				case "not_found":
					status = http.StatusNotFound
				case "exists":
					status = http.StatusConflict
				}
				writeJSON(w, status, &remoteError{Kind: errorKind(err), Message: err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, v)
		})
	}
	handle("/v1/users/create", func(ctx context.Context, r request) (any, error) { return ops.CreateUser(ctx, r.Name) })
	handle("/v1/users/delete", func(ctx context.Context, r request) (any, error) { return struct{}{}, ops.DeleteUser(ctx, r.Name) })
	handle("/v1/agents/create", func(ctx context.Context, r request) (any, error) { return ops.CreateAgent(ctx, r.Name, r.Owner) })
	handle("/v1/agents/delete", func(ctx context.Context, r request) (any, error) { return struct{}{}, ops.DeleteAgent(ctx, r.Name) })
	handle("/v1/agents/reset-identity", func(ctx context.Context, r request) (any, error) { return struct{}{}, ops.ResetIdentity(ctx, r.Name) })
	handle("/v1/grants/add", func(ctx context.Context, r request) (any, error) { return ops.AddGrant(ctx, r.User, r.Agent) })
	handle("/v1/grants/remove", func(ctx context.Context, r request) (any, error) {
		return struct{}{}, ops.RemoveGrant(ctx, r.User, r.Agent)
	})
	handle("/v1/tokens/create", func(ctx context.Context, r request) (any, error) {
		return ops.CreateToken(ctx, r.Kind, r.Subject, r.Expires)
	})
	handle("/v1/tokens/revoke", func(ctx context.Context, r request) (any, error) { return ops.RevokeToken(ctx, r.Token) })
	handle("/v1/list", func(ctx context.Context, _ request) (any, error) { return ops.List(ctx) })
	handle("/v1/info", func(ctx context.Context, _ request) (any, error) { return ops.Info(ctx) })
	return mux
}

// HTTPSPrefix is where a coordinator serves NewHandler on its HTTPS
// listener, behind an admin token.
const HTTPSPrefix = "/api/admin"

// WriteRefusal answers an admin request that is not allowed (status 401 or
// 403) with msg, in the shape Client reads.
func WriteRefusal(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, &remoteError{Kind: "denied", Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// Client calls a running coordinator's admin API: its unix socket, or its
// HTTPS listener with an admin token.
type Client struct {
	// where names the API in errors: the socket path or the URL.
	where string
	base  string
	token string
	hc    *http.Client
}

// ErrNoCoordinator means nothing listens on the admin socket.
var ErrNoCoordinator = errors.New("no coordinator is listening on the admin socket")

// DialSocket connects to the admin socket at path and checks that a
// coordinator answers. It returns ErrNoCoordinator when the socket is
// missing or stale.
func DialSocket(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("%w (%s): %v", ErrNoCoordinator, path, err)
	}
	conn.Close()
	c := &Client{where: "admin socket " + path, base: "http://coordinator", hc: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		}},
	}}
	return c, nil
}

// NewHTTPSClient calls the admin API of the coordinator at baseURL (any
// replica) with an admin token, over hc (which pins the certificate).
func NewHTTPSClient(baseURL, token string, hc *http.Client) *Client {
	base := strings.TrimRight(baseURL, "/")
	return &Client{where: "coordinator " + base, base: base + HTTPSPrefix, token: token, hc: hc}
}

func (c *Client) call(ctx context.Context, path string, r request, out any) error {
	body, err := json.Marshal(r)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("%s: %w", c.where, err)
	}
	req.Header.Set("Content-Type", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", c.where, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("%s: reading answer: %w", c.where, err)
	}
	if resp.StatusCode != http.StatusOK {
		var re remoteError
		if json.Unmarshal(data, &re) != nil || re.Message == "" {
			if resp.StatusCode == http.StatusNotFound && c.token != "" {
				return fmt.Errorf("%s answered %s: it serves no admin API (is it a coordinator of this version?)", c.where, resp.Status)
			}
			return fmt.Errorf("%s: %s", c.where, resp.Status)
		}
		if re.Kind == "denied" {
			return fmt.Errorf("%s refused: %w", c.where, &re)
		}
		return &re
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s: bad answer: %w", c.where, err)
	}
	return nil
}

func (c *Client) CreateUser(ctx context.Context, name string) (u store.User, err error) {
	err = c.call(ctx, "/v1/users/create", request{Name: name}, &u)
	return u, err
}

func (c *Client) DeleteUser(ctx context.Context, name string) error {
	return c.call(ctx, "/v1/users/delete", request{Name: name}, nil)
}

func (c *Client) CreateAgent(ctx context.Context, name, owner string) (a AgentCreated, err error) {
	err = c.call(ctx, "/v1/agents/create", request{Name: name, Owner: owner}, &a)
	return a, err
}

func (c *Client) DeleteAgent(ctx context.Context, name string) error {
	return c.call(ctx, "/v1/agents/delete", request{Name: name}, nil)
}

func (c *Client) ResetIdentity(ctx context.Context, name string) error {
	return c.call(ctx, "/v1/agents/reset-identity", request{Name: name}, nil)
}

func (c *Client) AddGrant(ctx context.Context, user, agent string) (g store.Grant, err error) {
	err = c.call(ctx, "/v1/grants/add", request{User: user, Agent: agent}, &g)
	return g, err
}

func (c *Client) RemoveGrant(ctx context.Context, user, agent string) error {
	return c.call(ctx, "/v1/grants/remove", request{User: user, Agent: agent}, nil)
}

func (c *Client) CreateToken(ctx context.Context, kind store.TokenKind, subject string, expires time.Time) (t TokenCreated, err error) {
	err = c.call(ctx, "/v1/tokens/create", request{Kind: kind, Subject: subject, Expires: expires}, &t)
	return t, err
}

func (c *Client) RevokeToken(ctx context.Context, idOrSecret string) (t store.Token, err error) {
	err = c.call(ctx, "/v1/tokens/revoke", request{Token: idOrSecret}, &t)
	return t, err
}

func (c *Client) List(ctx context.Context) (s store.Snapshot, err error) {
	err = c.call(ctx, "/v1/list", request{}, &s)
	return s, err
}

func (c *Client) Info(ctx context.Context) (i Info, err error) {
	err = c.call(ctx, "/v1/info", request{}, &i)
	return i, err
}

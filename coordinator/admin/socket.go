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

// NewHandler serves ops over HTTP, for the admin socket. Only the socket's
// file mode (0600, in a 0700 directory) guards it: whoever can open it can
// administer the coordinator.
func NewHandler(ops Ops) http.Handler {
	mux := http.NewServeMux()
	handle := func(path string, fn func(r request) (any, error)) {
		mux.HandleFunc("POST "+path, func(w http.ResponseWriter, hr *http.Request) {
			var r request
			dec := json.NewDecoder(io.LimitReader(hr.Body, 64<<10))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&r); err != nil {
				writeJSON(w, http.StatusBadRequest, &remoteError{Kind: "invalid", Message: "bad admin request: " + err.Error()})
				return
			}
			v, err := fn(r)
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
	handle("/v1/users/create", func(r request) (any, error) { return ops.CreateUser(r.Name) })
	handle("/v1/users/delete", func(r request) (any, error) { return struct{}{}, ops.DeleteUser(r.Name) })
	handle("/v1/agents/create", func(r request) (any, error) { return ops.CreateAgent(r.Name, r.Owner) })
	handle("/v1/agents/delete", func(r request) (any, error) { return struct{}{}, ops.DeleteAgent(r.Name) })
	handle("/v1/agents/reset-identity", func(r request) (any, error) { return struct{}{}, ops.ResetIdentity(r.Name) })
	handle("/v1/grants/add", func(r request) (any, error) { return ops.AddGrant(r.User, r.Agent) })
	handle("/v1/grants/remove", func(r request) (any, error) { return struct{}{}, ops.RemoveGrant(r.User, r.Agent) })
	handle("/v1/tokens/create", func(r request) (any, error) { return ops.CreateToken(r.Kind, r.Subject, r.Expires) })
	handle("/v1/tokens/revoke", func(r request) (any, error) { return ops.RevokeToken(r.Token) })
	handle("/v1/list", func(request) (any, error) { return ops.List() })
	handle("/v1/info", func(request) (any, error) { return ops.Info() })
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// Client calls a running coordinator's admin socket.
type Client struct {
	path string
	hc   *http.Client
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
	c := &Client{path: path, hc: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		}},
	}}
	return c, nil
}

func (c *Client) call(path string, r request, out any) error {
	body, err := json.Marshal(r)
	if err != nil {
		return err
	}
	resp, err := c.hc.Post("http://coordinator"+path, "application/json", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("admin socket %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("admin socket %s: reading answer: %w", c.path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var re remoteError
		if json.Unmarshal(data, &re) != nil || re.Message == "" {
			return fmt.Errorf("admin socket %s: %s", c.path, resp.Status)
		}
		return &re
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("admin socket %s: bad answer: %w", c.path, err)
	}
	return nil
}

func (c *Client) CreateUser(name string) (u store.User, err error) {
	err = c.call("/v1/users/create", request{Name: name}, &u)
	return u, err
}

func (c *Client) DeleteUser(name string) error {
	return c.call("/v1/users/delete", request{Name: name}, nil)
}

func (c *Client) CreateAgent(name, owner string) (a AgentCreated, err error) {
	err = c.call("/v1/agents/create", request{Name: name, Owner: owner}, &a)
	return a, err
}

func (c *Client) DeleteAgent(name string) error {
	return c.call("/v1/agents/delete", request{Name: name}, nil)
}

func (c *Client) ResetIdentity(name string) error {
	return c.call("/v1/agents/reset-identity", request{Name: name}, nil)
}

func (c *Client) AddGrant(user, agent string) (g store.Grant, err error) {
	err = c.call("/v1/grants/add", request{User: user, Agent: agent}, &g)
	return g, err
}

func (c *Client) RemoveGrant(user, agent string) error {
	return c.call("/v1/grants/remove", request{User: user, Agent: agent}, nil)
}

func (c *Client) CreateToken(kind store.TokenKind, subject string, expires time.Time) (t TokenCreated, err error) {
	err = c.call("/v1/tokens/create", request{Kind: kind, Subject: subject, Expires: expires}, &t)
	return t, err
}

func (c *Client) RevokeToken(idOrSecret string) (t store.Token, err error) {
	err = c.call("/v1/tokens/revoke", request{Token: idOrSecret}, &t)
	return t, err
}

func (c *Client) List() (s store.Snapshot, err error) {
	err = c.call("/v1/list", request{}, &s)
	return s, err
}

func (c *Client) Info() (i Info, err error) {
	err = c.call("/v1/info", request{}, &i)
	return i, err
}

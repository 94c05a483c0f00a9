package coordclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/agentd/agent/protocol"
)

// ListWorkspaces asks the coordinator which workspaces the user token may
// reach, with each one's status.
func ListWorkspaces(ctx context.Context, hc *http.Client, baseURL, token string) ([]protocol.WorkspaceInfo, error) {
	u, err := url.Parse(strings.TrimSpace(baseURL))
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, fmt.Errorf("coordinator URL %q: want https://host[:port]", baseURL)
	}
	u.Path = strings.TrimRight(u.Path, "/") + protocol.WorkspacesPath
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := hc.Do(req)
	if err != nil {
		var mm *MismatchError
		if errors.As(err, &mm) {
			return nil, &PermanentError{Err: &protocol.Error{Code: CodeCertificateMismatch, Message: mm.Error()}}
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("%w; last error: %w", context.Cause(ctx), err)
		}
		return nil, fmt.Errorf("waiting for the coordinator at %s: %w", baseURL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("reading the coordinator's answer: %w", err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("the coordinator at %s cannot list workspaces (it predates %s); upgrade it", baseURL, protocol.WorkspacesPath)
	case resp.StatusCode != http.StatusOK:
		var e protocol.Error
		if json.Unmarshal(body, &e) == nil && e.Code != "" {
			if e.Code.Permanent() {
				return nil, &PermanentError{Err: &e}
			}
			return nil, fmt.Errorf("the coordinator answered %s: %w", resp.Status, &e)
		}
		return nil, fmt.Errorf("the coordinator answered %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var ws protocol.Workspaces
	if err := json.Unmarshal(body, &ws); err != nil {
		return nil, fmt.Errorf("the coordinator's workspace list is not valid JSON: %w", err)
	}
	return ws.Workspaces, nil
}

package client

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/agentd/agent/coordinator/coordclient"
	"github.com/agentd/agent/protocol"
)

// VouchedHostKey asks the coordinator for the SSH host key of workspace
// (authorized_keys format): the key its agent proved holding when it
// registered, pinned since its first registration. Empty when the agent
// never proved one (a release older than identity pinning).
func VouchedHostKey(ctx context.Context, cfg coordclient.Config, workspace string) (string, error) {
	hc, err := coordclient.HTTPClient(cfg.Fingerprint)
	if err != nil {
		return "", err
	}
	u, err := url.Parse(strings.TrimSpace(cfg.URL))
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return "", fmt.Errorf("coordinator URL %q: want https://host[:port]", cfg.URL)
	}
	u.Path = strings.TrimRight(u.Path, "/") + protocol.HostKeyPath
	u.RawQuery = url.Values{"agent": {workspace}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+cfg.Token)
	resp, err := hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("asking the coordinator at %s for workspace %q's host key: %w", cfg.URL, workspace, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", fmt.Errorf("reading the coordinator's answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e protocol.Error
		if json.Unmarshal(body, &e) == nil && e.Code != "" {
			return "", fmt.Errorf("workspace %q's host key: %w", workspace, &e)
		}
		return "", fmt.Errorf("the coordinator answered %s to a host key request (is it older than this client?)", resp.Status)
	}
	var a protocol.HostKeyAnswer
	if err := json.Unmarshal(body, &a); err != nil {
		return "", fmt.Errorf("the coordinator's host key answer is not valid: %w", err)
	}
	return a.HostKey, nil
}

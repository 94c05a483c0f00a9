package coordclient

import (
	"github.com/agentd/agent/internal/atomicfile"

	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Profile is what a laptop client needs to reach a coordinator, saved by
// `agent login`.
type Profile struct {
	URL         string `json:"url"`
	Token       string `json:"token"`
	Fingerprint string `json:"fingerprint,omitempty"`
	// InsecureHTTP allows an http:// URL (the token travels in cleartext);
	// saved by `agent login --insecure-http`.
	InsecureHTTP bool `json:"insecure_http,omitempty"`
}

// Environment variables that override the saved profile, field by field.
const (
	EnvURL         = "AGENT_URL"
	EnvToken       = "AGENT_TOKEN"
	EnvFingerprint = "AGENT_FINGERPRINT"
	// EnvInsecureHTTP set to 1 or true allows a plain-HTTP coordinator URL.
	EnvInsecureHTTP = "AGENT_INSECURE_HTTP"
)

// InsecureHTTPFromEnv reports whether an environment value such as
// AGENT_INSECURE_HTTP's says yes (1, true, yes).
func InsecureHTTPFromEnv(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "1", "true", "yes":
		return true
	}
	return false
}

// ProfilePath is $XDG_CONFIG_HOME/agent/config.json, or
// $HOME/.config/agent/config.json when XDG_CONFIG_HOME is unset.
func ProfilePath(getenv func(string) string) (string, error) {
	dir := getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home := getenv("HOME")
		if home == "" {
			return "", errors.New("neither XDG_CONFIG_HOME nor HOME is set; cannot locate the client configuration")
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "agent", "config.json"), nil
}

// LoadProfile reads the saved profile and applies the environment
// overrides. It fails with a hint when no URL or token is known.
func LoadProfile(getenv func(string) string) (Profile, error) {
	var p Profile
	path, pathErr := ProfilePath(getenv)
	if pathErr == nil {
		data, err := os.ReadFile(path)
		switch {
		case err == nil:
			if err := json.Unmarshal(data, &p); err != nil {
				return Profile{}, fmt.Errorf("%s is not valid JSON (%v); run agent login again", path, err)
			}
		case !errors.Is(err, os.ErrNotExist):
			return Profile{}, fmt.Errorf("reading %s: %w", path, err)
		}
	}
	if v := getenv(EnvURL); v != "" {
		p.URL = v
	}
	if v := getenv(EnvToken); v != "" {
		p.Token = v
	}
	if v := getenv(EnvFingerprint); v != "" {
		p.Fingerprint = v
	}
	if InsecureHTTPFromEnv(getenv(EnvInsecureHTTP)) {
		p.InsecureHTTP = true
	}
	if p.URL == "" || p.Token == "" {
		return Profile{}, errors.New("not logged in: run `agent login URL --token TOKEN`, or set AGENT_URL and AGENT_TOKEN")
	}
	if p.Fingerprint != "" {
		fp, err := NormalizeFingerprint(p.Fingerprint)
		if err != nil {
			return Profile{}, err
		}
		p.Fingerprint = fp
	}
	return p, nil
}

// SaveProfile writes the profile (mode 0600, directory 0700) and returns
// its path.
func SaveProfile(getenv func(string) string, p Profile) (string, error) {
	path, err := ProfilePath(getenv)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	data, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return "", err
	}
	if err := atomicfile.Write(path, append(data, '\n'), 0o600); err != nil {
		return "", fmt.Errorf("saving %s: %w", path, err)
	}
	return path, nil
}

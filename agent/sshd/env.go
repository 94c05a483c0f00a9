package sshd

import (
	"strings"
)

// secretEnv reports whether an environment variable of the agent must never
// reach a session: the agent's own settings (AGENT_*, which include its
// token) and anything that names a token or secret of the agent's runtime.
func secretEnv(name string) bool {
	upper := strings.ToUpper(name)
	switch {
	case strings.HasPrefix(upper, "AGENT_"):
		return true
	case strings.Contains(upper, "AGENT_TOKEN"):
		return true
	case upper == "NOTIFY_SOCKET", upper == "LISTEN_FDS", upper == "LISTEN_PID", upper == "LISTEN_FDNAMES":
		// systemd hand-over variables describe the agent's process, not the session's.
		return true
	}
	return false
}

// envList is an ordered environment in which a later Set replaces an
// earlier value, the way a shell's export does.
type envList struct {
	keys   []string
	values map[string]string
}

func newEnvList() *envList { return &envList{values: map[string]string{}} }

func (e *envList) Set(key, value string) {
	if key == "" || strings.ContainsAny(key, "=\x00") || strings.ContainsRune(value, 0) {
		return
	}
	if _, ok := e.values[key]; !ok {
		e.keys = append(e.keys, key)
	}
	e.values[key] = value
}

func (e *envList) SetDefault(key, value string) {
	if _, ok := e.values[key]; !ok {
		e.Set(key, value)
	}
}

// AddAll adds KEY=VALUE entries; filter, if set, drops entries by key.
func (e *envList) AddAll(kvs []string, drop func(string) bool) {
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || (drop != nil && drop(k)) {
			continue
		}
		e.Set(k, v)
	}
}

func (e *envList) Get(key string) string { return e.values[key] }

func (e *envList) Environ() []string {
	out := make([]string, 0, len(e.keys))
	for _, k := range e.keys {
		out = append(out, k+"="+e.values[k])
	}
	return out
}

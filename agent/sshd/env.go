package sshd

import (
	"strings"
)

// agentInternalEnv reports whether a variable of the agent's own
// environment must never reach a session: it configures the agent, not the
// workspace. AGENT_* carry the agent's settings and token; TS_* are
// Tailscale's knobs, some set by the agent itself at run time; SHLVL would
// make a session's bash believe it is nested and skip ~/.bashrc; GOMEMLIMIT
// is the agent's own memory limit, wrong for the user's Go programs; the
// systemd hand-over variables describe the agent's process.
func agentInternalEnv(name string) bool {
	upper := strings.ToUpper(name)
	switch {
	case strings.HasPrefix(upper, "AGENT_"), strings.Contains(upper, "AGENT_TOKEN"):
		return true
	case strings.HasPrefix(upper, "TS_"):
		return true
	case upper == "SHLVL", upper == "GOMEMLIMIT":
		return true
	case upper == "NOTIFY_SOCKET", upper == "LISTEN_FDS", upper == "LISTEN_PID", upper == "LISTEN_FDNAMES":
		return true
	}
	return false
}

// sessionBaseEnv is the environment every session starts from: the
// workspace's variables as the agent received them (PATH, LANG, the image's
// own settings) and then Options.Env, without the agent's internals.
func sessionBaseEnv(agentEnv, extra []string) []string {
	env := newEnvList()
	env.AddAll(agentEnv, agentInternalEnv)
	env.AddAll(extra, agentInternalEnv)
	return env.Environ()
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

package coordclient

import (
	"strings"
	"testing"
	"time"
)

func TestNormalizeFingerprint(t *testing.T) {
	want := strings.Repeat("ab", 32)
	for _, in := range []string{want, strings.ToUpper(want), "sha256:" + want, " " + want + "\n",
		strings.TrimSuffix(strings.Repeat("AB:", 32), ":")} {
		got, err := NormalizeFingerprint(in)
		if err != nil || got != want {
			t.Errorf("%q: %q %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "abc", strings.Repeat("ab", 31), strings.Repeat("zz", 32)} {
		if _, err := NormalizeFingerprint(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestCoordinateURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://c.example:8443":      "https://c.example:8443/api/v1/coordinate",
		"https://c.example:8443/":     "https://c.example:8443/api/v1/coordinate",
		"https://c.example/prefix/":   "https://c.example/prefix/api/v1/coordinate",
		"wss://c.example":             "https://c.example/api/v1/coordinate",
		"http://127.0.0.1:1234?x=y#f": "http://127.0.0.1:1234/api/v1/coordinate",
	} {
		got, err := coordinateURL(in)
		if err != nil || got != want {
			t.Errorf("%q: %q %v, want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "c.example:8443", "ftp://c.example", "https://"} {
		if _, err := coordinateURL(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestProfileEnvOverridesFile(t *testing.T) {
	dir := t.TempDir()
	vars := map[string]string{"XDG_CONFIG_HOME": dir}
	getenv := func(k string) string { return vars[k] }
	if _, err := LoadProfile(getenv); err == nil || !strings.Contains(err.Error(), "agent login") {
		t.Fatalf("no profile: %v", err)
	}
	fp := strings.Repeat("cd", 32)
	path, err := SaveProfile(getenv, Profile{URL: "https://a.example", Token: "usr_file", Fingerprint: fp})
	if err != nil || path != dir+"/agent/config.json" {
		t.Fatalf("save: %q %v", path, err)
	}
	p, err := LoadProfile(getenv)
	if err != nil || p.URL != "https://a.example" || p.Token != "usr_file" || p.Fingerprint != fp {
		t.Fatalf("load: %+v %v", p, err)
	}
	vars[EnvToken] = "usr_env"
	vars[EnvURL] = "https://b.example"
	if p, _ := LoadProfile(getenv); p.Token != "usr_env" || p.URL != "https://b.example" || p.Fingerprint != fp {
		t.Fatalf("env overrides: %+v", p)
	}
	vars[EnvFingerprint] = "nothex"
	if _, err := LoadProfile(getenv); err == nil {
		t.Fatal("bad fingerprint from the environment accepted")
	}
	// HOME fallback.
	if path, _ := ProfilePath(func(k string) string { return map[string]string{"HOME": "/home/x"}[k] }); path != "/home/x/.config/agent/config.json" {
		t.Fatalf("HOME fallback: %q", path)
	}
}

// The reconnect schedule never waits longer than DefaultMaxBackoff (so a
// peer is back within 2 s of the coordinator's return after any outage),
// and its waits at the cap spread over the cap's upper half.
func TestBackoffBounded(t *testing.T) {
	if DefaultMaxBackoff > 2*time.Second {
		t.Fatalf("DefaultMaxBackoff %v: a peer could return more than 2 s after the coordinator", DefaultMaxBackoff)
	}
	step := DefaultMinBackoff
	lo, hi := time.Hour, time.Duration(0)
	for range 1000 {
		w := jittered(step)
		if w < step/2 || w > step {
			t.Fatalf("wait %v outside [%v, %v]", w, step/2, step)
		}
		if step == DefaultMaxBackoff {
			lo, hi = min(lo, w), max(hi, w)
		}
		step = min(step*2, DefaultMaxBackoff)
	}
	if hi-lo < DefaultMaxBackoff/4 {
		t.Errorf("waits at the cap span only %v to %v: peers would return together", lo, hi)
	}
}

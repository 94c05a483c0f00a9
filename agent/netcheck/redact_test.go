package netcheck

import (
	"strings"
	"testing"
)

func TestRedactURLHidesProxyPassword(t *testing.T) {
	for _, in := range []string{
		"http://alice:s3cret@proxy.example:3128",
		"https://bob:s3cret@198.51.100.7:8443/path",
	} {
		got := redactURL(in)
		if strings.Contains(got, "s3cret") {
			t.Errorf("redactURL(%q) = %q: password visible", in, got)
		}
		if !strings.Contains(got, "@") || !strings.Contains(got, ":xxxxx@") {
			t.Errorf("redactURL(%q) = %q: want the user kept and the password masked", in, got)
		}
	}
	if got := redactURL("http://proxy.example:3128"); got != "http://proxy.example:3128" {
		t.Errorf("URL without credentials changed: %q", got)
	}
}

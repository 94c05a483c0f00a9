package main

import (
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/agentd/agent/agent/netcheck"
)

// Inside a workspace the agent's own environment names the coordinator;
// netcheck must pick it up so nobody has to copy the URL by hand.
func TestNetcheckCoordinatorFromEnvironment(t *testing.T) {
	cases := []struct {
		name            string
		vars            map[string]string
		wantURL, wantFP string
	}{
		{"agent's variables", map[string]string{"AGENT_URL": "https://coord.example:8443", "AGENT_FINGERPRINT": "ab12"}, "https://coord.example:8443", "ab12"},
		{"netcheck's own win", map[string]string{
			"AGENT_URL": "https://agent.example", "AGENT_FINGERPRINT": "aa",
			"AGENT_COORDINATOR_URL": "https://netcheck.example", "AGENT_COORDINATOR_FINGERPRINT": "bb",
		}, "https://netcheck.example", "bb"},
		{"none", map[string]string{}, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := &cliEnv{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard, Getenv: func(k string) string { return tc.vars[k] }}
			cmd := newNetcheckCmd(env)
			if got := cmd.Flags().Lookup("coordinator-url").DefValue; got != tc.wantURL {
				t.Errorf("--coordinator-url default = %q, want %q", got, tc.wantURL)
			}
			if got := cmd.Flags().Lookup("fingerprint").DefValue; got != tc.wantFP {
				t.Errorf("--fingerprint default = %q, want %q", got, tc.wantFP)
			}
		})
	}
}

// After --fix the exit status is the node's verdict as it is now, so a fix
// that did not heal the node does not exit 0.
func TestNetcheckVerdictExit(t *testing.T) {
	for _, tc := range []struct {
		status netcheck.Status
		code   int
	}{{netcheck.StatusOK, 0}, {netcheck.StatusDegraded, 1}, {netcheck.StatusBroken, 2}} {
		err := verdictExit(&netcheck.Report{Status: tc.status})
		var ee *exitError
		switch {
		case tc.code == 0 && err != nil:
			t.Errorf("%s: %v, want nil", tc.status, err)
		case tc.code != 0 && (!errors.As(err, &ee) || ee.code != tc.code):
			t.Errorf("%s: %v, want exit %d", tc.status, err, tc.code)
		}
	}
}

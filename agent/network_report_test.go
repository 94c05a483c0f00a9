package agent_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/agent"
	"github.com/agentd/agent/client"
	"github.com/agentd/agent/coordinator/coordclient"
)

// The real agent's own network verdict (whatever netcheck finds on this
// machine) reaches the client through the coordinator, and stays there
// after the agent leaves: the client's error for the offline workspace
// quotes it.
func TestAgentVerdictReachesClientErrors(t *testing.T) {
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ws := s.connect(t, ctx, false)

	// The agent API says what the agent concluded.
	var st agent.Status
	for {
		st = refreshStatus(t, ws)
		if st.Network != "unknown" && ws.Network() != nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no verdict reached the client (agent says %q, client has %+v)", st.Network, ws.Network())
		case <-time.After(200 * time.Millisecond):
		}
	}
	// The agent may have moved on between the two reads; wait until the
	// client shows what the agent shows.
	deadline := time.Now().Add(20 * time.Second)
	for v := ws.Network(); string(v.Status) != st.Network || v.Summary != st.NetworkSummary; v = ws.Network() {
		if time.Now().After(deadline) {
			t.Fatalf("client has verdict %s %q, the agent %s %q", v.Status, v.Summary, st.Network, st.NetworkSummary)
		}
		time.Sleep(100 * time.Millisecond)
		st = refreshStatus(t, ws)
	}
	verdict := ws.Network()
	ws.Close()

	// The agent stops; a client arriving now hears why it cannot connect.
	s.agentCancel()
	select {
	case <-s.agentDone:
		s.agentDone <- nil // for the stack's own cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not stop")
	}
	_, err := client.Connect(ctx, client.Config{
		Coordinator:   coordclient.Config{URL: s.url, Token: s.userToken, Fingerprint: s.fp},
		Logger:        testLogger(t),
		UnhealthyWait: time.Second,
	}, "ws1")
	if err == nil {
		t.Fatal("connected to a stopped workspace")
	}
	for _, want := range []string{`workspace "ws1" did not come online`, "its agent disconnected at", string(verdict.Status), verdict.Summary} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("connect error %q does not contain %q", err, want)
		}
	}
}

func refreshStatus(t *testing.T, ws *client.Workspace) agent.Status {
	t.Helper()
	resp, err := ws.HTTPClient().Get("http://agent/api/v1/status")
	if err != nil {
		t.Fatalf("agent API: %v", err)
	}
	defer resp.Body.Close()
	var st agent.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

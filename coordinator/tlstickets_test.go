package coordinator_test

import (
	"io"
	"net/http"
	"testing"

	"github.com/agentd/agent/coordinator/coordclient"
)

// After a restart on the same certificate, a client that talked to the
// coordinator before resumes its TLS session instead of a full handshake,
// and the certificate pin still holds on the resumed connection.
func TestTLSSessionResumesAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	tc := startCoordinator(t, dir, coordOpts{})
	cfg, err := coordclient.TLSConfig(tc.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	// A fresh transport per request: each handshake is a new connection
	// and only the session cache carries over.
	get := func(url string) *http.Response {
		t.Helper()
		tr := &http.Transport{TLSClientConfig: cfg}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr}).Get(url + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body) // reading takes in the session ticket
		resp.Body.Close()
		return resp
	}
	if r := get(tc.URL()); r.TLS.DidResume {
		t.Fatal("the first connection resumed a session it cannot have")
	}
	tc.stop()

	tc2 := startCoordinator(t, dir, coordOpts{})
	if r := get(tc2.URL()); !r.TLS.DidResume {
		t.Fatal("the connection after the restart made a full handshake: the session ticket keys did not survive the restart")
	}

	// Another certificate (another data directory) cannot take the session
	// up, and the pin refuses it.
	other := startCoordinator(t, t.TempDir(), coordOpts{})
	tr := &http.Transport{TLSClientConfig: cfg}
	defer tr.CloseIdleConnections()
	if resp, err := (&http.Client{Transport: tr}).Get(other.URL() + "/healthz"); err == nil {
		resp.Body.Close()
		t.Fatal("a coordinator with another certificate was accepted under the old pin")
	}
}

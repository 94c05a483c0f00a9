package tailnet_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agent/internal/netlab"
)

// TestKilledPortForwardFreesAgentFlows kills a real `agent port-forward`
// holding connections with SIGKILL: no FIN reaches the workspace, so only
// the agent's keepalive can end them. The workspace server must see every
// connection end within the agent's --dead-peer-timeout.
func TestKilledPortForwardFreesAgentFlows(t *testing.T) {
	const bound = 3 * time.Second
	d := newDeployment(t, netlab.NATEndpointIndependent)
	d.stopAgent()
	d.startAgentWith("--dead-peer-timeout", bound.String())
	d.waitAgent("ws1")

	ln, err := d.sites.Host1.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	ended := make(chan time.Time, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 1)
				if _, err := c.Read(buf); err == nil {
					c.Write(buf)
					io.Copy(io.Discard, c)
				}
				ended <- time.Now()
			}()
		}
	}()

	pf := d.startClient("port-forward", "ws1", strconv.Itoa(port))
	var pfOut lockedBuffer
	pf.Stdout, pf.Stderr = &pfOut, &pfOut
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { pf.Process.Kill(); pf.Wait() }()
	deadline := time.Now().Add(45 * time.Second)
	for !strings.Contains(pfOut.String(), "Forwarding") {
		if time.Now().After(deadline) {
			t.Fatalf("port-forward not up within 45 s:\n%s", pfOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	const n = 4
	for i := range n {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		c, err := d.sites.Host2.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", port))
		cancel()
		if err != nil {
			t.Fatalf("connection %d: %v\n%s", i, err, pfOut.String())
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 1)); err != nil {
			t.Fatalf("connection %d: no echo: %v\n%s", i, err, pfOut.String())
		}
	}

	// Idle but alive: the laptop answers the probes, nothing ends.
	select {
	case <-ended:
		t.Fatalf("an idle connection of a live port-forward ended within %v\n%s", 2*bound, pfOut.String())
	case <-time.After(2 * bound):
	}

	if err := pf.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	pf.Wait()
	// Slack for a loaded 2-core machine; without keepalive they stay
	// open for over two hours.
	limit := time.After(bound + 15*time.Second)
	for range n {
		select {
		case <-ended:
		case <-limit:
			t.Fatalf("the workspace server's connections still open %v after port-forward was killed, want within about %v", bound+15*time.Second, bound)
		}
	}
	t.Logf("all %d connections ended %v after the SIGKILL (bound %v)", n, time.Since(killed).Round(time.Millisecond), bound)
}

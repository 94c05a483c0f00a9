package tailnet

import (
	"expvar"
	"testing"
	"time"
)

// The pacer's count of packets in flight rests on magicsock counting each
// packet it sends once. If Tailscale changed that (counting batches, say),
// the count would drift and the pacer would write off its packets at every
// pause, or hold packets that were long sent.
func TestOutboundPacerCountsMatchSends(t *testing.T) {
	agent, client := reachablePair(t)
	for _, c := range []*Conn{agent, client} {
		if c.outPacer == nil {
			t.Fatal("the outbound pacer is not installed: magicsock's send counters were not found (Tailscale renamed them?)")
		}
	}
	e0, s0, w0 := agent.outPacer.counts()
	transfer(t, client, agent, 5001, 8<<20)
	// The last ACKs may still be on their way out.
	deadline := time.Now().Add(5 * time.Second)
	for {
		e, s, w := agent.outPacer.counts()
		entered, sent, writtenOff := e-e0, s-s0, w-w0
		if entered < 5000 {
			t.Fatalf("the agent handed %d packets to WireGuard for 8 MiB each way; want thousands", entered)
		}
		// WireGuard's own packets (keepalives, handshakes) count as sent
		// too, and may be written off against ours; a few, not hundreds.
		inFlight := entered - sent - writtenOff
		if inFlight >= -20 && inFlight <= 20 && writtenOff <= entered/20 {
			t.Logf("%d packets handed to WireGuard, %d sent, %d written off", entered, sent, writtenOff)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the transfer: %d packets handed to WireGuard, %d sent, %d written off; the counts drifted", entered, sent, writtenOff)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A packet that WireGuard never sends (dropped while it waits for a
// session) must not hold the next ones for longer than outboundStall each.
func TestOutboundPacerNeverStopsTheFlow(t *testing.T) {
	var sent expvar.Int
	p := &outboundPacer{sent: []*expvar.Int{&sent}, limit: 4}
	start := time.Now()
	for range 40 {
		p.await(1)
	}
	// 40 packets, none sent: at most one stall per limit packets.
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("40 packets with none sent took %v; the pacer waits for sends that never come", took)
	}
	entered, _, writtenOff := p.counts()
	if entered != 40 || writtenOff < 30 {
		t.Fatalf("entered %d, written off %d; want 40 and at least 30", entered, writtenOff)
	}

	// Sends resume: the count starts over from what is really in flight.
	sent.Add(60)
	p.await(1)
	if entered, sent, writtenOff := p.counts(); entered-sent-writtenOff != 1 {
		t.Fatalf("after the sends resumed: %d entered, %d sent, %d written off; want 1 in flight", entered, sent, writtenOff)
	}
}

// While fewer than limit packets are in flight, none waits.
func TestOutboundPacerWaitsOnlyAtTheLimit(t *testing.T) {
	var sent expvar.Int
	p := &outboundPacer{sent: []*expvar.Int{&sent}, limit: 1000}
	start := time.Now()
	for range 1000 {
		p.await(1)
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Fatalf("1000 packets under a limit of 1000 took %v; they should not wait", took)
	}
	done := make(chan struct{})
	go func() {
		p.await(1) // the 1001st waits for a send
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("the packet at the limit went through with nothing sent")
	case <-time.After(time.Millisecond):
	}
	sent.Add(1)
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("the packet at the limit still waits after a send")
	}
}

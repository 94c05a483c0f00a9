package agent_test

import (
	"context"
	"testing"
	"time"

	"github.com/agentd/agent/protocol"
	"github.com/agentd/agent/speedtest"
)

// The agent answers speed tests on tailnet port 3, both directions.
func TestSpeedtestOverTheTailnet(t *testing.T) {
	s := startStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ws := s.connect(t, ctx, false)
	for _, dir := range []speedtest.Direction{speedtest.Download, speedtest.Upload} {
		c, err := ws.DialTCP(ctx, protocol.PortSpeedtest)
		if err != nil {
			t.Fatalf("dial the speed test port: %v", err)
		}
		res, err := speedtest.Run(ctx, c, dir, 500*time.Millisecond)
		if err != nil {
			t.Fatalf("%v: %v", dir, err)
		}
		if res.Bytes < 64<<10 || res.Duration < 300*time.Millisecond {
			t.Errorf("%v: %d bytes in %v", dir, res.Bytes, res.Duration)
		}
		t.Logf("%v over the tailnet: %.0f Mbit/s", dir, res.BitsPerSecond()/1e6)
	}
}

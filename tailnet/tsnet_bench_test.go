package tailnet

import (
	"context"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn/store/mem"
	"tailscale.com/tsnet"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/logger"

	"github.com/agentd/agent/internal/benchtable"
)

// BenchmarkVsTsnet puts Tailscale's own embedding, a tsnet.Server pair, beside
// ours over the direct path: the same relay kind (our DERP and STUN on
// loopback), the same Tailscale version, the same transfer, over IPv6 on
// both sides (our nodes only have IPv6 addresses; over tsnet's IPv4 address
// each packet would carry 20 bytes more payload). Rounds alternate (ours,
// tsnet, ours, ...) so a change in the machine's load hits both; the
// reported figures are the medians, and the median of the rounds' ratios,
// over TAILNET_BENCH_ROUNDS rounds (5: on a shared machine one round in a
// few is hit by someone else's load).
//
//	TAILNET_BENCH_MIB=512 go test -run '^$' -bench VsTsnet -benchtime 1x ./tailnet/
//
// tsnet needs a Tailscale control server; Tailscale's testcontrol, the one
// tsnet's own tests use, plays it.
func BenchmarkVsTsnet(b *testing.B) {
	if os.Getenv(derpOnlyEnv) == "1" {
		b.Skip("direct path is blocked in this process")
	}
	n := benchBytes()
	rounds := envInt("TAILNET_BENCH_ROUNDS", 5)
	for b.Loop() {
		var ours, theirs, ratios []float64
		for round := 1; round <= rounds; round++ {
			got := tailnetTransfer(b, n)
			ours = append(ours, got.MBps)
			ts := tsnetTransfer(b, n)
			theirs = append(theirs, ts)
			ratios = append(ratios, got.MBps/ts)
			b.Logf("round %d, %d MiB direct: ours %.1f MB/s (%s), tsnet pair %.1f MB/s", round, n>>20, got.MBps, got.Path, ts)
		}
		o, t := benchtable.Median(ours), benchtable.Median(theirs)
		b.ReportMetric(o, "tailnet-MB/s")
		b.ReportMetric(t, "tsnet-MB/s")
		// The ratio within each round is the steadier figure on a shared
		// machine, whose load moves between rounds.
		b.ReportMetric(benchtable.Median(ratios), "round-ratio")
		b.Logf("medians of %d rounds: ours %.1f MB/s, tsnet pair %.1f MB/s, ratio %.2f (median of the rounds' ratios %.2f); ours %s MB/s, tsnet %s MB/s, ratios %s",
			rounds, o, t, o/t, benchtable.Median(ratios), oneDecimal(ours), oneDecimal(theirs), twoDecimals(ratios))
	}
}

func oneDecimal(v []float64) string { return formatAll(v, 1) }

func twoDecimals(v []float64) string { return formatAll(v, 2) }

func formatAll(v []float64, decimals int) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.FormatFloat(x, 'f', decimals, 64)
	}
	return "[" + strings.Join(s, " ") + "]"
}

// tsnetTransfer brings up a control server and two tsnet nodes, waits for
// the direct path, and times n bytes from one to the other.
func tsnetTransfer(b *testing.B, n int64) float64 {
	b.Helper()
	r := newTestRelay(b)
	r.derp.SetAdmitFunc(func(string) bool { return true })
	control := &testcontrol.Server{DERPMap: r.dm.toTailcfg(), Logf: logger.Discard}
	control.HTTPTestServer = httptest.NewUnstartedServer(control)
	control.HTTPTestServer.Config.ErrorLog = nil
	control.HTTPTestServer.Start()
	defer control.HTTPTestServer.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	up := func(name string) (*tsnet.Server, netip.Addr) {
		s := &tsnet.Server{
			Dir:        filepath.Join(b.TempDir(), name),
			ControlURL: control.HTTPTestServer.URL,
			Hostname:   name,
			Store:      new(mem.Store),
			Ephemeral:  true,
			Logf:       logger.Discard,
			UserLogf:   logger.Discard,
		}
		st, err := s.Up(ctx)
		if err != nil {
			b.Fatalf("tsnet %s: %v", name, err)
		}
		for _, ip := range st.TailscaleIPs {
			if ip.Is6() {
				return s, ip
			}
		}
		b.Fatalf("tsnet %s has no IPv6 address: %v", name, st.TailscaleIPs)
		return nil, netip.Addr{}
	}
	recv, recvIP := up("recv")
	defer recv.Close()
	send, _ := up("send")
	defer send.Close()

	lc, err := send.LocalClient()
	if err != nil {
		b.Fatal(err)
	}
	// Measure the direct path, not the DERP start of it.
	for {
		res, err := lc.Ping(ctx, recvIP, "disco")
		if err == nil && res.Err == "" && res.Endpoint != "" {
			break
		}
		if ctx.Err() != nil {
			b.Fatalf("tsnet pair never went direct (last: %v %+v)", err, res)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ln, err := recv.Listen("tcp", ":5001")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	d, err := timeTransfer(ln, func() (net.Conn, error) {
		return send.Dial(ctx, "tcp", netip.AddrPortFrom(recvIP, 5001).String())
	}, n)
	if err != nil {
		b.Fatalf("tsnet transfer: %v", err)
	}
	return mbps(n, d)
}

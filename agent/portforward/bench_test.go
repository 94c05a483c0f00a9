package portforward_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/agentd/agent/agent/portforward"
	"github.com/agentd/agent/client/forwardclient"
	"github.com/agentd/agent/internal/testkit/pftest"
)

// loopbackDialer reaches ports on this machine directly: the laptop side
// with no tunnel behind it.
type loopbackDialer struct{}

func (loopbackDialer) DialTCP(ctx context.Context, port uint16) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
}

func (loopbackDialer) DialUDP(ctx context.Context, port uint16) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "udp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
}

// BenchmarkIperf3 measures iperf3 TCP throughput over plain loopback and,
// in the same run, through each forwarding path, and prints them side by
// side with the ratio. Run it once:
//
//	go test -run '^$' -bench Iperf3 -benchtime 1x ./agent/portforward/
//
// AGENT_BENCH_SECONDS sets the length of each iperf3 run (default 3).
func BenchmarkIperf3(b *testing.B) {
	seconds := 3
	if s, err := strconv.Atoi(os.Getenv("AGENT_BENCH_SECONDS")); err == nil && s > 0 {
		seconds = s
	}
	server := pftest.StartIperf3Server(b)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(10*seconds+60)*time.Second)
	defer cancel()

	agentOnly := func() string {
		f := portforward.New(portforward.Options{})
		tun, err := pftest.NewTunnel(pftest.TunnelOptions{TCP: f.TCP, Opaque: true})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { tun.Close(); f.Close() })
		ap, err := tun.Expose(server)
		if err != nil {
			b.Fatal(err)
		}
		return ap.String()
	}
	clientOver := func(d forwardclient.Dialer) string {
		p := pftest.NewClientPath(b, d)
		f, err := p.Forwarder("tcp", server)
		if err != nil {
			b.Fatal(err)
		}
		return f.Active()[0].Addrs[0].String()
	}
	fullPath := func() string {
		f := portforward.New(portforward.Options{})
		tun, err := pftest.NewTunnel(pftest.TunnelOptions{TCP: f.TCP, Opaque: true})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { tun.Close(); f.Close() })
		return clientOver(tun)
	}

	type row struct {
		name string
		addr string
		bps  float64
	}
	rows := []row{
		{name: "plain loopback: iperf3 -> server", addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(int(server)))},
		{name: "agent forwarder (one relay)", addr: agentOnly()},
		{name: "laptop listener (one relay)", addr: clientOver(loopbackDialer{})},
		{name: "laptop listener + tunnel + agent forwarder (two relays)", addr: fullPath()},
	}
	for i := range rows {
		host, portStr, _ := net.SplitHostPort(rows[i].addr)
		port, _ := strconv.Atoi(portStr)
		res, err := pftest.Iperf3(ctx, host, uint16(port), seconds)
		if err != nil {
			b.Fatalf("%s: %v", rows[i].name, err)
		}
		rows[i].bps = res.ReceivedBitsPerSecond
	}
	b.StopTimer()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "\niperf3 TCP, %d s per run, one stream\npath\tGbit/s\tof plain loopback\n", seconds)
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%.2f\t%.0f%%\n", r.name, r.bps/1e9, 100*r.bps/rows[0].bps)
	}
	tw.Flush()
	b.ReportMetric(rows[0].bps/1e9, "plain-Gbit/s")
	b.ReportMetric(rows[1].bps/1e9, "agent-Gbit/s")
	b.ReportMetric(rows[3].bps/1e9, "full-path-Gbit/s")
}

package tailnet

import (
	"bufio"
	"context"
	"encoding/json"
	"expvar"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Benchmarks. Each transfer prints its MB/s next to plain loopback TCP
// measured in the same run on the same box:
//
//	go test -run '^$' -bench . -benchtime 1x ./tailnet/
//
// TAILNET_BENCH_MIB shortens the transfers (default 1024 MiB).

func benchBytes() int64 { return int64(envInt("TAILNET_BENCH_MIB", 1024)) << 20 }

// sendAll writes n bytes to w in large chunks.
func sendAll(w io.Writer, n int64) error {
	buf := make([]byte, 256<<10)
	for n > 0 {
		chunk := buf[:min(int64(len(buf)), n)]
		m, err := w.Write(chunk)
		if err != nil {
			return err
		}
		n -= int64(m)
	}
	return nil
}

// timeTransfer sends n bytes from dial() to a connection accepted on ln and
// returns how long until the receiver had them all.
func timeTransfer(ln net.Listener, dial func() (net.Conn, error), n int64) (time.Duration, error) {
	done := make(chan error, 1)
	var elapsed time.Duration
	start := time.Now()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		got, err := io.Copy(io.Discard, c)
		elapsed = time.Since(start)
		if err == nil && got != n {
			err = fmt.Errorf("received %d bytes, want %d", got, n)
		}
		done <- err
	}()
	c, err := dial()
	if err != nil {
		return 0, err
	}
	if err := sendAll(c, n); err != nil {
		c.Close()
		return 0, err
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	err = <-done
	c.Close()
	return elapsed, err
}

func mbps(n int64, d time.Duration) float64 { return float64(n) / 1e6 / d.Seconds() }

func loopbackMBps(b *testing.B, n int64) float64 {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	d, err := timeTransfer(ln, func() (net.Conn, error) { return net.Dial("tcp", ln.Addr().String()) }, n)
	if err != nil {
		b.Fatal(err)
	}
	return mbps(n, d)
}

// transferResult is one timed tailnet transfer.
type transferResult struct {
	MBps float64
	Path string
	// DERPDrops counts packets magicsock dropped because its DERP write
	// queue was full; Retransmits counts the sender's TCP retransmissions.
	// Each drop costs a retransmission and halves the congestion window.
	DERPDrops, Retransmits int64
}

// lossCounters reads magicsock's DERP queue drops (a process-wide counter)
// and c's TCP retransmissions.
func lossCounters(c *Conn) (derpDrops, retransmits int64) {
	derpDrops = clientMetric("magicsock_send_derp_dropped")
	if set, ok := c.ns.ExpVar().(interface{ Get(string) expvar.Var }); ok {
		if f, ok := set.Get("counter_tcp_retransmits").(expvar.Func); ok {
			retransmits, _ = f.Value().(int64)
		}
	}
	return derpDrops, retransmits
}

// tailnetTransfer sets up a relay and two linked conns and times n bytes
// from the client to the agent.
func tailnetTransfer(b *testing.B, n int64) transferResult {
	agent, client := reachablePair(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if os.Getenv(derpOnlyEnv) != "1" {
		// Measure the direct path, not the DERP start of it.
		deadline := time.Now().Add(10 * time.Second)
		for {
			res, err := client.Ping(ctx, addrOf(agent))
			if err == nil && res.Direct() {
				break
			}
			if time.Now().After(deadline) {
				b.Fatal("path never went direct")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	ln, err := agent.Listen(5001)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	drops0, retrans0 := lossCounters(client)
	d, err := timeTransfer(ln, func() (net.Conn, error) {
		return client.DialContextTCP(context.Background(), netip.AddrPortFrom(addrOf(agent), 5001))
	}, n)
	if err != nil {
		b.Fatal(err)
	}
	drops, retrans := lossCounters(client)
	return transferResult{
		MBps:        mbps(n, d),
		Path:        client.PeerStatus()[0].Path.String(),
		DERPDrops:   drops - drops0,
		Retransmits: retrans - retrans0,
	}
}

func BenchmarkTransferDirect(b *testing.B) {
	if os.Getenv(derpOnlyEnv) == "1" {
		b.Skip("direct path is blocked in this process")
	}
	n := benchBytes()
	for b.Loop() {
		ref := loopbackMBps(b, n)
		got := tailnetTransfer(b, n)
		b.ReportMetric(got.MBps, "tailnet-MB/s")
		b.ReportMetric(ref, "loopback-MB/s")
		b.Logf("%d MiB direct (%s): tailnet %.1f MB/s, plain loopback TCP %.1f MB/s; %d TCP retransmissions",
			n>>20, got.Path, got.MBps, ref, got.Retransmits)
	}
}

// derpChildResult is what the DERP benchmark's child process reports.
type derpChildResult struct {
	transferResult
	LoopbackMBps float64
}

// BenchmarkTransferDERP runs the transfer in a child process with direct
// paths blocked (a process-wide switch in Tailscale) and reports its
// figures.
func BenchmarkTransferDERP(b *testing.B) {
	n := benchBytes()
	if os.Getenv(derpOnlyEnv) == "1" {
		ref := loopbackMBps(b, n)
		got := tailnetTransfer(b, n)
		js, _ := json.Marshal(derpChildResult{transferResult: got, LoopbackMBps: ref})
		fmt.Printf("RESULT %s\n", js)
		return
	}
	for b.Loop() {
		cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench=^BenchmarkTransferDERP$", "-test.benchtime=1x")
		cmd.Env = append(os.Environ(), derpOnlyEnv+"=1")
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			b.Fatalf("DERP child: %v\n%s", err, out)
		}
		var res derpChildResult
		sc := bufio.NewScanner(strings.NewReader(string(out)))
		for sc.Scan() {
			if js, ok := strings.CutPrefix(sc.Text(), "RESULT "); ok {
				if err := json.Unmarshal([]byte(js), &res); err != nil {
					b.Fatalf("DERP child result %q: %v", js, err)
				}
			}
		}
		if res.MBps == 0 {
			b.Fatalf("DERP child printed no result:\n%s", out)
		}
		b.ReportMetric(res.MBps, "tailnet-MB/s")
		b.ReportMetric(res.LoopbackMBps, "loopback-MB/s")
		b.Logf("%d MiB via DERP (%s): tailnet %.1f MB/s, plain loopback TCP %.1f MB/s; %d packets dropped at the DERP write queue, %d TCP retransmissions",
			n>>20, res.Path, res.MBps, res.LoopbackMBps, res.DERPDrops, res.Retransmits)
	}
}

// BenchmarkFirstPong times, from the moment both conns are created, the
// return of AwaitReachable (a disco pong and a WireGuard session) and the
// first disco pong over the direct path.
func BenchmarkFirstPong(b *testing.B) {
	if os.Getenv(derpOnlyEnv) == "1" {
		b.Skip("direct path is blocked in this process")
	}
	r := newTestRelay(b)
	var id NodeID
	for b.Loop() {
		start := time.Now()
		agent := newTestConn(b, r, id+1, true)
		client := newTestConn(b, r, id+2, false)
		id += 2
		link(b, agent, client)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		if err := client.AwaitReachable(ctx, addrOf(agent)); err != nil {
			b.Fatal(err)
		}
		first := time.Since(start)
		for {
			res, err := client.Ping(ctx, addrOf(agent))
			if err == nil && res.Direct() {
				break
			}
			if ctx.Err() != nil {
				b.Fatal("no direct pong")
			}
			time.Sleep(10 * time.Millisecond)
		}
		direct := time.Since(start)
		cancel()
		agent.Close()
		client.Close()
		b.ReportMetric(float64(first.Microseconds())/1000, "ms-to-first-pong")
		b.ReportMetric(float64(direct.Microseconds())/1000, "ms-to-direct-pong")
		b.Logf("first pong %v, first direct pong %v", first.Round(time.Millisecond), direct.Round(time.Millisecond))
	}
}

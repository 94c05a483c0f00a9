package pftest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// StartIperf3Server starts `iperf3 -s` on 127.0.0.1 and returns its port; it
// is stopped at tb's cleanup. prefix is put in front of the command, for
// example {"nsenter", "--net=/run/netns/ws"} to run it in a workspace
// namespace. It skips tb when iperf3 is not installed.
func StartIperf3Server(tb testing.TB, prefix ...string) uint16 {
	tb.Helper()
	if _, err := exec.LookPath("iperf3"); err != nil {
		tb.Skip("iperf3 is not installed (apt-get install iperf3)")
	}
	for attempt := 0; ; attempt++ {
		port, err := freePort()
		if err != nil {
			tb.Fatal(err)
		}
		args := append(append([]string{}, prefix...), "iperf3", "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(int(port)), "--forceflush")
		cmd := exec.Command(args[0], args[1:]...)
		out, err := cmd.StdoutPipe()
		if err != nil {
			tb.Fatal(err)
		}
		cmd.Stderr = cmd.Stdout
		if err := cmd.Start(); err != nil {
			tb.Fatalf("starting iperf3 server: %v", err)
		}
		ready := make(chan bool, 1)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if strings.Contains(sc.Text(), "Server listening") {
					ready <- true
					break
				}
			}
			ready <- false
			for sc.Scan() {
			}
		}()
		select {
		case ok := <-ready:
			if ok {
				tb.Cleanup(func() {
					cmd.Process.Kill()
					cmd.Wait()
				})
				return port
			}
		case <-time.After(10 * time.Second):
		}
		cmd.Process.Kill()
		cmd.Wait()
		if attempt == 2 {
			tb.Fatalf("iperf3 server did not start on port %d", port)
		}
	}
}

func freePort() (uint16, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port), nil
}

// Iperf3Result is what one iperf3 client run measured.
type Iperf3Result struct {
	SentBitsPerSecond     float64
	ReceivedBitsPerSecond float64
	Retransmits           int
}

// Iperf3 runs `iperf3 -c host -p port -t seconds -J` plus extra arguments
// and returns the measured throughput.
func Iperf3(ctx context.Context, host string, port uint16, seconds int, extra ...string) (Iperf3Result, error) {
	args := append([]string{"-c", host, "-p", strconv.Itoa(int(port)), "-t", strconv.Itoa(seconds), "-J"}, extra...)
	out, err := exec.CommandContext(ctx, "iperf3", args...).Output()
	var report struct {
		Error string `json:"error"`
		End   struct {
			SumSent struct {
				BitsPerSecond float64 `json:"bits_per_second"`
				Retransmits   int     `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if jerr := json.Unmarshal(out, &report); jerr != nil {
		if err == nil {
			err = jerr
		}
		return Iperf3Result{}, fmt.Errorf("iperf3 %s: %w", strings.Join(args, " "), err)
	}
	if report.Error != "" {
		return Iperf3Result{}, fmt.Errorf("iperf3 %s: %s", strings.Join(args, " "), report.Error)
	}
	if report.End.SumReceived.BitsPerSecond == 0 {
		return Iperf3Result{}, errors.New("iperf3 reported no throughput")
	}
	return Iperf3Result{
		SentBitsPerSecond:     report.End.SumSent.BitsPerSecond,
		ReceivedBitsPerSecond: report.End.SumReceived.BitsPerSecond,
		Retransmits:           report.End.SumSent.Retransmits,
	}, nil
}

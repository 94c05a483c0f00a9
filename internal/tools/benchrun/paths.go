package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"time"

	"github.com/agentd/agent/internal/benchtable"
)

// The "paths" step: issue 15's path figures from the namespace lab (time to
// direct through a conntrack NAT, failover, return after a coordinator
// outage, first ssh with UDP blocked), and our direct-path throughput beside
// a Tailscale tsnet pair.

// vsTsnetMiBEnv sets the MiB per transfer of the tsnet comparison.
const vsTsnetMiBEnv = "TAILNET_VS_TSNET_MIB"

const (
	rowDirectConntrack = "time to direct, conntrack NAT at the workspace (slowest of 10 clients)"
	rowFailoverStall   = "failover: longest data stall when the direct path dies mid-transfer"
	rowFailoverReturn  = "failover: direct again after the path returns"
	rowUDPBlockedSSH   = "UDP blocked at the workspace: agent start to first ssh (slowest of 3)"
	rowVsTsnet         = "tailnet TCP, direct path, vs a tsnet pair"
)

func coordReturnRow(outage string) string {
	return fmt.Sprintf("coordinator back from a %s outage: new ssh done after its return", outage)
}

func pathsStep() step {
	return step{key: "paths", run: func(ctx context.Context, log io.Writer) []benchtable.Row {
		rows := pathsBench().run(ctx, log, nil)
		mib, err := vsTsnetMiB(os.Getenv)
		if err != nil {
			return append(rows, benchtable.Failed(rowVsTsnet, err))
		}
		return append(rows, vsTsnetBench(mib).run(ctx, log, nil)...)
	}}
}

func vsTsnetMiB(getenv func(string) string) (int, error) {
	v := getenv(vsTsnetMiBEnv)
	if v == "" {
		return 512, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%s=%q: want a positive whole number of MiB", vsTsnetMiBEnv, v)
	}
	return n, nil
}

// againstTarget is a row whose reference is a target, not a measurement.
func againstTarget(o benchtable.Output, name string, figure benchtable.Pick, target float64, note string) benchtable.Row {
	v, status, err := o.Value(figure)
	if err != nil {
		return benchtable.Row{Name: name, Status: status, Note: err.Error()}
	}
	t := benchtable.Value{Value: target, Unit: figure.Unit}
	return benchtable.Measured(name, v, benchtable.Reference{Name: "target", Value: &t}, note)
}

// printed returns the first group of the first output line re matches, or
// "?" when none does.
func printed(o benchtable.Output, re *regexp.Regexp) string {
	for _, l := range o.Lines {
		if m := re.FindStringSubmatch(l); len(m) > 1 {
			return m[1]
		}
	}
	return "?"
}

func pathsBench() goBench {
	return goBench{
		name: "paths", pkg: "./e2e/tailnet/", bench: "^BenchmarkPaths", benchtime: "1x", timeout: 12 * time.Minute,
		rows: func(o benchtable.Output) []benchtable.Row {
			var rows []benchtable.Row
			conntrack := "BenchmarkPathsTimeToDirect/topology=conntrack"
			home := "BenchmarkPathsTimeToDirect/topology=home"
			runs := func(topo string) string {
				return printed(o, regexp.MustCompile(`topology=`+topo+`: client start to first direct pong, 10 runs: (\[.*\])`))
			}
			rows = append(rows, o.Compare(rowDirectConntrack, pick(conntrack, "max-ms", "ms"),
				"home routers both sides (slowest of 10)", pick(home, "max-ms", "ms"),
				fmt.Sprintf("client start to first direct pong; target < 5 s each; conntrack %s, home %s", runs("conntrack"), runs("home"))))

			stallAt := printed(o, regexp.MustCompile(`longest stall \S+ \(starting (\S+) after the cut\)`))
			rows = append(rows,
				againstTarget(o, rowFailoverStall, pick("BenchmarkPathsFailover", "stall-ms", "ms"), 3000,
					"UDP dropped 10 s at the workspace's router during a transfer through agent port-forward; stall began "+stallAt+" after the cut; sha256 verified"),
				againstTarget(o, rowFailoverReturn, pick("BenchmarkPathsFailover", "redirect-ms", "ms"), 5000,
					"from UDP's return to the client logging a direct path"))

			for _, outage := range []string{"10s", "1m0s"} {
				b := "BenchmarkPathsCoordinatorReturn/outage=" + outage
				label := map[string]string{"10s": "10 s", "1m0s": "60 s"}[outage]
				agent := printed(o, regexp.MustCompile(outage+` outage: agent attached (\S+) and`))
				rows = append(rows, o.Compare(coordReturnRow(label), pick(b, "ssh-after-return-ms", "ms"),
					"the same ssh, coordinator up", pick(b, "ssh-steady-ms", "ms"),
					"target 2 s; the agent was attached again "+agent+" after the return"))
			}

			both := printed(o, regexp.MustCompile(`agent start to first ssh, 3 runs: (UDP blocked \[.*\], UDP open \[.*\])`))
			rows = append(rows, o.Compare(rowUDPBlockedSSH, pick("BenchmarkPathsFirstSSH", "udp-blocked-max-ms", "ms"),
				"UDP open (slowest of 3)", pick("BenchmarkPathsFirstSSH", "udp-open-max-ms", "ms"), "target 1.5 s; "+both))
			return rows
		},
		rowNames: []string{rowDirectConntrack, rowFailoverStall, rowFailoverReturn,
			coordReturnRow("10 s"), coordReturnRow("60 s"), rowUDPBlockedSSH},
	}
}

func vsTsnetBench(mib int) goBench {
	return goBench{
		name: "tailnet vs tsnet", pkg: "./tailnet/", bench: "^BenchmarkVsTsnet$", benchtime: "1x", timeout: 10 * time.Minute,
		env: []string{fmt.Sprintf("TAILNET_BENCH_MIB=%d", mib)},
		rows: func(o benchtable.Output) []benchtable.Row {
			count := printed(o, regexp.MustCompile(`medians of (\d+) rounds`))
			rounds := printed(o, regexp.MustCompile(`medians of \d+ rounds: .*; (ours \[.*\] MB/s, tsnet \[[0-9. ]*\] MB/s)`))
			ratios := printed(o, regexp.MustCompile(`, ratios (\[[0-9. ]*\])`))
			perRound := printed(o, regexp.MustCompile(`median of the rounds' ratios ([0-9.]+)`))
			return []benchtable.Row{o.Compare(rowVsTsnet, pick("BenchmarkVsTsnet", "tailnet-MB/s", "MB/s"),
				"tsnet pair (Tailscale's embedding, same version)", pick("BenchmarkVsTsnet", "tsnet-MB/s", "MB/s"),
				fmt.Sprintf("%d MiB per transfer over IPv6, medians of %s alternating rounds: %s; each round's ratio %s, median %s", mib, count, rounds, ratios, perRound))}
		},
		rowNames: []string{rowVsTsnet},
	}
}

// Package benchtable reads `go test -bench` output and renders one table of
// figures, each next to the reference measured in the same run, as Markdown
// for people and JSON for comparing runs across commits.
package benchtable

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// Result is what one benchmark (or sub-benchmark) reported.
type Result struct {
	// Name is the benchmark's full name without the GOMAXPROCS suffix,
	// e.g. "BenchmarkVsOpenSSH/stream".
	Name    string
	Package string
	// Iterations is b.N of the reported run; 0 when skipped or failed.
	Iterations int
	// Metrics maps each reported unit ("ns/op", "tailnet-MB/s") to its value.
	Metrics map[string]float64
	// Skipped holds the reason given to b.Skip, Failed what the benchmark
	// logged before failing; at most one is set.
	Skipped string
	Failed  string
	// Log is what the benchmark logged (b.Log, t.Skip's reason and the like),
	// without file:line prefixes.
	Log []string
}

// Output is one `go test -bench` run, parsed.
type Output struct {
	Results []Result
	// Lines is every line of the output, for figures a benchmark prints
	// instead of reporting them as metrics.
	Lines []string
}

var (
	// figuresRe matches the tail of a result line: the iteration count and
	// tab-separated "value unit" pairs. The head may hold the benchmark's
	// name, or text the benchmark printed before its result.
	figuresRe = regexp.MustCompile(`(?:^|\s)(\d+)((?:\t *[-+0-9.eE]+ \S+)+)\s*$`)
	// nameRe matches a line that starts with a benchmark's name.
	nameRe    = regexp.MustCompile(`^(Benchmark\S*)(?:\s|$)`)
	statusRe  = regexp.MustCompile(`^\s*--- (SKIP|FAIL|BENCH): (Benchmark\S*)`)
	logRe     = regexp.MustCompile(`^\s+(?:\S+\.go:\d+: )?(.*)$`)
	procsRe   = regexp.MustCompile(`-\d+$`)
	packageRe = regexp.MustCompile(`^pkg: (\S+)`)
)

// Parse reads `go test -bench` output; pass -v to go test so that skipped
// benchmarks say why. Lines that are not part of a result are kept in Lines
// only.
func Parse(r io.Reader) (Output, error) {
	var out Output
	byName := map[string]int{}
	get := func(pkg, name string) *Result {
		i, ok := byName[name]
		if !ok {
			i = len(out.Results)
			byName[name] = i
			out.Results = append(out.Results, Result{Name: name, Package: pkg})
		}
		return &out.Results[i]
	}
	var pkg, current string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		out.Lines = append(out.Lines, line)
		if m := packageRe.FindStringSubmatch(line); m != nil {
			pkg = m[1]
			continue
		}
		if m := statusRe.FindStringSubmatch(line); m != nil {
			current = procsRe.ReplaceAllString(m[2], "")
			res := get(pkg, current)
			switch m[1] {
			case "SKIP":
				res.Skipped = firstOr(res.Log, "skipped without a reason")
			case "FAIL":
				res.Failed = lastOr(res.Log, "failed without a message")
			}
			continue
		}
		if m := nameRe.FindStringSubmatch(line); m != nil {
			current = procsRe.ReplaceAllString(m[1], "")
			get(pkg, current)
			line = line[len(m[1]):]
		}
		if m := figuresRe.FindStringSubmatch(line); m != nil && current != "" {
			res := get(pkg, current)
			n, err := strconv.Atoi(m[1])
			if err != nil {
				return out, fmt.Errorf("benchmark %s: iteration count %q: %w", current, m[1], err)
			}
			metrics, err := parseMetrics(m[2])
			if err != nil {
				return out, fmt.Errorf("benchmark %s: %w", current, err)
			}
			res.Iterations, res.Metrics = n, metrics
			continue
		}
		if m := logRe.FindStringSubmatch(line); m != nil && current != "" && strings.TrimSpace(m[1]) != "" {
			res := get(pkg, current)
			res.Log = append(res.Log, m[1])
		}
	}
	if err := sc.Err(); err != nil {
		return out, fmt.Errorf("reading benchmark output: %w", err)
	}
	// Parents of sub-benchmarks report nothing themselves; drop them.
	kept := out.Results[:0]
	for _, r := range out.Results {
		if r.Metrics == nil && r.Skipped == "" && r.Failed == "" && hasChild(out.Results, r.Name) {
			continue
		}
		kept = append(kept, r)
	}
	out.Results = kept
	return out, nil
}

func parseMetrics(s string) (map[string]float64, error) {
	metrics := map[string]float64{}
	for _, field := range strings.Split(strings.Trim(s, "\t "), "\t") {
		parts := strings.Fields(field)
		if len(parts) != 2 {
			return nil, fmt.Errorf("metric %q: want \"value unit\"", field)
		}
		v, err := strconv.ParseFloat(parts[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metric %q: %w", field, err)
		}
		metrics[parts[1]] = v
	}
	return metrics, nil
}

func hasChild(rs []Result, name string) bool {
	for _, r := range rs {
		if strings.HasPrefix(r.Name, name+"/") {
			return true
		}
	}
	return false
}

func firstOr(lines []string, fallback string) string {
	if len(lines) == 0 {
		return fallback
	}
	return lines[0]
}

func lastOr(lines []string, fallback string) string {
	if len(lines) == 0 {
		return fallback
	}
	return lines[len(lines)-1]
}

// Find returns the result named name (without the GOMAXPROCS suffix).
func (o Output) Find(name string) (Result, bool) {
	for _, r := range o.Results {
		if r.Name == name {
			return r, true
		}
	}
	return Result{}, false
}

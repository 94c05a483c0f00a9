// Command benchrun runs every benchmark of the project and prints one
// table, each figure next to its reference measured in the same run, and
// writes it to bench-results/ as Markdown and JSON, with the raw output
// beside them. scripts/bench runs it; docs/bench.md explains each row.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/agentd/agent/internal/benchtable"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if len(os.Args) > 1 && os.Args[1] == loadSSHChildArg {
		os.Exit(loadSSHChildMain(ctx, os.Args))
	}
	if len(os.Args) == 4 && os.Args[1] == deploymentChildArg {
		uid, _ := strconv.Atoi(os.Args[3])
		if err := deploymentChild(ctx, os.Args[2], uid); err != nil {
			fmt.Fprintln(os.Stderr, "bench deployment:", err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) == 4 && os.Args[1] == loadPFChildArg {
		requests, _ := strconv.Atoi(os.Args[3])
		if err := loadPortForwardChild(ctx, os.Args[2], requests); err != nil {
			fmt.Fprintln(os.Stderr, "bench load-portforward:", err)
			os.Exit(1)
		}
		return
	}
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	var some errSomeFailed
	switch {
	case errors.As(err, &some):
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	case err != nil:
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
}

// errSomeFailed: the table was written, but some rows failed.
type errSomeFailed int

func (e errSomeFailed) Error() string {
	return fmt.Sprintf("%d row(s) failed; the raw output is in the .log file", int(e))
}

// step is one part of the run, named for -only.
type step struct {
	key string
	run func(ctx context.Context, log io.Writer) []benchtable.Row
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	outDir := fs.String("out", "bench-results", "directory for the table (.md, .json) and the raw output (.log)")
	only := fs.String("only", "", "comma-separated steps to run (binary, deployment, load-portforward, load-ssh, tailnet, derp1280, sshd, portforward, coordinator, netcheck, paths); default all")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q; see -h", fs.Args())
	}
	if mod, err := os.ReadFile("go.mod"); err != nil || !strings.Contains(string(mod), "module github.com/agentd/agent\n") {
		return errors.New("run from the repository's root (scripts/bench does)")
	}
	sz, err := sizesFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "agent-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	started := time.Now().UTC()
	commit, dirty := gitCommit(ctx)
	base, err := resultBase(*outDir, started, commit, dirty)
	if err != nil {
		return err
	}
	logFile, err := os.Create(base + ".log")
	if err != nil {
		return fmt.Errorf("create the raw output file: %w", err)
	}
	defer logFile.Close()
	loadStart := loadAverage()

	bin := filepath.Join(tmp, "agent")
	var buildErr error
	steps := []step{{key: "binary", run: func(ctx context.Context, log io.Writer) []benchtable.Row {
		size, err := buildStripped(ctx, log, bin)
		buildErr = err
		if err != nil {
			return []benchtable.Row{benchtable.Failed("agent binary size, stripped", err)}
		}
		target := benchtable.Value{Value: 30, Unit: "MB"}
		return []benchtable.Row{benchtable.Measured("agent binary size, stripped", benchtable.Value{Value: float64(size) / 1e6, Unit: "MB"},
			benchtable.Reference{Name: "target", Value: &target}, fmt.Sprintf("CGO_ENABLED=0 -trimpath -ldflags '-s -w', %s/%s", runtime.GOOS, runtime.GOARCH))}
	}}, {key: "deployment", run: func(ctx context.Context, log io.Writer) []benchtable.Row {
		if buildErr != nil {
			return failRows(deploymentRowNames, fmt.Errorf("the agent binary did not build: %w", buildErr))
		}
		return measureDeployment(ctx, log, bin)
	}}, {key: "load-portforward", run: func(ctx context.Context, log io.Writer) []benchtable.Row {
		if buildErr != nil {
			return failRows(loadPFRowNames(1000), fmt.Errorf("the agent binary did not build: %w", buildErr))
		}
		return measureLoadPortForward(ctx, log, bin)
	}}}
	keys := []string{"tailnet", "derp1280", "sshd", "portforward", "coordinator", "netcheck"}
	for i, g := range goBenches(sz) {
		steps = append(steps, step{key: keys[i], run: func(ctx context.Context, log io.Writer) []benchtable.Row {
			return g.run(ctx, log, sz.env())
		}})
	}
	steps = append(steps, pathsStep())
	steps = append(steps, step{key: "load-ssh", run: func(ctx context.Context, log io.Writer) []benchtable.Row {
		if buildErr != nil {
			return failRows(loadRowNames, fmt.Errorf("the agent binary did not build: %w", buildErr))
		}
		return measureLoadSSH(ctx, log, bin)
	}})
	wanted := map[string]bool{}
	if *only != "" {
		for _, k := range strings.Split(*only, ",") {
			if !slices.ContainsFunc(steps, func(s step) bool { return s.key == k }) {
				return fmt.Errorf("-only: no step %q", k)
			}
			wanted[k] = true
		}
		if (wanted["deployment"] || wanted["load-portforward"] || wanted["load-ssh"]) && !wanted["binary"] {
			wanted["binary"] = true // they run the binary it builds
		}
	}

	var rows []benchtable.Row
	for _, s := range steps {
		if len(wanted) > 0 && !wanted[s.key] {
			continue
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		fmt.Fprintf(stderr, "bench: %s ...", s.key)
		t := time.Now()
		got := s.run(ctx, logFile)
		fmt.Fprintf(stderr, " %s\n", time.Since(t).Round(time.Second))
		rows = append(rows, got...)
	}

	table := benchtable.Table{
		Title: fmt.Sprintf("Benchmarks %s %s", started.Format("2006-01-02 15:04 UTC"), commit),
		Header: []benchtable.Fact{
			{Name: "commit", Value: commit + map[bool]string{true: " with uncommitted changes", false: ""}[dirty]},
			{Name: "machine", Value: fmt.Sprintf("%d CPUs, %s, %s", runtime.NumCPU(), runtime.Version(), whoami())},
			{Name: "load average (1, 5, 15 min)", Value: fmt.Sprintf("at start %s; at end %s (shared machine: compare figures with their reference, not across runs alone)", loadStart, loadAverage())},
			{Name: "sizes", Value: strings.Join(sz.env(), " ")},
			{Name: "duration", Value: time.Since(started).Round(time.Second).String()},
		},
		Rows: rows,
	}
	md := table.Markdown()
	data, err := table.JSON()
	if err != nil {
		return err
	}
	if err := os.WriteFile(base+".md", []byte(md), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(base+".json", data, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s\nwritten: %s.md %s.json (raw output: %s.log)\n", md, base, base, base)
	failed := 0
	for _, r := range rows {
		if r.Status == benchtable.StatusFailed {
			failed++
		}
	}
	if failed > 0 {
		return errSomeFailed(failed)
	}
	return nil
}

// buildStripped builds the agent as releases are built and returns its size.
func buildStripped(ctx context.Context, log io.Writer, out string) (int64, error) {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, "./cmd/agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = log, log
	fmt.Fprintf(log, "\n$ CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o %s ./cmd/agent\n", out)
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("go build ./cmd/agent: %w (see the log)", err)
	}
	fi, err := os.Stat(out)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func gitCommit(ctx context.Context) (sha string, dirty bool) {
	out, err := exec.CommandContext(ctx, "git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown-commit", false
	}
	status, _ := exec.CommandContext(ctx, "git", "status", "--porcelain", "--untracked-files=no").Output()
	return strings.TrimSpace(string(out)), len(strings.TrimSpace(string(status))) > 0
}

// resultBase is the path of this run's files without extension:
// DIR/<date>-<sha>[-dirty], with -2, -3... when that exists already.
func resultBase(dir string, t time.Time, commit string, dirty bool) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	name := t.Format("2006-01-02") + "-" + commit
	if dirty {
		name += "-dirty"
	}
	base := filepath.Join(dir, name)
	for i := 2; ; i++ {
		if _, err := os.Stat(base + ".md"); errors.Is(err, os.ErrNotExist) {
			return base, nil
		}
		base = filepath.Join(dir, fmt.Sprintf("%s-%d", name, i))
	}
}

func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func whoami() string {
	if os.Geteuid() == 0 {
		return "as root"
	}
	return fmt.Sprintf("as uid %d (benchmarks needing root are skipped)", os.Geteuid())
}

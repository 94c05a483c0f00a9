// Package sshconfig keeps a managed block in an OpenSSH client config
// (~/.ssh/config) so that `ssh NAME.agent` reaches workspace NAME through
// `agent ssh --stdio`. Everything outside the block is preserved byte for
// byte; a second run updates the block in place and never duplicates it.
package sshconfig

import (
	"github.com/agentd/agent/internal/atomicfile"

	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

const (
	beginMarker = "# ------------ START agent config-ssh (managed: edits between these markers are overwritten) ------------"
	endMarker   = "# ------------ END agent config-ssh ------------"
)

// DefaultSuffix is the host name suffix that marks a workspace.
const DefaultSuffix = "agent"

// Options describe the block.
type Options struct {
	// AgentPath is the absolute path of the agent binary that ProxyCommand runs.
	AgentPath string
	// Suffix is the host suffix, default "agent": `ssh ws1.agent`.
	Suffix string
}

// Block renders the managed block, markers included, ending in a newline.
//
// ProxyCommand gets %h, the host name as OpenSSH resolved it: lower-cased
// and after any HostName substitution, so "ssh WS1.agent" and an alias
// with "HostName ws1.agent" both hand `agent ssh --stdio` the name
// "ws1.agent", from which it strips the suffix.
//
// Host keys are checked strictly against the one the coordinator vouches
// for: KnownHostsCommand asks `agent ssh --known-hosts %H` for it (the key
// the workspace's agent proved holding, pinned at its first registration),
// and no other file is consulted, so an agent holding any other key meets
// OpenSSH's own "REMOTE HOST IDENTIFICATION HAS CHANGED" refusal. A rebuilt
// workspace is accepted once an admin resets its pinned identity.
func Block(opts Options) (string, error) {
	if !filepath.IsAbs(opts.AgentPath) {
		return "", fmt.Errorf("agent path %q is not absolute", opts.AgentPath)
	}
	suffix := strings.Trim(opts.Suffix, ".")
	if suffix == "" {
		suffix = DefaultSuffix
	}
	if strings.ContainsAny(suffix, " \t*?!,%\"'") {
		return "", fmt.Errorf("host suffix %q must be a plain DNS label", opts.Suffix)
	}
	var b strings.Builder
	b.WriteString(beginMarker + "\n")
	fmt.Fprintf(&b, "# Workspaces are reachable as NAME.%s: ssh ws1.%s, scp file ws1.%s:, VS Code Remote-SSH.\n", suffix, suffix, suffix)
	b.WriteString("# Host keys are checked against the key the coordinator vouches for (agent ssh --known-hosts).\n")
	fmt.Fprintf(&b, "Host *.%s\n", suffix)
	fmt.Fprintf(&b, "    ProxyCommand %s ssh --stdio %%h\n", proxyQuote(opts.AgentPath))
	fmt.Fprintf(&b, "    KnownHostsCommand %s ssh --known-hosts %%H\n", proxyQuote(opts.AgentPath))
	b.WriteString("    StrictHostKeyChecking yes\n")
	b.WriteString("    UserKnownHostsFile /dev/null\n")
	b.WriteString("    GlobalKnownHostsFile /dev/null\n")
	b.WriteString("    LogLevel ERROR\n")
	b.WriteString(endMarker + "\n")
	return b.String(), nil
}

// proxyQuote quotes a path for ProxyCommand, which OpenSSH runs with
// "exec" through the user's shell after expanding % tokens.
func proxyQuote(path string) string {
	path = strings.ReplaceAll(path, "%", "%%")
	if strings.IndexFunc(path, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./+%", r))
	}) < 0 {
		return path
	}
	return "'" + strings.ReplaceAll(path, "'", `'\''`) + "'"
}

// Apply returns config with the managed block set to block: replaced where
// it already is, otherwise inserted before the first Host or Match line (so
// the user's global options stay global and the block's values win over a
// later "Host *"), or appended when there is none.
func Apply(config []byte, block string) ([]byte, error) {
	text := string(config)
	begin := strings.Index(text, beginMarker)
	end := strings.Index(text, endMarker)
	switch {
	case begin >= 0 && end > begin:
		if strings.Count(text, beginMarker) > 1 || strings.Count(text, endMarker) > 1 {
			return nil, errors.New("the ssh config contains the agent block more than once; remove the extra copies and run again")
		}
		stop := end + len(endMarker)
		if stop < len(text) && text[stop] == '\n' {
			stop++
		}
		return []byte(text[:begin] + block + text[stop:]), nil
	case begin >= 0 || end >= 0:
		return nil, errors.New("the ssh config has only one of the agent block's START/END markers; fix or remove it and run again")
	}

	lines := strings.SplitAfter(text, "\n")
	offset := 0
	for _, line := range lines {
		fields := strings.Fields(line)
		if len(fields) > 0 {
			kw := strings.ToLower(strings.SplitN(fields[0], "=", 2)[0])
			if kw == "host" || kw == "match" {
				return []byte(text[:offset] + block + "\n" + text[offset:]), nil
			}
		}
		offset += len(line)
	}
	if text != "" && !strings.HasSuffix(text, "\n") {
		text += "\n"
	}
	if text != "" {
		text += "\n"
	}
	return []byte(text + block), nil
}

// Result says what Update did.
type Result struct {
	Path    string // the file written (symlinks resolved)
	Backup  string // copy of the previous contents; empty for a new file
	Changed bool
	Old     []byte
	New     []byte
}

// Update applies block to the config file at path. With dryRun it only
// computes the result. Writes are atomic (temporary file and rename), keep
// the file's mode, and leave the previous contents in path+".agent.bak".
func Update(path, block string, dryRun bool) (Result, error) {
	if resolved, err := filepath.EvalSymlinks(path); err == nil {
		path = resolved
	}
	res := Result{Path: path}
	mode := fs.FileMode(0o600)
	old, err := os.ReadFile(path)
	switch {
	case err == nil:
		if fi, serr := os.Stat(path); serr == nil {
			mode = fi.Mode().Perm()
		}
	case errors.Is(err, fs.ErrNotExist):
		old = nil
	default:
		return res, fmt.Errorf("read ssh config: %w", err)
	}
	updated, err := Apply(old, block)
	if err != nil {
		return res, fmt.Errorf("%s: %w", path, err)
	}
	res.Old, res.New = old, updated
	res.Changed = !bytes.Equal(old, updated)
	if dryRun || !res.Changed {
		return res, nil
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return res, fmt.Errorf("create %s: %w", dir, err)
	}
	if old != nil {
		res.Backup = path + ".agent.bak"
		if err := writeAtomic(res.Backup, old, mode); err != nil {
			return res, fmt.Errorf("back up ssh config: %w", err)
		}
	}
	if err := writeAtomic(path, updated, mode); err != nil {
		return res, fmt.Errorf("write ssh config: %w", err)
	}
	return res, nil
}

func writeAtomic(path string, data []byte, mode fs.FileMode) error {
	return atomicfile.Write(path, data, mode)
}

// Diff renders a line diff of old and new (unified-style, 2 lines of
// context) for --dry-run.
func Diff(name string, old, new []byte) string {
	a, b := splitLines(old), splitLines(new)
	// Longest common subsequence; ssh configs are small.
	lcs := make([][]int, len(a)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(b)+1)
	}
	for i := len(a) - 1; i >= 0; i-- {
		for j := len(b) - 1; j >= 0; j-- {
			if a[i] == b[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	type line struct {
		op   byte
		text string
	}
	var ops []line
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case i < len(a) && j < len(b) && a[i] == b[j]:
			ops = append(ops, line{' ', a[i]})
			i++
			j++
		case j < len(b) && (i == len(a) || lcs[i][j+1] >= lcs[i+1][j]):
			ops = append(ops, line{'+', b[j]})
			j++
		default:
			ops = append(ops, line{'-', a[i]})
			i++
		}
	}
	var out strings.Builder
	fmt.Fprintf(&out, "--- %s\n+++ %s (after agent config-ssh)\n", name, name)
	const context = 2
	lastPrinted := -1
	for k, op := range ops {
		if op.op == ' ' {
			near := false
			for d := -context; d <= context; d++ {
				if k+d >= 0 && k+d < len(ops) && ops[k+d].op != ' ' {
					near = true
				}
			}
			if !near {
				continue
			}
		}
		if lastPrinted >= 0 && k > lastPrinted+1 {
			out.WriteString("@@\n")
		}
		out.WriteByte(op.op)
		out.WriteString(op.text)
		out.WriteByte('\n')
		lastPrinted = k
	}
	return out.String()
}

func splitLines(b []byte) []string {
	s := strings.TrimSuffix(string(b), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

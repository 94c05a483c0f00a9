// Package netcheck is the network self-diagnostic: it checks a workspace's
// own network from the inside (links, addresses, routes, active round trips
// to the gateway, path MTU, DNS, HTTPS to the coordinator, clock, proxies,
// relay and UDP) and a node's container networking from the outside (bridges,
// veth attachment, systemd-networkd and udev configuration), and says for
// every problem what is wrong, the evidence, and the exact fix.
//
// Probes are trusted over state: a pod whose host-side bridge is gone still
// sees eth0 up with an address and a route, so only a round trip proves the
// path.
package netcheck

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// SchemaVersion is the version of the JSON report. It changes only when a
// field changes meaning or disappears; new fields may appear at any time.
const SchemaVersion = 1

// Status is the state of a check, a finding or the whole report.
type Status string

const (
	StatusOK       Status = "ok"
	StatusDegraded Status = "degraded"
	StatusBroken   Status = "broken"
	// StatusSkipped: the check could not run here (no permission, nothing to
	// check, or it depends on a check that failed).
	StatusSkipped Status = "skipped"
)

func (s Status) rank() int {
	switch s {
	case StatusBroken:
		return 3
	case StatusDegraded:
		return 2
	case StatusOK:
		return 1
	}
	return 0
}

// Worse returns the more severe of two statuses.
func Worse(a, b Status) Status {
	if b.rank() > a.rank() {
		return b
	}
	return a
}

// Report is the result of one run.
type Report struct {
	Version int `json:"version"`
	// Mode is "workspace" (inside a pod or container) or "host" (on a node).
	Mode string `json:"mode"`
	// Scope is "full", or "quick" for the watch loop's fast probe (local
	// state and the gateway round trip only).
	Scope      string    `json:"scope"`
	Status     Status    `json:"status"`
	Summary    string    `json:"summary"`
	Started    time.Time `json:"started"`
	DurationMS int64     `json:"duration_ms"`
	Checks     []Check   `json:"checks"`
	// Findings are every problem, worst first.
	Findings []Finding `json:"findings"`
}

// Check is one diagnostic step.
type Check struct {
	ID         string `json:"id"`
	Title      string `json:"title"`
	Status     Status `json:"status"`
	Summary    string `json:"summary"`
	DurationMS int64  `json:"duration_ms"`
	// Details are measured facts with check-specific keys (see
	// docs/netcheck.md).
	Details map[string]any `json:"details,omitempty"`
}

// Finding is one problem: what is wrong, the evidence, and the fix.
type Finding struct {
	// Code is stable ("gateway.unreachable"), for alerting and docs.
	Code     string   `json:"code"`
	Check    string   `json:"check"`
	Severity Status   `json:"severity"`
	Problem  string   `json:"problem"`
	Evidence []string `json:"evidence,omitempty"`
	Remedy   Remedy   `json:"remedy"`
}

// Remedy is the exact fix.
type Remedy struct {
	Text     string       `json:"text"`
	Commands []string     `json:"commands,omitempty"`
	Files    []FileChange `json:"files,omitempty"`
}

// FileChange is a file to write as part of a fix.
type FileChange struct {
	Path    string `json:"path"`
	Content string `json:"content"`
}

// ExitCode is the process exit status for the report: 0 healthy, 1
// degraded, 2 broken.
func (r *Report) ExitCode() int {
	switch r.Status {
	case StatusBroken:
		return 2
	case StatusDegraded:
		return 1
	}
	return 0
}

// Healthy reports whether nothing is wrong.
func (r *Report) Healthy() bool { return r.Status == StatusOK }

// Check returns the check with the given ID, or nil.
func (r *Report) Check(id string) *Check {
	for i := range r.Checks {
		if r.Checks[i].ID == id {
			return &r.Checks[i]
		}
	}
	return nil
}

// Finding returns the first finding with the given code, or nil.
func (r *Report) Finding(code string) *Finding {
	for i := range r.Findings {
		if r.Findings[i].Code == code {
			return &r.Findings[i]
		}
	}
	return nil
}

// Finish orders findings worst first, derives the overall status and a
// one-line summary.
func (r *Report) Finish(started time.Time) {
	r.Version = SchemaVersion
	r.Started = started
	r.DurationMS = time.Since(started).Milliseconds()
	sort.SliceStable(r.Findings, func(i, j int) bool {
		return r.Findings[i].Severity.rank() > r.Findings[j].Severity.rank()
	})
	// Always arrays in JSON, never null: consumers index them directly.
	if r.Findings == nil {
		r.Findings = []Finding{}
	}
	if r.Checks == nil {
		r.Checks = []Check{}
	}
	r.Status = StatusOK
	for _, f := range r.Findings {
		r.Status = Worse(r.Status, f.Severity)
	}
	for _, c := range r.Checks {
		if c.Status == StatusBroken || c.Status == StatusDegraded {
			r.Status = Worse(r.Status, c.Status)
		}
	}
	if r.Summary == "" {
		switch {
		case len(r.Findings) > 0:
			r.Summary = r.Findings[0].Problem
		default:
			r.Summary = fmt.Sprintf("%s network healthy (%d checks)", r.Mode, len(r.Checks))
		}
	}
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteJSONLine writes the report as one line of JSON (the --watch --json
// stream: one document per line).
func (r *Report) WriteJSONLine(w io.Writer) error {
	return json.NewEncoder(w).Encode(r)
}

// ChangeKey identifies what a report says (status, summary, finding
// codes), so a watcher can tell a change from the same verdict again.
func (r *Report) ChangeKey() string {
	codes := make([]string, 0, len(r.Findings))
	for _, f := range r.Findings {
		codes = append(codes, f.Code+"/"+string(f.Severity))
	}
	sort.Strings(codes)
	return string(r.Status) + "\x00" + r.Summary + "\x00" + strings.Join(codes, ",")
}

// WriteText writes the readable report.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "agent netcheck (%s): %s, %s (%d ms)\n\n", r.Mode, strings.ToUpper(string(r.Status)), r.Summary, r.DurationMS)
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "  %-5s %-15s %s\n", label(c.Status), c.ID, c.Summary)
	}
	if len(r.Findings) > 0 {
		b.WriteString("\nFindings:\n")
	}
	shown := map[string]bool{}
	for i, f := range r.Findings {
		fmt.Fprintf(&b, "\n%d. [%s] %s (%s)\n", i+1, f.Severity, f.Problem, f.Code)
		for _, e := range f.Evidence {
			fmt.Fprintf(&b, "   evidence: %s\n", e)
		}
		if f.Remedy.Text != "" {
			fmt.Fprintf(&b, "   fix: %s\n", f.Remedy.Text)
		}
		for _, c := range f.Remedy.Commands {
			fmt.Fprintf(&b, "     $ %s\n", c)
		}
		for _, fc := range f.Remedy.Files {
			if shown[fc.Path] {
				fmt.Fprintf(&b, "     write %s (content above)\n", fc.Path)
				continue
			}
			shown[fc.Path] = true
			fmt.Fprintf(&b, "     write %s:\n", fc.Path)
			for _, line := range strings.Split(strings.TrimRight(fc.Content, "\n"), "\n") {
				fmt.Fprintf(&b, "       | %s\n", line)
			}
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func label(s Status) string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusDegraded:
		return "WARN"
	case StatusBroken:
		return "FAIL"
	}
	return "skip"
}

// CheckBuilder is a Check under construction with its findings; the
// workspace and node checks both build their reports with it.
type CheckBuilder struct {
	Check
	Findings []Finding
	start    time.Time
}

// NewCheck starts a check that is OK until a finding says otherwise.
func NewCheck(id, title string) *CheckBuilder {
	return &CheckBuilder{Check: Check{ID: id, Title: title, Status: StatusOK, Details: map[string]any{}}, start: time.Now()}
}

// Detail records a measured fact.
func (c *CheckBuilder) Detail(k string, v any) { c.Details[k] = v }

// Fail records a finding and lowers the check's status to its severity.
func (c *CheckBuilder) Fail(sev Status, code, problem string, evidence []string, remedy Remedy) {
	c.Findings = append(c.Findings, Finding{
		Code: code, Check: c.ID, Severity: sev, Problem: problem, Evidence: evidence, Remedy: remedy,
	})
	c.Status = Worse(c.Status, sev)
}

// Skip marks the check as not run here, saying why.
func (c *CheckBuilder) Skip(why string) {
	c.Status = StatusSkipped
	c.Summary = why
}

// Done stamps the duration.
func (c *CheckBuilder) Done() *CheckBuilder {
	c.DurationMS = time.Since(c.start).Milliseconds()
	if len(c.Details) == 0 {
		c.Details = nil
	}
	return c
}

// Brief is the short form of a report that the running agent publishes on
// its health endpoint and sends to the coordinator, e.g. {"status":"broken",
// "summary":"workspace network broken past eth0: ...","codes":["gateway.unreachable"]}.
type Brief struct {
	Status  Status    `json:"status"`
	Summary string    `json:"summary"`
	Codes   []string  `json:"codes,omitempty"`
	At      time.Time `json:"at"`
}

// Brief returns the report's short form.
func (r *Report) Brief() Brief {
	b := Brief{Status: r.Status, Summary: r.Summary, At: r.Started}
	for _, f := range r.Findings {
		b.Codes = append(b.Codes, f.Code)
	}
	return b
}

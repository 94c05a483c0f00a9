package benchtable

import (
	"encoding/json"
	"fmt"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Value is a number with its unit.
type Value struct {
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
}

func (v Value) String() string { return formatNumber(v.Value) + " " + v.Unit }

// Reference is what a figure is compared with: a measurement of the same
// run, or a target.
type Reference struct {
	// Name says what the reference is, e.g. "loopback TCP" or "target".
	Name string `json:"name"`
	// Value is nil when the reference could not be measured (Note says why).
	Value *Value `json:"value,omitempty"`
	Note  string `json:"note,omitempty"`
}

// Status of a row.
const (
	StatusOK      = "ok"
	StatusSkipped = "skipped"
	StatusFailed  = "failed"
)

// Row is one line of the table.
type Row struct {
	Name      string     `json:"name"`
	Status    string     `json:"status"`
	Figure    *Value     `json:"figure,omitempty"`
	Reference *Reference `json:"reference,omitempty"`
	// Ratio is figure divided by reference when both exist in one unit.
	Ratio *float64 `json:"ratio,omitempty"`
	// Note is the reason of a skip or failure, or a detail of the figure.
	Note string `json:"note,omitempty"`
}

// Skipped is a row whose measurement could not run here.
func Skipped(name, reason string) Row { return Row{Name: name, Status: StatusSkipped, Note: reason} }

// Failed is a row whose measurement broke.
func Failed(name string, err error) Row {
	return Row{Name: name, Status: StatusFailed, Note: oneLine(err.Error())}
}

// Measured is a row with a figure and its reference; it computes the ratio.
func Measured(name string, figure Value, ref Reference, note string) Row {
	r := Row{Name: name, Status: StatusOK, Figure: &figure, Reference: &ref, Note: note}
	if ref.Value != nil && ref.Value.Unit == figure.Unit && ref.Value.Value != 0 {
		ratio := figure.Value / ref.Value.Value
		r.Ratio = &ratio
	}
	return r
}

// Pick names one figure in parsed output: a metric a benchmark reported,
// or, with Line set, the first number a printed line of the output
// captures (for figures a benchmark prints without reporting them).
type Pick struct {
	// Bench is the benchmark's full name without the GOMAXPROCS suffix.
	Bench string
	// Metric is the unit the benchmark reported, e.g. "tailnet-MB/s".
	Metric string
	// Line, if set, is matched against every output line instead; its
	// first group is the number.
	Line *regexp.Regexp
	// Unit is the unit shown in the table, e.g. "MB/s".
	Unit string
}

// Value finds the picked figure. An error says why there is none: the
// benchmark (or its parent) was skipped or failed, or reported nothing.
func (o Output) Value(p Pick) (Value, string, error) {
	res, ok := o.lookup(p.Bench)
	switch {
	case !ok:
		return Value{}, StatusFailed, fmt.Errorf("%s reported nothing", p.Bench)
	case res.Skipped != "":
		return Value{}, StatusSkipped, fmt.Errorf("%s", res.Skipped)
	case res.Failed != "":
		return Value{}, StatusFailed, fmt.Errorf("%s: %s", res.Name, res.Failed)
	}
	if p.Line != nil {
		for _, l := range o.Lines {
			if m := p.Line.FindStringSubmatch(l); len(m) > 1 {
				v, err := strconv.ParseFloat(m[1], 64)
				if err == nil {
					return Value{Value: v, Unit: p.Unit}, StatusOK, nil
				}
			}
		}
		return Value{}, StatusFailed, fmt.Errorf("%s printed no line matching %q", p.Bench, p.Line)
	}
	v, ok := res.Metrics[p.Metric]
	if !ok {
		return Value{}, StatusFailed, fmt.Errorf("%s reported no %s", p.Bench, p.Metric)
	}
	return Value{Value: v, Unit: p.Unit}, StatusOK, nil
}

// lookup finds a result, or the closest parent that was skipped or failed
// (its sub-benchmarks then never ran).
func (o Output) lookup(name string) (Result, bool) {
	for n := name; ; {
		if r, ok := o.Find(n); ok && (n == name || r.Skipped != "" || r.Failed != "") {
			return r, true
		}
		i := strings.LastIndex(n, "/")
		if i < 0 {
			return Result{}, false
		}
		n = n[:i]
	}
}

// Compare makes the row of a figure and a reference that both come from
// benchmark output; refName says what the reference is.
func (o Output) Compare(name string, figure Pick, refName string, ref Pick, note string) Row {
	fv, status, err := o.Value(figure)
	if err != nil {
		return Row{Name: name, Status: status, Note: oneLine(err.Error())}
	}
	r := Reference{Name: refName}
	if rv, _, err := o.Value(ref); err != nil {
		r.Note = oneLine(err.Error())
	} else {
		r.Value = &rv
	}
	return Measured(name, fv, r, note)
}

// Table is a whole run: a header of facts about it and the rows.
type Table struct {
	Title string `json:"title"`
	// Header holds facts about the run in order (commit, load, machine).
	Header []Fact `json:"header"`
	Rows   []Row  `json:"rows"`
}

// Fact is one header line.
type Fact struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Markdown renders the table for people.
func (t Table) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# %s\n\n", t.Title)
	for _, f := range t.Header {
		fmt.Fprintf(&b, "- %s: %s\n", f.Name, escape(f.Value))
	}
	b.WriteString("\n| benchmark | figure | reference (same run) | figure ÷ reference | notes |\n")
	b.WriteString("|---|---:|---|---:|---|\n")
	for _, r := range t.Rows {
		figure, ref, ratio := "", "", ""
		switch r.Status {
		case StatusOK:
			figure = r.Figure.String()
		default:
			figure = r.Status
		}
		if r.Reference != nil {
			ref = r.Reference.Name
			switch {
			case r.Reference.Value != nil:
				ref += ": " + r.Reference.Value.String()
			case r.Reference.Note != "":
				ref += ": n/a (" + r.Reference.Note + ")"
			default:
				ref += ": n/a"
			}
		}
		if r.Ratio != nil {
			ratio = formatNumber(*r.Ratio)
		}
		note := r.Note
		if r.Status != StatusOK {
			note = r.Status + ": " + r.Note
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", escape(r.Name), escape(figure), escape(ref), ratio, escape(note))
	}
	return b.String()
}

// JSON renders the table for programs.
func (t Table) JSON() ([]byte, error) {
	data, err := json.MarshalIndent(t, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// formatNumber shows three significant digits (whole numbers from 100
// up), which is as much as a shared machine's measurements can tell.
func formatNumber(v float64) string {
	a := math.Abs(v)
	if a == 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	digits := max(0, 2-int(math.Floor(math.Log10(a))))
	return strconv.FormatFloat(v, 'f', digits, 64)
}

func escape(s string) string { return strings.ReplaceAll(oneLine(s), "|", `\|`) }

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	const limit = 300
	if len(s) > limit {
		s = s[:limit] + "…"
	}
	return s
}

// Median returns the median of v (the mean of the middle two for an even
// count), 0 for none. Benchmarks that alternate rounds report it, since
// one disturbed round on a shared machine moves it least.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

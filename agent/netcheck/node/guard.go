package node

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/agentd/agent/agent/netcheck/internal/netstate"
	"io"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/agentd/agent/agent/netcheck/networkd"
)

// Guard file names. They sort before distribution defaults (which use 50-
// and up) so the first-match rule selects them.
const (
	guardNetworkName = "10-agent-container-ifaces.network"
	guardLinkName    = "10-agent-container-ifaces.link"
	guardEarlyPrefix = "00-"
	guardConfPath    = "/etc/systemd/networkd.conf.d/10-agent-keep-foreign.conf"
	guardDir         = "/etc/systemd/network"
)

// GuardOptions adds to Options what the guard needs.
type GuardOptions struct {
	// Patterns are extra interface-name globs to mark unmanaged. A pattern
	// that matches the host's uplink is refused.
	Patterns []string
}

// GuardPlan is the set of files that keep systemd-networkd and udev off
// container interfaces.
type GuardPlan struct {
	Root string `json:"root"`
	// Globs are the interface-name patterns the guard covers.
	Globs []string `json:"globs"`
	// Protected are the uplink interfaces no pattern may match.
	Protected []string `json:"protected"`
	// Dropped are default patterns left out because they match an uplink,
	// with the explicit names used instead.
	Dropped []string      `json:"dropped,omitempty"`
	Files   []PlannedFile `json:"files"`
}

// PlannedFile is one file of the plan.
type PlannedFile struct {
	// Path is the node path (without the root).
	Path    string `json:"path"`
	Content string `json:"content"`
	// Current is the content on disk now, "" if none.
	Current string `json:"current,omitempty"`
	// Change is "create", "update" or "unchanged".
	Change string `json:"change"`
}

// PlanGuard computes the guard for the node: which names to cover (the
// usual runtime/CNI patterns plus the container interfaces present),
// without any pattern matching the uplink, and file names that sort before
// any .network/.link file that would otherwise match.
func PlanGuard(opts Options, extra ...GuardOptions) (*GuardPlan, error) {
	o := opts.withDefaults()
	st, err := netstate.Read()
	if err != nil {
		return nil, err
	}
	inv := takeInventory(st, &o)
	plan := &GuardPlan{Root: o.Root, Protected: inv.protected}
	protectedMatch := func(g string) []string {
		var hit []string
		for _, p := range inv.protected {
			if matchesAny([]string{g}, p) {
				hit = append(hit, p)
			}
		}
		return hit
	}
	for _, e := range extra {
		for _, g := range e.Patterns {
			if strings.ContainsAny(g, " \t\n") || g == "" {
				return nil, fmt.Errorf("pattern %q: want one glob without spaces", g)
			}
			if hit := protectedMatch(g); len(hit) > 0 {
				return nil, fmt.Errorf("refusing pattern %q: it matches the host's uplink %s, and unmanaging that would cut the node off", g, strings.Join(hit, ", "))
			}
			plan.Globs = append(plan.Globs, g)
		}
	}
	var explicit []string
	for _, g := range containerGlobs() {
		if hit := protectedMatch(g); len(hit) > 0 {
			plan.Dropped = append(plan.Dropped, fmt.Sprintf("%s (matches uplink %s)", g, strings.Join(hit, ", ")))
			for _, l := range inv.container {
				if matchesAny([]string{g}, l.Attrs().Name) {
					explicit = append(explicit, l.Attrs().Name)
				}
			}
			continue
		}
		plan.Globs = append(plan.Globs, g)
	}
	// Container interfaces present, and expected bridges, that no pattern
	// covers yet get their own name.
	for _, l := range inv.container {
		explicit = append(explicit, l.Attrs().Name)
	}
	for _, e := range inv.expected {
		explicit = append(explicit, e.name)
	}
	for _, n := range explicit {
		if !matchesAny(plan.Globs, n) && len(protectedMatch(n)) == 0 {
			plan.Globs = append(plan.Globs, n)
		}
	}
	plan.Globs = dedupe(plan.Globs)

	cfg, err := networkd.Load(o.Root)
	if err != nil {
		return nil, err
	}
	subj := subjects(inv)
	netName, err := guardName(guardNetworkName, cfg.Networks, subj, func(f *networkd.File, ifc networkd.Interface) bool {
		return networkd.Match(f.Unit, ifc, false).Matches
	})
	if err != nil {
		return nil, err
	}
	linkName, err := guardName(guardLinkName, cfg.Links, subj, func(f *networkd.File, ifc networkd.Interface) bool {
		r := networkd.Match(f.Unit, ifc, true)
		return r.Matches && !r.Empty
	})
	if err != nil {
		return nil, err
	}
	globs := strings.Join(plan.Globs, " ")
	header := "# Written by `agent netcheck --host --fix`. Container interfaces belong to the\n" +
		"# container runtime and CNI plugins; systemd-networkd managing them removes\n" +
		"# their addresses and bridge membership (and udev rewriting their MAC\n" +
		"# breaks neighbour entries the CNI programmed).\n"
	files := []PlannedFile{
		{Path: filepath.Join(guardDir, netName), Content: header + "[Match]\nName=" + globs + "\n\n[Link]\nUnmanaged=yes\n"},
		{Path: filepath.Join(guardDir, linkName), Content: header + "[Match]\nOriginalName=" + globs + "\n\n[Link]\nMACAddressPolicy=none\n"},
		{Path: guardConfPath, Content: header + "[Network]\nManageForeignRoutes=no\nManageForeignRoutingPolicyRules=no\n"},
	}
	for i := range files {
		cur, err := readUnder(o.Root, files[i].Path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			files[i].Change = "create"
		case err != nil:
			return nil, fmt.Errorf("reading %s: %w", files[i].Path, err)
		case string(cur) == files[i].Content:
			files[i].Current, files[i].Change = string(cur), "unchanged"
		default:
			files[i].Current, files[i].Change = string(cur), "update"
		}
	}
	plan.Files = files
	return plan, nil
}

func dedupe(in []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// guardName picks the guard file's name: the default, or the 00- variant
// when another file that matches a container interface sorts before the
// default. It refuses when even that is not first.
func guardName(def string, files []*networkd.File, subj []networkd.Interface, matches func(*networkd.File, networkd.Interface) bool) (string, error) {
	first := ""
	for _, f := range files {
		if f.Masked || f.Unit == nil || f.Name == def || f.Name == guardEarlyPrefix+def {
			continue
		}
		for _, ifc := range subj {
			if matches(f, ifc) {
				if first == "" || f.Name < first {
					first = f.Name
				}
				break
			}
		}
	}
	if first == "" || def < first {
		return def, nil
	}
	early := guardEarlyPrefix + def
	if early < first {
		return early, nil
	}
	return "", fmt.Errorf("%s matches container interfaces and sorts before any name the guard can take (%s); add Unmanaged=yes / MACAddressPolicy=none for container interfaces to it yourself", first, early)
}

// WriteText shows the plan: each file, whether it changes, and its content.
func (p *GuardPlan) WriteText(w io.Writer) error {
	var b bytes.Buffer
	fmt.Fprintf(&b, "networkd guard for interfaces: %s\n", strings.Join(p.Globs, " "))
	if len(p.Protected) > 0 {
		fmt.Fprintf(&b, "uplink (never matched): %s\n", strings.Join(p.Protected, ", "))
	}
	for _, d := range p.Dropped {
		fmt.Fprintf(&b, "left out: %s\n", d)
	}
	for _, f := range p.Files {
		fmt.Fprintf(&b, "\n%s %s\n", f.Change, filepath.Join(p.Root, f.Path))
		if f.Change == "unchanged" {
			continue
		}
		if f.Change == "update" {
			for _, l := range strings.Split(strings.TrimRight(f.Current, "\n"), "\n") {
				fmt.Fprintf(&b, "  - %s\n", l)
			}
		}
		for _, l := range strings.Split(strings.TrimRight(f.Content, "\n"), "\n") {
			fmt.Fprintf(&b, "  + %s\n", l)
		}
	}
	_, err := w.Write(b.Bytes())
	return err
}

// Changed reports whether applying the plan would change anything.
func (p *GuardPlan) Changed() bool {
	for _, f := range p.Files {
		if f.Change != "unchanged" {
			return true
		}
	}
	return false
}

// Apply writes the changed files atomically (temporary file, fsync,
// rename, fsync of the directory), never outside Root: every path is
// resolved inside it, and a symlink leading out is refused. Unchanged
// files are not touched, so applying twice is a no-op.
func (p *GuardPlan) Apply() error {
	for _, f := range p.Files {
		if f.Change == "unchanged" {
			continue
		}
		if err := writeUnder(p.Root, f.Path, []byte(f.Content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

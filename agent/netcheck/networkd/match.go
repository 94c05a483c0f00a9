package networkd

import (
	"path"
	"strings"
)

// Interface is what systemd's [Match] keys are tested against.
type Interface struct {
	// Name is the current name; OriginalName the kernel's name at creation
	// (used by .link files). Empty OriginalName means Name.
	Name         string
	OriginalName string
	AltNames     []string
	// Kind is IFLA_INFO_KIND ("veth", "bridge", "vxlan"; empty for physical
	// devices).
	Kind string
	// Type is networkctl's type: udev DEVTYPE when set ("bridge", "vxlan",
	// "wlan"), else the ARPHRD name ("ether", "loopback", "none").
	Type string
	// Driver is ethtool's driver name ("veth", "bridge", "e1000e").
	Driver string
	MAC    string
	// PermanentMAC is the hardware address for physical devices.
	PermanentMAC string
	// Path is udev's ID_PATH (empty for virtual devices).
	Path string
}

// testStrv is systemd's net_condition_test_strv: a pattern list matches when
// no "!"-pattern matches the string and, if there is any positive pattern,
// at least one positive pattern matches. An empty list matches everything.
func testStrv(patterns []string, s string) bool {
	if len(patterns) == 0 {
		return true
	}
	match, hasPositive := false, false
	for _, p := range patterns {
		invert := strings.HasPrefix(p, "!")
		p = strings.TrimPrefix(p, "!")
		if !invert {
			hasPositive = true
		}
		if s != "" && fnmatch(p, s) {
			if invert {
				return false
			}
			match = true
		}
	}
	if hasPositive {
		return match
	}
	return true
}

// testIfname tries the name, then each alternative name.
func testIfname(patterns []string, name string, alt []string) bool {
	if testStrv(patterns, name) {
		return true
	}
	for _, a := range alt {
		if testStrv(patterns, a) {
			return true
		}
	}
	return false
}

// fnmatch is fnmatch(3) with flags 0 for interface names, which never
// contain "/". A malformed pattern matches nothing, like fnmatch.
func fnmatch(pattern, s string) bool {
	ok, err := path.Match(pattern, s)
	return err == nil && ok
}

// strvList parses the values assigned to one list key: each assignment is a
// whitespace-separated list; a leading "!" inverts every word of that
// assignment; an empty assignment clears what came before (as systemd's
// config_parse_match_strv does).
func strvList(entries []Entry) []string {
	var out []string
	for _, e := range entries {
		v := strings.TrimSpace(e.Value)
		if v == "" {
			out = nil
			continue
		}
		invert := strings.HasPrefix(v, "!")
		v = strings.TrimPrefix(v, "!")
		for _, w := range strings.Fields(v) {
			if invert {
				w = "!" + w
			}
			out = append(out, w)
		}
	}
	return out
}

// macList parses MACAddress= style lists (whitespace separated, no
// negation in older versions; "!" honoured here as newer systemd does).
func macList(entries []Entry) []string {
	var out []string
	for _, w := range strvList(entries) {
		out = append(out, strings.ToLower(w))
	}
	return out
}

// systemConditions are [Match] keys that test the machine, not the link.
// The evaluator cannot judge them from a file tree and assumes they hold,
// which errs towards reporting a hazard.
var systemConditions = []string{"Host", "Virtualization", "KernelCommandLine", "KernelVersion", "Architecture", "Credential", "Firmware"}

// MatchResult says whether a [Match] section selects an interface.
type MatchResult struct {
	Matches bool
	// Empty: the section had no usable keys (for .network files that means
	// "matches everything").
	Empty bool
	// Assumed lists machine conditions taken as true.
	Assumed []string
	// Failed names the first key that did not match, for explanations.
	Failed string
}

// linkKeys are the link properties [Match] can test.
var linkKeys = []string{"Name", "OriginalName", "Kind", "Type", "Driver", "MACAddress", "PermanentMACAddress", "Path", "Property", "SSID", "BSSID", "WLANInterfaceType"}

// Match evaluates the [Match] sections of u against ifc. forLink selects
// .link semantics (OriginalName= instead of Name=).
func Match(u *Unit, ifc Interface, forLink bool) MatchResult {
	// Name= exists only in .network files and OriginalName= only in .link
	// files; systemd ignores the other one with a warning.
	ignored := "OriginalName"
	if forLink {
		ignored = "Name"
	}
	vals := func(key string) []Entry {
		if key == ignored {
			return nil
		}
		return u.Values("Match", key)
	}
	res := MatchResult{Matches: true, Empty: true}
	for _, k := range append(append([]string{}, linkKeys...), systemConditions...) {
		if len(vals(k)) > 0 {
			res.Empty = false
		}
	}
	fail := func(key string) MatchResult {
		res.Matches = false
		res.Failed = key
		return res
	}
	origName := ifc.OriginalName
	if origName == "" {
		origName = ifc.Name
	}
	if l := strvList(vals("Name")); len(l) > 0 && !testIfname(l, ifc.Name, ifc.AltNames) {
		return fail("Name")
	}
	if l := strvList(vals("OriginalName")); len(l) > 0 && !testStrv(l, origName) {
		return fail("OriginalName")
	}
	if l := strvList(vals("Kind")); len(l) > 0 && !testStrv(l, ifc.Kind) {
		return fail("Kind")
	}
	if l := strvList(vals("Type")); len(l) > 0 && !testStrv(l, ifc.Type) {
		return fail("Type")
	}
	if l := strvList(vals("Driver")); len(l) > 0 && !testStrv(l, ifc.Driver) {
		return fail("Driver")
	}
	if l := macList(vals("MACAddress")); len(l) > 0 && !testStrv(l, strings.ToLower(ifc.MAC)) {
		return fail("MACAddress")
	}
	if l := macList(vals("PermanentMACAddress")); len(l) > 0 && !testStrv(l, strings.ToLower(ifc.PermanentMAC)) {
		return fail("PermanentMACAddress")
	}
	if l := strvList(vals("Path")); len(l) > 0 && !testStrv(l, ifc.Path) {
		return fail("Path")
	}
	// Property= and the wireless keys test udev data a container link does
	// not carry: a positive pattern cannot match it.
	for _, k := range []string{"Property", "SSID", "BSSID", "WLANInterfaceType"} {
		if l := strvList(vals(k)); len(l) > 0 && !testStrv(l, "") {
			return fail(k)
		}
	}
	for _, k := range systemConditions {
		if len(vals(k)) > 0 {
			res.Assumed = append(res.Assumed, k)
		}
	}
	return res
}

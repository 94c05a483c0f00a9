// Package networkd evaluates systemd-networkd and systemd-udevd
// configuration the way systemd does: which .network file a link would get,
// which .link file sets its MAC policy, what networkd.conf says about
// foreign routes, and what networkd itself recorded in its state files.
//
// Everything reads below a root directory, so a node's file tree mounted at
// /host can be evaluated from a container. The evaluator is advisory;
// networkd's own state files are the authority on links that exist.
package networkd

import (
	"bufio"
	"bytes"
	"fmt"
	"strings"
)

// Section is one [Name] block of a unit file with its assignments in file
// order. A key may repeat.
type Section struct {
	Name    string
	Entries []Entry
}

// Entry is one Key=Value assignment.
type Entry struct {
	Key, Value string
	// Source is "file:line", for evidence in reports.
	Source string
}

// Unit is a parsed unit-style file: the main file followed by its drop-ins,
// merged in the order systemd applies them.
type Unit struct {
	Sections []Section
	// Files lists the main file and the drop-ins that were merged, in order.
	Files []string
}

// parseInto adds the sections of one file to u. The syntax is systemd's:
// [Section] headers, Key=Value lines, # and ; comments, and a trailing
// backslash continuing a value on the next line.
func (u *Unit) parseInto(name string, data []byte) error {
	u.Files = append(u.Files, name)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	var cur *Section
	lineNo := 0
	var pending strings.Builder
	pendingLine := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		if pending.Len() > 0 {
			if strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";") {
				continue
			}
			if strings.HasSuffix(line, "\\") {
				pending.WriteString(" " + strings.TrimSuffix(line, "\\"))
				continue
			}
			pending.WriteString(" " + line)
			line = pending.String()
			pending.Reset()
		} else {
			if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";") {
				continue
			}
			if strings.HasSuffix(line, "\\") {
				pending.WriteString(strings.TrimSuffix(line, "\\"))
				pendingLine = lineNo
				continue
			}
			pendingLine = lineNo
		}
		if strings.HasPrefix(line, "[") {
			if !strings.HasSuffix(line, "]") {
				return fmt.Errorf("%s:%d: section header %q lacks a closing ]", name, pendingLine, line)
			}
			secName := strings.TrimSpace(line[1 : len(line)-1])
			u.Sections = append(u.Sections, Section{Name: secName})
			cur = &u.Sections[len(u.Sections)-1]
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return fmt.Errorf("%s:%d: %q is neither a [Section] nor Key=Value", name, pendingLine, line)
		}
		if cur == nil {
			return fmt.Errorf("%s:%d: assignment %q before any [Section]", name, pendingLine, line)
		}
		cur.Entries = append(cur.Entries, Entry{
			Key:    strings.TrimSpace(key),
			Value:  strings.TrimSpace(value),
			Source: fmt.Sprintf("%s:%d", name, pendingLine),
		})
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", name, err)
	}
	return nil
}

// ParseUnit parses one file's content.
func ParseUnit(name string, data []byte) (*Unit, error) {
	u := &Unit{}
	if err := u.parseInto(name, data); err != nil {
		return nil, err
	}
	return u, nil
}

// Values returns every value assigned to key in every section called
// section, in order (main file first, then drop-ins).
func (u *Unit) Values(section, key string) []Entry {
	var out []Entry
	for _, s := range u.Sections {
		if s.Name != section {
			continue
		}
		for _, e := range s.Entries {
			if e.Key == key {
				out = append(out, e)
			}
		}
	}
	return out
}

// Last returns the last value assigned to key in section, which is the one
// systemd uses for single-valued settings.
func (u *Unit) Last(section, key string) (Entry, bool) {
	vals := u.Values(section, key)
	if len(vals) == 0 {
		return Entry{}, false
	}
	return vals[len(vals)-1], true
}

// HasSection reports whether the unit has a section of that name.
func (u *Unit) HasSection(name string) bool {
	for _, s := range u.Sections {
		if s.Name == name {
			return true
		}
	}
	return false
}

// ParseBool parses a systemd boolean (yes/no, true/false, on/off, 1/0).
func ParseBool(s string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "1", "yes", "y", "true", "t", "on":
		return true, nil
	case "0", "no", "n", "false", "f", "off":
		return false, nil
	}
	return false, fmt.Errorf("%q is not a boolean (yes/no)", s)
}

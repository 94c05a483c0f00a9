package networkd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// NetworkDirs are the directories networkd and udevd read .network and
// .link files from, highest priority first. /lib/systemd/network matters on
// systems without a merged /usr.
func NetworkDirs() []string {
	return []string{
		"/etc/systemd/network",
		"/run/systemd/network",
		"/usr/local/lib/systemd/network",
		"/usr/lib/systemd/network",
		"/lib/systemd/network",
	}
}

// File is one effective configuration file after same-name shadowing.
type File struct {
	// Name is the basename, which decides the order.
	Name string
	// Path is where the winning file lives on the node (without the root
	// prefix).
	Path string
	// Masked: the winning file is empty or a symlink to /dev/null, so this
	// name is switched off everywhere.
	Masked bool
	// Shadowed lists lower-priority files with the same name.
	Shadowed []string
	// DropIns are the merged drop-in paths, in the order applied.
	DropIns []string
	Unit    *Unit
	// Err is a parse error; systemd skips such a file (it logs and ignores
	// bad lines, but an unreadable file is ignored entirely).
	Err error
}

// Config is the networkd/udevd configuration found below a root.
type Config struct {
	Root     string
	Networks []*File
	Links    []*File
	// NetworkdConf is networkd.conf with its drop-ins merged; nil if none.
	NetworkdConf *Unit
	// Warnings are problems reading the tree (unreadable files).
	Warnings []string
}

// Load reads the configuration below root ("/" for the running system).
func Load(root string) (*Config, error) {
	if root == "" {
		root = "/"
	}
	if _, err := os.Stat(root); err != nil {
		return nil, fmt.Errorf("reading systemd configuration: root %s: %w", root, err)
	}
	c := &Config{Root: root}
	c.Networks = c.loadKind(".network")
	c.Links = c.loadKind(".link")
	c.NetworkdConf = c.loadNetworkdConf()
	return c, nil
}

// hostPath joins a node path onto the root.
func (c *Config) hostPath(p string) string { return filepath.Join(c.Root, p) }

// uniqueDirs drops directories that are the same directory as an earlier
// one (for example /lib -> usr/lib on merged-/usr systems).
func (c *Config) uniqueDirs(dirs []string) []string {
	var out []string
	var seen []os.FileInfo
	for _, d := range dirs {
		fi, err := os.Stat(c.hostPath(d))
		if err != nil || !fi.IsDir() {
			continue
		}
		dup := false
		for _, s := range seen {
			if os.SameFile(s, fi) {
				dup = true
				break
			}
		}
		if !dup {
			seen = append(seen, fi)
			out = append(out, d)
		}
	}
	return out
}

// collect lists files with the suffix in dirs (highest priority first) and
// returns, per basename, the node paths in priority order.
func (c *Config) collect(dirs []string, match func(name string) bool) (map[string][]string, []string) {
	byName := map[string][]string{}
	var names []string
	for _, d := range c.uniqueDirs(dirs) {
		entries, err := os.ReadDir(c.hostPath(d))
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				c.Warnings = append(c.Warnings, fmt.Sprintf("reading %s: %v", d, err))
			}
			continue
		}
		for _, e := range entries {
			if !match(e.Name()) {
				continue
			}
			if _, ok := byName[e.Name()]; !ok {
				names = append(names, e.Name())
			}
			byName[e.Name()] = append(byName[e.Name()], filepath.Join(d, e.Name()))
		}
	}
	sort.Strings(names)
	return byName, names
}

// masked reports whether the node path is an empty file or a symlink to
// /dev/null, systemd's two ways of switching a file off.
func (c *Config) masked(nodePath string) (bool, error) {
	fi, err := os.Lstat(c.hostPath(nodePath))
	if err != nil {
		return false, err
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		target, err := os.Readlink(c.hostPath(nodePath))
		if err != nil {
			return false, err
		}
		if target == "/dev/null" {
			return true, nil
		}
		resolved := target
		if !filepath.IsAbs(target) {
			resolved = filepath.Join(filepath.Dir(nodePath), target)
		}
		fi, err = os.Stat(c.hostPath(resolved))
		if err != nil {
			return false, err
		}
	}
	if fi.Mode()&fs.ModeCharDevice != 0 {
		return true, nil
	}
	return fi.Mode().IsRegular() && fi.Size() == 0, nil
}

// read reads a node path, following symlinks inside the root.
func (c *Config) read(nodePath string) ([]byte, error) {
	p := nodePath
	for range 10 {
		fi, err := os.Lstat(c.hostPath(p))
		if err != nil {
			return nil, err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			break
		}
		target, err := os.Readlink(c.hostPath(p))
		if err != nil {
			return nil, err
		}
		if filepath.IsAbs(target) {
			p = target
		} else {
			p = filepath.Join(filepath.Dir(p), target)
		}
	}
	return os.ReadFile(c.hostPath(p))
}

func (c *Config) loadKind(suffix string) []*File {
	dirs := NetworkDirs()
	byName, names := c.collect(dirs, func(n string) bool { return strings.HasSuffix(n, suffix) })
	var files []*File
	for _, name := range names {
		paths := byName[name]
		f := &File{Name: name, Path: paths[0], Shadowed: paths[1:]}
		files = append(files, f)
		m, err := c.masked(f.Path)
		if err != nil {
			f.Err = err
			c.Warnings = append(c.Warnings, fmt.Sprintf("reading %s: %v", f.Path, err))
			continue
		}
		if m {
			f.Masked = true
			continue
		}
		f.Unit, f.Err = c.loadWithDropIns(f.Path, dirs, name+".d")
		if f.Err != nil {
			c.Warnings = append(c.Warnings, f.Err.Error())
			continue
		}
		f.DropIns = f.Unit.Files[1:]
	}
	return files
}

// loadWithDropIns parses the main file and then the *.conf drop-ins found in
// dropDir under every search directory, same-name drop-ins shadowing lower
// priority ones, applied in basename order.
func (c *Config) loadWithDropIns(mainPath string, dirs []string, dropDir string) (*Unit, error) {
	u := &Unit{}
	if mainPath != "" {
		data, err := c.read(mainPath)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", mainPath, err)
		}
		if err := u.parseInto(mainPath, data); err != nil {
			return nil, err
		}
	}
	dropDirs := make([]string, len(dirs))
	for i, d := range dirs {
		dropDirs[i] = filepath.Join(d, dropDir)
	}
	byName, names := c.collect(dropDirs, func(n string) bool { return strings.HasSuffix(n, ".conf") })
	for _, n := range names {
		p := byName[n][0]
		if m, err := c.masked(p); err != nil || m {
			continue
		}
		data, err := c.read(p)
		if err != nil {
			c.Warnings = append(c.Warnings, fmt.Sprintf("reading %s: %v", p, err))
			continue
		}
		if err := u.parseInto(p, data); err != nil {
			c.Warnings = append(c.Warnings, err.Error())
		}
	}
	return u, nil
}

func (c *Config) loadNetworkdConf() *Unit {
	dirs := []string{"/etc/systemd", "/run/systemd", "/usr/local/lib/systemd", "/usr/lib/systemd"}
	mainPath := ""
	for _, d := range dirs {
		p := filepath.Join(d, "networkd.conf")
		if _, err := os.Stat(c.hostPath(p)); err == nil {
			if m, _ := c.masked(p); !m {
				mainPath = p
			}
			break
		}
	}
	u, err := c.loadWithDropIns(mainPath, dirs, "networkd.conf.d")
	if err != nil {
		c.Warnings = append(c.Warnings, err.Error())
		return nil
	}
	if len(u.Files) == 0 {
		return nil
	}
	return u
}

// Selection is the file systemd would apply to an interface.
type Selection struct {
	File  *File
	Match MatchResult
}

// NetworkFor returns the .network file networkd would apply to ifc (first
// match in file-name order), or nil if none matches. A file without any
// [Match] key is skipped, as current networkd does ("No valid settings found
// in the [Match] section, ignoring file"); older versions applied such a
// file to every interface, see CatchAll.
func (c *Config) NetworkFor(ifc Interface) *Selection {
	for _, f := range c.Networks {
		if f.Masked || f.Unit == nil {
			continue
		}
		if r := Match(f.Unit, ifc, false); r.Matches && !r.Empty {
			return &Selection{File: f, Match: r}
		}
	}
	return nil
}

// CatchAll lists the .network files without [Match] keys: ignored by
// current networkd, applied to every interface by older versions.
func (c *Config) CatchAll() []*File {
	var out []*File
	for _, f := range c.Networks {
		if f.Masked || f.Unit == nil {
			continue
		}
		if Match(f.Unit, Interface{}, false).Empty {
			out = append(out, f)
		}
	}
	return out
}

// LinkFor returns the .link file udev would apply to ifc, or nil. A .link
// file without [Match] keys is ignored, as udev does.
func (c *Config) LinkFor(ifc Interface) *Selection {
	for _, f := range c.Links {
		if f.Masked || f.Unit == nil {
			continue
		}
		r := Match(f.Unit, ifc, true)
		if r.Empty {
			continue
		}
		if r.Matches {
			return &Selection{File: f, Match: r}
		}
	}
	return nil
}

// Unmanaged reports the file's [Link] Unmanaged= setting.
func (f *File) Unmanaged() bool {
	if f == nil || f.Unit == nil {
		return false
	}
	e, ok := f.Unit.Last("Link", "Unmanaged")
	if !ok {
		return false
	}
	b, err := ParseBool(e.Value)
	return err == nil && b
}

// MACAddressPolicy is the [Link] MACAddressPolicy= of a .link file, "none"
// when unset or empty.
func (f *File) MACAddressPolicy() (string, string) {
	if f == nil || f.Unit == nil {
		return "none", ""
	}
	e, ok := f.Unit.Last("Link", "MACAddressPolicy")
	if !ok || e.Value == "" {
		return "none", e.Source
	}
	return e.Value, e.Source
}

// ManageForeign returns networkd.conf's [Network] setting for key
// (ManageForeignRoutes or ManageForeignRoutingPolicyRules), which defaults
// to yes, and where it was set.
func (c *Config) ManageForeign(key string) (bool, string) {
	if c.NetworkdConf == nil {
		return true, ""
	}
	e, ok := c.NetworkdConf.Last("Network", key)
	if !ok {
		return true, ""
	}
	b, err := ParseBool(e.Value)
	if err != nil {
		return true, e.Source
	}
	return b, e.Source
}

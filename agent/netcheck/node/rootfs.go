package node

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/agentd/agent/internal/atomicfile"
)

// writeUnder writes name (a node path such as /etc/systemd/network/x)
// below root atomically, resolving every component inside root (os.Root,
// openat-style): a symlink in the tree that points out of root, or an
// absolute one, is refused instead of followed, so `--fix --root R` never
// writes outside R.
func writeUnder(root, name string, data []byte, mode fs.FileMode) error {
	if filepath.Clean(root) == "/" {
		// Nothing is outside /; absolute symlinks are fine there.
		full := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", filepath.Dir(full), err)
		}
		return atomicfile.Write(full, data, mode)
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return fmt.Errorf("opening --root %s: %w", root, err)
	}
	defer r.Close()
	rel := strings.TrimPrefix(filepath.Clean("/"+name), "/")
	dir := filepath.Dir(rel)
	if err := r.MkdirAll(dir, 0o755); err != nil {
		return escapeError(root, rel, err)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(dir, "."+filepath.Base(rel)+".tmp-"+hex.EncodeToString(rnd[:]))
	f, err := r.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return escapeError(root, rel, err)
	}
	defer r.Remove(tmp)
	if err := fillFile(f, data, mode); err != nil {
		return fmt.Errorf("writing %s: %w", filepath.Join(root, tmp), err)
	}
	if err := r.Rename(tmp, rel); err != nil {
		return escapeError(root, rel, err)
	}
	d, err := r.Open(dir)
	if err != nil {
		return escapeError(root, rel, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", filepath.Join(root, dir), err)
	}
	return nil
}

func fillFile(f *os.File, data []byte, mode fs.FileMode) error {
	err := f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// readUnder reads name below root the same way; a missing file is
// fs.ErrNotExist.
func readUnder(root, name string) ([]byte, error) {
	if filepath.Clean(root) == "/" {
		return os.ReadFile(filepath.Join(root, name))
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return nil, fmt.Errorf("opening --root %s: %w", root, err)
	}
	defer r.Close()
	rel := strings.TrimPrefix(filepath.Clean("/"+name), "/")
	data, err := r.ReadFile(rel)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, escapeError(root, rel, err)
	}
	return data, err
}

// escapeError turns os.Root's refusal into one line naming the symlink
// that leads out of the root, when there is one.
func escapeError(root, rel string, err error) error {
	root = filepath.Clean(root)
	p := root
	for _, part := range strings.Split(rel, "/") {
		p = filepath.Join(p, part)
		fi, lerr := os.Lstat(p)
		if lerr != nil {
			break
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			continue
		}
		target, _ := os.Readlink(p)
		resolved := target
		if !filepath.IsAbs(target) {
			resolved = filepath.Join(filepath.Dir(p), target)
		}
		// os.Root follows relative links that stay inside and refuses
		// absolute ones (they would mean the node's /, not the root's).
		if filepath.IsAbs(target) || (resolved != root && !strings.HasPrefix(resolved, root+"/")) {
			return fmt.Errorf("refusing to write %s: %s is a symlink to %s, outside --root %s; replace the symlink with a directory or file, or point --root at the tree it belongs to",
				filepath.Join(root, rel), p, target, root)
		}
	}
	return fmt.Errorf("writing %s: %w", filepath.Join(root, rel), err)
}

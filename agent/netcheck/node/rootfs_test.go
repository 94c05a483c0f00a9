package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFixStaysUnderRoot: `--fix --root R` writes below R, follows a
// relative symlink that stays inside R, and refuses, with a line naming
// the link, one that leads out of R (relative or absolute), writing
// nothing outside.
func TestFixStaysUnderRoot(t *testing.T) {
	plan := func(t *testing.T, root string) *GuardPlan {
		t.Helper()
		p, err := PlanGuard(Options{Root: root})
		if err != nil {
			t.Fatalf("plan: %v", err)
		}
		return p
	}
	t.Run("inside", func(t *testing.T) {
		root := t.TempDir()
		if err := os.MkdirAll(filepath.Join(root, "srv/network"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(root, "etc/systemd"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../../srv/network", filepath.Join(root, "etc/systemd/network")); err != nil {
			t.Fatal(err)
		}
		if err := plan(t, root).Apply(); err != nil {
			t.Fatalf("a symlink that stays inside the root was refused: %v", err)
		}
		if _, err := os.Stat(filepath.Join(root, "srv/network", guardNetworkName)); err != nil {
			t.Errorf("guard not written through the inner symlink: %v", err)
		}
	})
	for _, abs := range []bool{false, true} {
		name := "relative escape"
		if abs {
			name = "absolute"
		}
		t.Run(name, func(t *testing.T) {
			base := t.TempDir()
			root := filepath.Join(base, "root")
			outside := filepath.Join(base, "outside")
			for _, d := range []string{filepath.Join(root, "etc/systemd"), outside} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			target := "../../../outside"
			if abs {
				target = outside
			}
			link := filepath.Join(root, "etc/systemd/network")
			if err := os.Symlink(target, link); err != nil {
				t.Fatal(err)
			}
			p, err := PlanGuard(Options{Root: root})
			if err == nil {
				err = p.Apply()
			}
			if err == nil {
				t.Fatal("a symlink out of the root was followed")
			}
			msg := err.Error()
			if !strings.Contains(msg, "refusing") || !strings.Contains(msg, link) || strings.Contains(msg, "\n") {
				t.Errorf("error should be one line naming the symlink %s: %q", link, msg)
			}
			if entries, _ := os.ReadDir(outside); len(entries) > 0 {
				t.Errorf("wrote outside the root: %v", entries)
			}
		})
	}
}

// Package agentbin builds the agent binary once per test process, for the
// end-to-end tests that run the real binary in network namespaces.
package agentbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Builder builds the binary on first use. Its zero value is ready; a test
// package keeps one and calls Remove from TestMain when its tests are done.
type Builder struct {
	once sync.Once
	path string
	err  error
}

// Path returns the built binary, building it on the first call; a build
// failure fails t.
func (b *Builder) Path(t testing.TB) string {
	t.Helper()
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "agent-e2e-bin-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, "agent")
		out, err := exec.Command("go", "build", "-o", b.path, "github.com/agentd/agent/cmd/agent").CombinedOutput()
		if err != nil {
			b.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// Remove deletes the binary, if one was built.
func (b *Builder) Remove() {
	if b.path != "" {
		os.RemoveAll(filepath.Dir(b.path))
	}
}

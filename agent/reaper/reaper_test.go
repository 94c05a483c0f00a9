package reaper

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const helperEnv = "REAPER_TEST_HELPER"

// TestReapsOrphansAsPID1 runs this test binary as PID 1 of a new PID
// namespace. The agent side (PID 2) keeps creating orphans while checking
// that every exec.Cmd.Wait still gets its exact exit status; at the end no
// zombie may be left and PID 1 must exit with the agent's status.
func TestReapsOrphansAsPID1(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create a PID namespace")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("unshare (util-linux) is not installed")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "--pid", "--fork", "--mount-proc", exe, "-test.run", "^TestPID1Helper$", "-test.v")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("PID 1 helper: %v (want exit status 3 passed through from the agent child)\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "HELPER-OK") {
		t.Fatalf("helper did not finish its checks:\n%s", out.String())
	}
}

func TestPID1Helper(t *testing.T) {
	if os.Getenv(helperEnv) == "" {
		t.Skip("only runs inside TestReapsOrphansAsPID1")
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if err := ReapOrphansIfPID1(logger); err != nil {
		fmt.Println("HELPER-FAIL", err)
		os.Exit(1)
	}
	if os.Getpid() == 1 {
		fmt.Println("HELPER-FAIL still PID 1 after ReapOrphansIfPID1")
		os.Exit(1)
	}
	fail := func(format string, args ...any) {
		fmt.Printf("HELPER-FAIL "+format+"\n", args...)
		os.Exit(1)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 100)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 10; j++ {
				// An orphan: the background sleep outlives its shell.
				if err := exec.Command("sh", "-c", "sleep 0.05 & exit 0").Run(); err != nil {
					errs <- "orphan maker: " + err.Error()
				}
			}
		}()
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < 10; j++ {
				code := 1 + (i*10+j)%100
				err := exec.Command("sh", "-c", fmt.Sprintf("sleep 0.01; exit %d", code)).Run()
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != code {
					errs <- fmt.Sprintf("exit status stolen: want %d, got %v", code, err)
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		fail("%s", e)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		z := zombies()
		if len(z) == 0 {
			break
		}
		if time.Now().After(deadline) {
			fail("zombies left: %v", z)
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Println("HELPER-OK")
	os.Exit(3)
}

func zombies() []string {
	var out []string
	dirs, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if i > 0 && len(b) > i+2 && b[i+2] == 'Z' {
			out = append(out, strings.TrimSpace(string(b)))
		}
	}
	return out
}

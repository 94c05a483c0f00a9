// Package pgtest starts a real PostgreSQL server for tests: initdb into a
// temporary directory, run as an unprivileged user (PostgreSQL refuses to
// run as root), listening only on a unix socket in that directory. The
// server and its directory are removed when the test ends, pass or fail.
package pgtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// BinDir is where Debian's postgresql package puts the server binaries.
const BinDir = "/usr/lib/postgresql/15/bin"

// Superuser is the bootstrap superuser initdb creates; it connects over
// the socket without a password.
const Superuser = "postgres"

// Server is one running PostgreSQL cluster.
type Server struct {
	t     testing.TB
	dir   string // cluster data directory
	sock  string // unix socket directory
	uid   int
	gid   int
	dbSeq atomic.Int64
}

// Start initialises and starts a cluster. Local connections by Superuser
// are trusted; every other role must give its password, so tests can check
// what a wrong password does.
func Start(t testing.TB) *Server {
	t.Helper()
	if _, err := os.Stat(filepath.Join(BinDir, "initdb")); err != nil {
		t.Fatalf("PostgreSQL 15 is not installed (%v); install Debian's postgresql package (apt-get install postgresql)", err)
	}
	// Not t.TempDir: its parents are private to root, and the server runs
	// as nobody. A short path also keeps the socket under the 107-byte
	// limit of unix socket names.
	base, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, dir: filepath.Join(base, "data"), sock: base, uid: os.Getuid(), gid: os.Getgid()}
	if os.Getuid() == 0 {
		s.uid, s.gid = 65534, 65534 // nobody:nogroup
	}
	watchdog := startWatchdog(t, base, s.dir)
	t.Cleanup(func() {
		s.stop("immediate")
		os.RemoveAll(base)
		if watchdog != nil {
			watchdog.Process.Kill()
			watchdog.Wait()
		}
	})
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(base, s.uid, s.gid); err != nil {
		t.Fatal(err)
	}
	if out, err := s.run("initdb", "-D", s.dir, "-U", Superuser, "--auth-local=trust", "--no-sync", "-E", "UTF8", "--locale=C"); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	hba := "local all " + Superuser + " trust\nlocal all all scram-sha-256\n"
	if err := os.WriteFile(filepath.Join(s.dir, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		t.Fatal(err)
	}
	s.Start()
	return s
}

// startWatchdog runs a small shell loop that, should the test process die
// without its cleanup (a crash, a kill), stops the server and removes its
// directory, so no orphaned PostgreSQL outlives the test binary.
func startWatchdog(t testing.TB, base, data string) *exec.Cmd {
	script := fmt.Sprintf(`while kill -0 %d 2>/dev/null; do sleep 1; done
pid=$(head -n 1 %s/postmaster.pid 2>/dev/null) && kill -QUIT "$pid" 2>/dev/null
sleep 2; rm -rf %s`, os.Getpid(), data, base)
	cmd := exec.Command("/bin/sh", "-c", script)
	// Its own process group: signals meant for the test's group spare it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Logf("pgtest: no watchdog (%v); a crashed test may leave its server running", err)
		return nil
	}
	return cmd
}

// Start (re)starts a stopped server.
func (s *Server) Start() {
	s.t.Helper()
	opts := strings.Join([]string{
		"-c listen_addresses=''",
		"-c unix_socket_directories=" + s.sock,
		"-c fsync=off", // test speed; a killed process still loses nothing committed
		"-c max_connections=200",
	}, " ")
	if out, err := s.run("pg_ctl", "start", "-w", "-t", "60", "-D", s.dir, "-l", filepath.Join(s.sock, "server.log"), "-o", opts); err != nil {
		log, _ := os.ReadFile(filepath.Join(s.sock, "server.log"))
		s.t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
}

// Stop stops the server at once, dropping every connection (mode
// "immediate" is a crash as far as clients can tell).
func (s *Server) Stop() {
	s.t.Helper()
	if out, err := s.stop("fast"); err != nil {
		s.t.Fatalf("pg_ctl stop: %v\n%s", err, out)
	}
}

func (s *Server) stop(mode string) ([]byte, error) {
	if _, err := os.Stat(filepath.Join(s.dir, "postmaster.pid")); err != nil {
		return nil, nil
	}
	return s.run("pg_ctl", "stop", "-w", "-D", s.dir, "-m", mode)
}

func (s *Server) run(bin string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(BinDir, bin), args...)
	cmd.Dir = s.sock
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C"}
	if s.uid != os.Getuid() {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(s.uid), Gid: uint32(s.gid)}}
	}
	return cmd.CombinedOutput()
}

// SocketDir is the directory holding the server's unix socket.
func (s *Server) SocketDir() string { return s.sock }

// URL is a connection URL for user (with password, if not empty) and
// database over the unix socket.
func (s *Server) URL(user, password, database string) string {
	u := url.URL{Scheme: "postgres", Path: "/" + database, RawQuery: url.Values{"host": {s.sock}}.Encode()}
	if password != "" {
		u.User = url.UserPassword(user, password)
	} else {
		u.User = url.User(user)
	}
	return u.String()
}

// Exec runs SQL as the superuser in database.
func (s *Server) Exec(database, sql string, args ...any) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL(Superuser, "", database))
	if err != nil {
		s.t.Fatalf("connecting to the test server: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		s.t.Fatalf("%s: %v", sql, err)
	}
}

// NewDatabase creates an empty database owned by a new role with a
// password, and returns its URL. Tests sharing a server use one each.
func (s *Server) NewDatabase() string {
	s.t.Helper()
	n := s.dbSeq.Add(1)
	db, user, pw := fmt.Sprintf("db%d", n), fmt.Sprintf("user%d", n), fmt.Sprintf("pw-%d-secret", n)
	s.Exec("postgres", fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", user, pw))
	s.Exec("postgres", fmt.Sprintf("CREATE DATABASE %s OWNER %s", db, user))
	return s.URL(user, pw, db)
}

// CPUTime is the CPU time (user and system) the server has used so far:
// the postmaster's own, its children that have exited, and the backends
// still running. Benchmarks use it to count the database's share of a
// load apart from the clients'.
func (s *Server) CPUTime() (time.Duration, error) {
	raw, err := os.ReadFile(filepath.Join(s.dir, "postmaster.pid"))
	if err != nil {
		return 0, fmt.Errorf("reading the server's pid: %w", err)
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	pm, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		return 0, fmt.Errorf("postmaster.pid: %w", err)
	}
	total, _, err := procCPU(pm, true)
	if err != nil {
		return 0, err
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == pm {
			continue
		}
		cpu, ppid, err := procCPU(pid, false)
		if err == nil && ppid == pm {
			total += cpu
		}
	}
	return total, nil
}

// procCPU reads a process's CPU time from /proc/PID/stat (with its reaped
// children's when withChildren) and its parent's pid.
func procCPU(pid int, withChildren bool) (time.Duration, int, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// The fields after the command name (which may hold spaces): ppid is
	// the 4th of the line, utime, stime, cutime and cstime the 14th-17th.
	_, rest, _ := strings.Cut(string(raw), ") ")
	f := strings.Fields(rest)
	if len(f) < 15 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ppid, _ := strconv.Atoi(f[1])
	n := 2
	if withChildren {
		n = 4
	}
	var ticks int64
	for _, v := range f[11 : 11+n] {
		t, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/stat: %q", pid, v)
		}
		ticks += t
	}
	const clockTick = 10 * time.Millisecond // USER_HZ is 100 on Linux
	return time.Duration(ticks) * clockTick, ppid, nil
}

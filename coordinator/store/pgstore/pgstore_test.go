package pgstore_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/agentd/agent/coordinator/store"
	"github.com/agentd/agent/coordinator/store/pgstore"
	"github.com/agentd/agent/coordinator/store/storetest"
	"github.com/agentd/agent/internal/pgtest"
)

// writerEnv makes the test binary a store writer that the
// mid-transaction test kills (see TestMain).
const writerEnv = "PGSTORE_TEST_WRITER_URL"

func TestMain(m *testing.M) {
	if url := os.Getenv(writerEnv); url != "" {
		if err := runWriter(url); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func open(t *testing.T, url string) *pgstore.Store {
	t.Helper()
	s, err := pgstore.Open(context.Background(), url, pgstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestContract(t *testing.T) {
	srv := pgtest.Start(t)
	storetest.Run(t, func(t *testing.T) storetest.Opener {
		url := srv.NewDatabase()
		return func(now func() time.Time) (store.Backend, error) {
			return pgstore.Open(context.Background(), url, pgstore.Options{Now: now})
		}
	})
}

func TestOnlyHashesStored(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase()
	s := open(t, url)
	s.CreateUser(t.Context(), "alice")
	_, agentSecret, _, err := s.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	userSecret, _, err := s.CreateToken(t.Context(), store.KindUser, "alice", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	var dump string
	err = s.Pool().QueryRow(context.Background(), `SELECT string_agg(t::text, ' ') FROM tokens t`).Scan(&dump)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{agentSecret, userSecret, agentSecret[len(store.AgentTokenPrefix):]} {
		if strings.Contains(dump, secret) {
			t.Fatal("a token secret is stored in the clear")
		}
	}
	if !strings.Contains(dump, store.HashToken(agentSecret)) {
		t.Fatal("token hash not found in the table")
	}
}

// TestConcurrentMigration starts several stores on one empty database at
// once, as replicas of a fresh deployment do: all succeed and each
// migration is applied once.
func TestConcurrentMigration(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase()
	const n = 6
	var wg sync.WaitGroup
	errs := make([]error, n)
	stores := make([]*pgstore.Store, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stores[i], errs[i] = pgstore.Open(context.Background(), url, pgstore.Options{})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("store %d: %v", i, err)
		}
		defer stores[i].Close()
	}
	var versions, distinct int
	err := stores[0].Pool().QueryRow(context.Background(), `SELECT count(*), count(DISTINCT version) FROM coordinator_schema`).Scan(&versions, &distinct)
	if err != nil {
		t.Fatal(err)
	}
	if versions != pgstore.SchemaVersion() || distinct != versions {
		t.Fatalf("%d migration rows (%d distinct), want %d", versions, distinct, pgstore.SchemaVersion())
	}
	// Every replica sees the others' writes.
	if _, err := stores[1].CreateUser(t.Context(), "alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := stores[4].CreateUser(t.Context(), "alice"); !errors.Is(err, store.ErrExists) {
		t.Fatalf("second replica creating the same user: %v", err)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase()
	s := open(t, url)
	newer := pgstore.SchemaVersion() + 1
	if _, err := s.Pool().Exec(context.Background(), `INSERT INTO coordinator_schema (version, name) VALUES ($1, 'from_the_future.sql')`, newer); err != nil {
		t.Fatal(err)
	}
	_, err := pgstore.Open(context.Background(), url, pgstore.Options{})
	if !errors.Is(err, pgstore.ErrSchemaNewer) {
		t.Fatalf("opening a newer schema: %v", err)
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") || !strings.Contains(msg, fmt.Sprintf("schema version %d", newer)) || !strings.Contains(msg, "upgrade") {
		t.Fatalf("message %q: want one line naming version %d and the fix", msg, newer)
	}
}

func TestBadURLs(t *testing.T) {
	srv := pgtest.Start(t)
	good := srv.NewDatabase() // postgres://user1:pw-1-secret@/db1?host=...
	u, db := "user1", "db1"
	sock := srv.SocketDir()
	closed := t.TempDir() // a directory with no server's socket
	cases := []struct {
		name, url string
		want      []string
	}{
		{"empty", "", []string{"no PostgreSQL URL", "--postgres-url"}},
		{"malformed", "postgres://" + u + ":pw-1-secret@host:port/" + db, []string{"not valid", "postgres://USER:PASSWORD@HOST"}},
		{"wrong password", srv.URL(u, "pw-1-wrong", db), []string{"wrong password", u + "@"}},
		{"missing database", srv.URL(u, "pw-1-secret", "nosuchdb"), []string{"does not exist", "nosuchdb"}},
		{"unreachable socket", "postgres://" + u + ":pw-1-secret@/" + db + "?host=" + closed, []string{"cannot reach", closed}},
		{"unreachable port", "postgres://" + u + ":pw-1-secret@127.0.0.1:1/" + db, []string{"cannot reach", "127.0.0.1:1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			s, err := pgstore.Open(context.Background(), tc.url, pgstore.Options{ConnectTimeout: 3 * time.Second})
			if err == nil {
				s.Close()
				t.Fatal("opened")
			}
			msg := err.Error()
			t.Logf("%s", msg)
			if strings.Contains(msg, "\n") || strings.Contains(msg, "pw-1") {
				t.Fatalf("error %q: want one line without the password", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Fatalf("error %q: want it to mention %q", msg, w)
				}
			}
			if d := time.Since(start); d > 20*time.Second {
				t.Fatalf("took %v to fail", d)
			}
		})
	}
	if !strings.Contains(good, url.QueryEscape(sock)) {
		t.Fatalf("test URL %s is not on the test server", good)
	}
	if red := pgstore.Redact(good); strings.Contains(red, "pw-1") || !strings.Contains(red, "user1") {
		t.Fatalf("redacted URL %s", red)
	}
	if red := pgstore.Redact("host=h user=u password='a b' dbname=d"); strings.Contains(red, "a b") {
		t.Fatalf("redacted keyword/value string %s", red)
	}
	if red := pgstore.Redact("postgres://u@h/d?password=pw-2&sslmode=disable"); strings.Contains(red, "pw-2") || !strings.Contains(red, "sslmode=disable") {
		t.Fatalf("redacted URL with the password in its query %s", red)
	}
	if red := pgstore.Redact("postgres://u:pw%403@h/d"); strings.Contains(red, "pw") {
		t.Fatalf("redacted URL with an escaped password %s", red)
	}
}

// TestOutageAndRecovery stops the server under an open store: requests
// fail with store.ErrUnavailable, one clear line each, and work again once
// the server is back, with nothing lost.
func TestOutageAndRecovery(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase()
	s, err := pgstore.Open(context.Background(), url, pgstore.Options{OpTimeout: 3 * time.Second, ConnectTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.CreateUser(t.Context(), "alice")
	_, secret, _, err := s.CreateAgent(t.Context(), "ws1", "alice")
	if err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	_, err = s.Authenticate(t.Context(), secret)
	if !errors.Is(err, store.ErrUnavailable) || errors.Is(err, store.ErrTokenInvalid) {
		t.Fatalf("authenticating while the database is down: %v", err)
	}
	if strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), "secret") {
		t.Fatalf("error %q", err)
	}
	if !s.IsAgentID(t.Context(), 12345) {
		t.Fatal("IsAgentID said no while the database is down")
	}
	srv.Start()
	deadline := time.Now().Add(10 * time.Second)
	for {
		p, err := s.Authenticate(t.Context(), secret)
		if err == nil {
			if p.Agent == nil || p.Agent.Name != "ws1" {
				t.Fatalf("principal %+v", p)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still failing after the server came back: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestWriterDiesMidTransaction kills a process writing to the store with
// SIGKILL while it holds a transaction open: every write it reported
// done is there, the half-done one is not, and nothing stays locked.
func TestWriterDiesMidTransaction(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase()
	open(t, url) // migrate first, so the writer's timing is the writes'

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), writerEnv+"="+url)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	var done []string
	sc := bufio.NewScanner(out)
	mid := false
	for sc.Scan() {
		line := sc.Text()
		if line == "mid" {
			mid = true
			break
		}
		done = append(done, strings.TrimPrefix(line, "done "))
	}
	if !mid {
		cmd.Wait()
		t.Fatalf("the writer ended before its last transaction (%d writes)", len(done))
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()

	s := open(t, url)
	snap, err := s.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	users, agents := map[string]bool{}, map[string]bool{}
	for _, u := range snap.Users {
		users[u.Name] = true
	}
	for _, a := range snap.Agents {
		agents[a.Name] = true
	}
	for _, n := range done {
		if !users["u"+n] || !agents["a"+n] {
			t.Fatalf("write %s was reported done but is missing", n)
		}
	}
	if users["half"] || agents["half"] {
		t.Fatal("the uncommitted transaction's rows are visible")
	}
	if len(snap.Tokens) != len(snap.Agents) {
		t.Fatalf("%d agents but %d tokens: an agent was saved without its token", len(snap.Agents), len(snap.Tokens))
	}
	// Nothing stays locked by the dead session.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := pgx.BeginFunc(ctx, s.Pool(), func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `LOCK TABLE users IN ACCESS EXCLUSIVE MODE`)
		return err
	}); err != nil {
		t.Fatalf("users table still locked: %v", err)
	}
	if _, err := s.CreateUser(t.Context(), "half"); err != nil {
		t.Fatal(err)
	}
}

// runWriter writes users and agents, reporting each finished write, then
// leaves one transaction open and waits to be killed.
func runWriter(url string) error {
	ctx := context.Background()
	s, err := pgstore.Open(ctx, url, pgstore.Options{})
	if err != nil {
		return err
	}
	for i := range 20 {
		if _, err := s.CreateUser(ctx, fmt.Sprintf("u%d", i)); err != nil {
			return err
		}
		if _, _, _, err := s.CreateAgent(ctx, fmt.Sprintf("a%d", i), fmt.Sprintf("u%d", i)); err != nil {
			return err
		}
		fmt.Printf("done %d\n", i)
	}
	tx, err := s.Pool().Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO users (name, doc) VALUES ('half', '{"name":"half"}')`); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE users IN SHARE MODE`); err != nil {
		return err
	}
	fmt.Println("mid")
	time.Sleep(time.Minute)
	return errors.New("not killed")
}

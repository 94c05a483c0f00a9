package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// envTokenFD names the file descriptor through which `agent run` hands its
// token to the image it re-executes (itself, or its child under PID 1), so
// the token never sits in an environment or on a command line that
// /proc/PID/environ and /proc/PID/cmdline would show.
const envTokenFD = "AGENT_TOKEN_FD"

// tokenSource says where `agent run` found its token.
type tokenSource int

const (
	tokenFromFile tokenSource = iota
	tokenFromFD
	tokenFromFlag
	tokenFromEnv
)

// readTokenFD reads and closes the descriptor named by AGENT_TOKEN_FD.
func readTokenFD(v string) (string, error) {
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return "", fmt.Errorf("%s=%q is not a file descriptor; it is set only by agent run itself: unset it", envTokenFD, v)
	}
	f := os.NewFile(uintptr(fd), "agent-token")
	if f == nil {
		return "", fmt.Errorf("%s=%d: no such descriptor; unset it", envTokenFD, fd)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return "", fmt.Errorf("reading the token handed over on descriptor %d: %w", fd, err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("the token handed over on descriptor %d is empty", fd)
	}
	return tok, nil
}

// tokenPipe returns the read end of a pipe that holds tok and is then
// closed, for a process to inherit.
func tokenPipe(tok string) (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("pipe for the agent token: %w", err)
	}
	// A token is far below the pipe's buffer size, so this cannot block.
	_, err = io.WriteString(w, tok)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("pipe for the agent token: %w", err)
	}
	return r, nil
}

// withoutToken returns args and env with every literal copy of the token
// removed: --token VALUE, --token=VALUE and AGENT_TOKEN=..., and the
// handover variable set to fd.
func withoutToken(args, env []string, fd int) ([]string, []string) {
	var outArgs []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			outArgs = append(outArgs, args[i:]...)
			break
		}
		if a == "--token" || a == "-token" {
			i++ // skip the value too
			continue
		}
		if strings.HasPrefix(a, "--token=") || strings.HasPrefix(a, "-token=") {
			continue
		}
		outArgs = append(outArgs, a)
	}
	var outEnv []string
	for _, kv := range env {
		if strings.HasPrefix(kv, "AGENT_TOKEN=") || strings.HasPrefix(kv, envTokenFD+"=") {
			continue
		}
		outEnv = append(outEnv, kv)
	}
	outEnv = append(outEnv, envTokenFD+"="+strconv.Itoa(fd))
	return outArgs, outEnv
}

// reexecWithoutToken replaces this process (same PID) with the same
// program minus the token on its command line and in its environment; the
// new image reads the token from an inherited pipe. Unsetting a variable
// is not enough: /proc/PID/environ shows the environment the process was
// started with. It returns only on failure.
func reexecWithoutToken(tok string) error {
	r, err := tokenPipe(tok)
	if err != nil {
		return err
	}
	fd := int(r.Fd())
	// The descriptor must survive exec; os.Pipe sets close-on-exec.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
		r.Close()
		return fmt.Errorf("handing the token to the re-executed agent: %w", err)
	}
	args, env := withoutToken(os.Args, os.Environ(), fd)
	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	err = syscall.Exec(exe, args, env)
	r.Close()
	return fmt.Errorf("re-executing the agent without the token in its environment: %w (use --token-file instead of --token / AGENT_TOKEN)", err)
}

// permissionPolicy is how `agent run` treats secrets other users may read
// and state they may change.
type permissionPolicy struct {
	allowInsecure bool
	log           *slog.Logger
}

// checkTokenFile refuses a token file every local user can read, and warns
// when users other than the agent's own share its group.
func (p permissionPolicy) checkTokenFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("token file: %w", err)
	}
	mode := st.Mode().Perm()
	sys, _ := st.Sys().(*syscall.Stat_t)
	if mode&0o004 != 0 {
		msg := fmt.Sprintf("the token file %s is readable by every local user (mode %04o): anyone on this machine could act as this workspace; run chmod 600 %s", path, mode, path)
		return p.refuse(msg)
	}
	if mode&0o040 != 0 && sys != nil {
		if others := otherGroupMembers(sys.Gid); len(others) > 0 {
			p.log.Warn(fmt.Sprintf("the token file %s is readable by group %s (mode %04o), which has other members (%s): they could act as this workspace; run chmod 600 %s", path, groupName(sys.Gid), mode, strings.Join(others, ", "), path))
		}
	}
	return nil
}

// checkDataDir refuses a data directory every local user can write (they
// could replace the SSH host key), and warns when others share its group.
// A directory that does not exist yet is created 0700 by the agent.
func (p permissionPolicy) checkDataDir(dir string) error {
	st, err := os.Stat(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	mode := st.Mode().Perm()
	sys, _ := st.Sys().(*syscall.Stat_t)
	if mode&0o002 != 0 {
		msg := fmt.Sprintf("the data directory %s is writable by every local user (mode %04o): anyone could replace the agent's SSH host key and state; run chmod 700 %s", dir, mode, dir)
		return p.refuse(msg)
	}
	if mode&0o020 != 0 && sys != nil {
		if others := otherGroupMembers(sys.Gid); len(others) > 0 {
			p.log.Warn(fmt.Sprintf("the data directory %s is writable by group %s (mode %04o), which has other members (%s); run chmod 700 %s", dir, groupName(sys.Gid), mode, strings.Join(others, ", "), dir))
		}
	}
	return nil
}

// refuse turns an exposure into the error that stops the agent, or into a
// warning under --allow-insecure-permissions.
func (p permissionPolicy) refuse(msg string) error {
	if !p.allowInsecure {
		return errors.New(msg + " (or pass --allow-insecure-permissions to run anyway)")
	}
	p.log.Warn(msg + "; running anyway (--allow-insecure-permissions)")
	return nil
}

func groupName(gid uint32) string {
	if g, err := user.LookupGroupId(strconv.Itoa(int(gid))); err == nil {
		return g.Name
	}
	return strconv.Itoa(int(gid))
}

// otherGroupMembers lists the users other than this process's user in
// group gid, from /etc/group (supplementary members) and /etc/passwd
// (primary group). A group we cannot resolve counts as shared: the
// warning should err on the side of being shown. Kubernetes' fsGroup makes
// a Secret file group-readable by the pod's own group, which is fine.
func otherGroupMembers(gid uint32) []string {
	me := ""
	if u, err := user.Current(); err == nil {
		me = u.Username
	}
	id := strconv.Itoa(int(gid))
	seen := map[string]bool{}
	var others []string
	add := func(name string) {
		if name != "" && name != me && !seen[name] {
			seen[name] = true
			others = append(others, name)
		}
	}
	found := false
	scan := func(path string, fn func(fields []string)) {
		f, err := os.Open(path)
		if err != nil {
			return
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fn(strings.Split(sc.Text(), ":"))
		}
	}
	scan("/etc/group", func(f []string) {
		if len(f) >= 4 && f[2] == id {
			found = true
			for _, m := range strings.Split(f[3], ",") {
				add(strings.TrimSpace(m))
			}
		}
	})
	scan("/etc/passwd", func(f []string) {
		if len(f) >= 4 && f[3] == id {
			found = true
			add(f[0])
		}
	})
	if !found && strconv.Itoa(os.Getgid()) != id {
		return []string{"unknown members of group " + id}
	}
	return others
}

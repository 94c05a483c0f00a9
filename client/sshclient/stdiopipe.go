package sshclient

import (
	"os"

	"golang.org/x/sys/unix"
)

// StdioChunk is the copy size of the ProxyCommand bridge. At 32 KiB the
// bridge, not the tailnet, bounded scp through `agent ssh --stdio`: every
// chunk is a pipe read, a write into the userspace TCP stack and a
// goroutine hand-off, so larger chunks carry the same bytes with far fewer
// of each (issue 14 point 7; internal/relay copies with 256 KiB for the
// same reason).
const StdioChunk = 256 << 10

// stdioPipeSize is what GrowPipe asks for: Linux's default pipe holds 64
// KiB, so a read from OpenSSH's pipe returns at most that however large the
// buffer. 1 MiB is the largest an unprivileged process may ask for by
// default (/proc/sys/fs/pipe-max-size).
const stdioPipeSize = 1 << 20

// GrowPipe enlarges the kernel buffer of f if f is a pipe (OpenSSH talks to
// its ProxyCommand through pipes), so that the bridge moves StdioChunk at a
// time. Anything else, or a refusal, leaves f as it is: it only costs speed.
func GrowPipe(f *os.File) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return
	}
	if size, err := unix.FcntlInt(f.Fd(), unix.F_GETPIPE_SZ, 0); err == nil && size < stdioPipeSize {
		_, _ = unix.FcntlInt(f.Fd(), unix.F_SETPIPE_SZ, stdioPipeSize)
	}
}

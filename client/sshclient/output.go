package sshclient

import (
	"io"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// ExitOutputGone is the exit status of a session whose local output went
// away: 128 + SIGPIPE, what a shell reports for any pipeline writer whose
// reader left (`agent ssh ws -- cat log | head`).
const ExitOutputGone = 128 + int(unix.SIGPIPE)

// catchSIGPIPE makes a write to a closed stdout or stderr fail with EPIPE
// until stop is called, instead of killing the process at once (Go's
// default for file descriptors 1 and 2): killed, a client neither closes
// its SSH session, which then runs on in the workspace until keepalives
// give up, nor says goodbye to the coordinator, so the workspace keeps its
// peer as lost.
func catchSIGPIPE() (stop func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, unix.SIGPIPE)
	return func() { signal.Stop(ch) }
}

// outputWriter is a session's stdout: once a write fails, there is nowhere
// for the remote command's output to go, so it closes the session (the
// workspace hangs the command up) and remembers that.
type outputWriter struct {
	w     io.Writer
	close func() error
	once  sync.Once
	gone  atomic.Bool
}

func (o *outputWriter) Write(p []byte) (int, error) {
	n, err := o.w.Write(p)
	if err != nil {
		o.once.Do(func() {
			o.gone.Store(true)
			_ = o.close()
		})
	}
	return n, err
}

// result is the session's exit status, unless its output went away first.
func (o *outputWriter) result(code int, err error) (int, error) {
	if o.gone.Load() {
		return ExitOutputGone, nil
	}
	return code, err
}

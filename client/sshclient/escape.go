package sshclient

import (
	"fmt"
	"io"
	"sync"
)

// escapeHelp is what ~? prints (the terminal is in raw mode: \r\n).
const escapeHelp = "Supported escape sequences:\r\n" +
	"  ~.   - terminate the connection (and the session)\r\n" +
	"  ~?   - this message\r\n" +
	"  ~~   - send the escape character by typing it twice\r\n" +
	"(Note that escapes are only recognized immediately after newline.)\r\n"

// escapeReader passes keystrokes on to the session, but reads OpenSSH's
// escape sequences at the start of a line: ~. ends the connection (the
// way out of a session whose network is gone), ~? lists the escapes, ~~
// sends one ~. Any other character after ~ is sent with the ~.
type escapeReader struct {
	r          io.Reader
	help       io.Writer
	disconnect func()

	buf       []byte
	lineStart bool
	tilde     bool // a ~ at line start is held back, waiting for the next key
	once      sync.Once
}

func newEscapeReader(r io.Reader, help io.Writer, disconnect func()) *escapeReader {
	return &escapeReader{r: r, help: help, disconnect: disconnect, lineStart: true}
}

func (e *escapeReader) Read(p []byte) (int, error) {
	if len(p) < 2 {
		// Room for a held ~ and the key after it.
		var two [2]byte
		n, err := e.Read(two[:])
		copy(p, two[:n])
		return min(n, len(p)), err
	}
	for {
		if cap(e.buf) < len(p)/2 {
			e.buf = make([]byte, len(p)/2)
		}
		in := e.buf[:len(p)/2]
		n, err := e.r.Read(in)
		out := p[:0]
		for _, c := range in[:n] {
			if e.tilde {
				e.tilde = false
				switch c {
				case '.':
					e.once.Do(func() {
						fmt.Fprint(e.help, "~.\r\n")
						e.disconnect()
					})
					return len(out), io.EOF
				case '?':
					fmt.Fprint(e.help, "~?\r\n"+escapeHelp)
					e.lineStart = true
					continue
				case '~':
					out = append(out, '~')
					e.lineStart = false
					continue
				default:
					out = append(out, '~')
				}
			} else if c == '~' && e.lineStart {
				e.tilde = true
				continue
			}
			out = append(out, c)
			e.lineStart = c == '\r' || c == '\n'
		}
		if len(out) > 0 || err != nil {
			return len(out), err
		}
	}
}

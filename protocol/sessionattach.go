package protocol

import (
	"fmt"
	"regexp"
)

// SessionAttachChannel is the SSH channel type of a reconnecting terminal
// session on the workspace's SSH server: `agent ssh` opens it instead of a
// plain "session" channel, so the shell outlives the connection and the
// client can come back to it. OpenSSH clients never ask for it and keep
// plain sessions.
//
// The channel's extra data is an SSH-marshalled SessionAttach. The server
// answers an accepted channel with SessionAttachHeaderLen bytes, the
// big-endian offset in the session's output of the first byte that
// follows; after that the channel carries raw terminal output one way and
// keystrokes the other. "window-change" requests resize the terminal. When
// the session's process ends the server sends "exit-status" (or
// "exit-signal") and closes the channel.
const SessionAttachChannel = "session-attach@agentd"

// SessionAttachHeaderLen is the length of the server's first bytes on an
// accepted session-attach channel.
const SessionAttachHeaderLen = 8

// SessionAttach is what a client asks for when it (re)attaches.
type SessionAttach struct {
	// Name identifies the session on the workspace (SessionNameRE).
	Name string
	// Offset is how many bytes of the session's output the client has
	// already shown; the server replays from there, or from the oldest
	// byte it still keeps when Offset fell out of its scrollback.
	Offset uint64
	// Create starts a new session when none has this name. A client
	// coming back after a disconnect sends false, so a session that ended
	// meanwhile is reported instead of silently replaced.
	Create bool
	// Term, Cols, Rows and Modes describe the client's terminal, as in a
	// "pty-req"; Term and Modes apply only to a new session.
	Term  string
	Cols  uint32
	Rows  uint32
	Modes string
}

// SessionNameRE is what a session name may look like: it is typed by
// people (`agent ssh ws --session NAME`) and appears in logs.
var SessionNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidSessionName says in one line what is wrong with a session name.
func ValidSessionName(name string) error {
	if !SessionNameRE.MatchString(name) {
		return fmt.Errorf("session name %q is not valid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

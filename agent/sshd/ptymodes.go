package sshd

import (
	"encoding/binary"
	"os"

	"golang.org/x/sys/unix"
)

// ptyRequest is the payload of a "pty-req" (RFC 4254 §6.2).
type ptyRequest struct {
	Term     string
	Cols     uint32
	Rows     uint32
	WidthPx  uint32
	HeightPx uint32
	Modes    string
}

type windowChange struct {
	Cols     uint32
	Rows     uint32
	WidthPx  uint32
	HeightPx uint32
}

// Terminal mode opcodes (RFC 4254 §8), mapped to Linux termios.
var (
	ccModes = map[byte]int{
		1: unix.VINTR, 2: unix.VQUIT, 3: unix.VERASE, 4: unix.VKILL, 5: unix.VEOF,
		6: unix.VEOL, 7: unix.VEOL2, 8: unix.VSTART, 9: unix.VSTOP, 10: unix.VSUSP,
		12: unix.VREPRINT, 13: unix.VWERASE, 14: unix.VLNEXT, 18: unix.VDISCARD,
	}
	iflagModes = map[byte]uint32{
		30: unix.IGNPAR, 31: unix.PARMRK, 32: unix.INPCK, 33: unix.ISTRIP, 34: unix.INLCR,
		35: unix.IGNCR, 36: unix.ICRNL, 37: unix.IUCLC, 38: unix.IXON, 39: unix.IXANY,
		40: unix.IXOFF, 41: unix.IMAXBEL, 42: unix.IUTF8,
	}
	lflagModes = map[byte]uint32{
		50: unix.ISIG, 51: unix.ICANON, 52: unix.XCASE, 53: unix.ECHO, 54: unix.ECHOE,
		55: unix.ECHOK, 56: unix.ECHONL, 57: unix.NOFLSH, 58: unix.TOSTOP, 59: unix.IEXTEN,
		60: unix.ECHOCTL, 61: unix.ECHOKE, 62: unix.PENDIN,
	}
	oflagModes = map[byte]uint32{
		70: unix.OPOST, 71: unix.OLCUC, 72: unix.ONLCR, 73: unix.OCRNL, 74: unix.ONOCR, 75: unix.ONLRET,
	}
	cflagModes = map[byte]uint32{
		90: unix.CS7, 91: unix.CS8, 92: unix.PARENB, 93: unix.PARODD,
	}
)

// applyTerminalModes sets the client's terminal modes on the new PTY so
// that erase, interrupt and UTF-8 line editing behave as on the client's
// own terminal. Unknown opcodes are skipped; a malformed list stops parsing.
func applyTerminalModes(tty *os.File, modes []byte) error {
	rc, err := tty.SyscallConn()
	if err != nil {
		return err
	}
	var ioErr error
	if err := rc.Control(func(fd uintptr) { ioErr = setModes(int(fd), modes) }); err != nil {
		return err
	}
	return ioErr
}

func setModes(fd int, modes []byte) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	set := func(flags *uint32, bit uint32, on bool) {
		if on {
			*flags |= bit
		} else {
			*flags &^= bit
		}
	}
	for len(modes) > 0 {
		op := modes[0]
		if op == 0 || op >= 160 {
			break
		}
		if len(modes) < 5 {
			break
		}
		arg := binary.BigEndian.Uint32(modes[1:5])
		modes = modes[5:]
		if idx, ok := ccModes[op]; ok {
			t.Cc[idx] = uint8(arg)
		} else if bit, ok := iflagModes[op]; ok {
			set(&t.Iflag, bit, arg != 0)
		} else if bit, ok := lflagModes[op]; ok {
			set(&t.Lflag, bit, arg != 0)
		} else if bit, ok := oflagModes[op]; ok {
			set(&t.Oflag, bit, arg != 0)
		} else if bit, ok := cflagModes[op]; ok {
			if op == 90 || op == 91 {
				if arg != 0 {
					t.Cflag = t.Cflag&^unix.CSIZE | bit
				}
			} else {
				set(&t.Cflag, bit, arg != 0)
			}
		}
	}
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

package sshd

import (
	"bufio"
	"encoding/binary"
	"io"
	"sync"
)

// OpenSSH's sftp client (scp uses it too) moves files in 32 KiB requests
// unless the server answers its limits@openssh.com request, as OpenSSH's
// own sftp-server does; then it uses 255 KiB requests, eight times fewer
// requests, replies, SSH packets and file writes. pkg/sftp does not know the
// extension, so sftpLimits, between the session channel and pkg/sftp's
// server, advertises it in the version packet and answers it itself.

// SFTP packet types and limits (draft-ietf-secsh-filexfer-02, OpenSSH's
// PROTOCOL file).
const (
	sftpVersion       = 2
	sftpExtended      = 200
	sftpExtendedReply = 201
	sftpLimitsName    = "limits@openssh.com"

	// sftpMaxPacket is the largest packet pkg/sftp's server reads (its
	// maxMsgLength); reads and writes leave room for the packet's header.
	sftpMaxPacket   = 256 << 10
	sftpMaxTransfer = sftpMaxPacket - 1024
)

// sftpLimits is the io.ReadWriter pkg/sftp's server runs on.
type sftpLimits struct {
	ch     io.Writer
	in     *bufio.Reader
	inLeft int // bytes of the client's current packet not yet passed on

	mu        sync.Mutex // whole packets only, from the server or from us
	out       []byte     // the server's packet being written
	versioned bool       // the version packet went out
}

func newSFTPLimits(ch io.ReadWriter) *sftpLimits {
	return &sftpLimits{ch: ch, in: bufio.NewReaderSize(ch, 64<<10)}
}

// Read passes the client's packets on, except limits requests, which it
// answers.
func (s *sftpLimits) Read(p []byte) (int, error) {
	for s.inLeft == 0 {
		hdr, err := s.in.Peek(9) // length, type, request id
		if len(hdr) < 9 {
			if len(hdr) == 0 {
				return 0, err
			}
			s.inLeft = len(hdr) // a truncated packet: pkg/sftp reports it
			break
		}
		length := int(binary.BigEndian.Uint32(hdr))
		if hdr[4] == sftpExtended && length < 1024 {
			if pkt, err := s.in.Peek(4 + length); err == nil && isLimitsRequest(pkt[9:]) {
				id := binary.BigEndian.Uint32(hdr[5:])
				_, _ = s.in.Discard(4 + length)
				if err := s.writePacket(limitsReply(id)); err != nil {
					return 0, err
				}
				continue
			}
		}
		s.inLeft = 4 + length
	}
	n, err := s.in.Read(p[:min(len(p), s.inLeft)])
	s.inLeft -= n
	return n, err
}

// isLimitsRequest reports whether an extended request's body names
// limits@openssh.com.
func isLimitsRequest(body []byte) bool {
	if len(body) < 4 {
		return false
	}
	n := int(binary.BigEndian.Uint32(body))
	return n == len(sftpLimitsName) && len(body) >= 4+n && string(body[4:4+n]) == sftpLimitsName
}

// limitsReply answers request id with our limits; 0 open handles means no
// limit.
func limitsReply(id uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, 1+4+4*8)
	b = append(b, sftpExtendedReply)
	b = binary.BigEndian.AppendUint32(b, id)
	for _, v := range []uint64{sftpMaxPacket, sftpMaxTransfer, sftpMaxTransfer, 0} {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	return b
}

// Write collects the server's writes (pkg/sftp writes a packet's header
// and data separately) and sends each packet whole, the version packet with
// the limits extension added.
func (s *sftpLimits) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.out = append(s.out, p...)
	for len(s.out) >= 5 {
		size := 4 + int(binary.BigEndian.Uint32(s.out))
		if len(s.out) < size {
			break
		}
		pkt := s.out[:size]
		if !s.versioned && pkt[4] == sftpVersion {
			s.versioned = true
			pkt = withLimitsExtension(pkt)
		}
		if _, err := s.ch.Write(pkt); err != nil {
			return 0, err
		}
		s.out = s.out[:copy(s.out, s.out[size:])]
	}
	return len(p), nil
}

// withLimitsExtension appends the extension to a version packet.
func withLimitsExtension(pkt []byte) []byte {
	b := append([]byte(nil), pkt...)
	for _, s := range []string{sftpLimitsName, "1"} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	return b
}

func (s *sftpLimits) writePacket(pkt []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, err := s.ch.Write(pkt)
	return err
}

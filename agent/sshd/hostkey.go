package sshd

import (
	"github.com/agentd/agent/internal/atomicfile"

	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	gossh "golang.org/x/crypto/ssh"
)

// loadOrCreateHostKey returns the host key kept at path, creating an ed25519
// key there on first use. Clients pin this key (known_hosts), so it must
// survive restarts: it is generated once and never replaced while the file
// exists and parses.
func loadOrCreateHostKey(path string, logger *slog.Logger) (gossh.Signer, error) {
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		signer, perr := gossh.ParsePrivateKey(data)
		if perr != nil {
			return nil, fmt.Errorf("read SSH host key %s: %w (move the file away to generate a new key)", path, perr)
		}
		if fi, serr := os.Stat(path); serr == nil && fi.Mode().Perm()&0o077 != 0 {
			logger.Warn("SSH host key was readable by others; tightening to 0600", "path", path, "mode", fi.Mode().Perm().String())
			if cerr := os.Chmod(path, 0o600); cerr != nil {
				return nil, fmt.Errorf("restrict SSH host key %s to 0600: %w", path, cerr)
			}
		}
		return signer, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("read SSH host key: %w", err)
	}

	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate SSH host key: %w", err)
	}
	block, err := gossh.MarshalPrivateKey(priv, "agent host key")
	if err != nil {
		return nil, fmt.Errorf("encode SSH host key: %w", err)
	}
	if err := writeFileAtomic(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return nil, fmt.Errorf("store SSH host key: %w", err)
	}
	signer, err := gossh.NewSignerFromKey(priv)
	if err != nil {
		return nil, fmt.Errorf("use SSH host key: %w", err)
	}
	logger.Info("generated SSH host key", "path", path, "fingerprint", gossh.FingerprintSHA256(signer.PublicKey()))
	return signer, nil
}

// writeFileAtomic writes data to a temporary file next to path and renames it
// into place, so a crash never leaves a half-written key behind. A key that
// already appeared in the meantime (another agent process) wins: the link
// fails and the caller reads the existing one on the next start.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	// WriteNew links instead of renaming: never overwrite a key another
	// process wrote.
	return atomicfile.WriteNew(path, data, perm)
}

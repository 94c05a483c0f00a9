package coordinator

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"time"
)

// ticketPeriod is how long one session ticket key issues tickets; a ticket
// is accepted for one more period after that.
const ticketPeriod = 24 * time.Hour

// ticketSecret derives the root of the TLS session ticket keys from the
// certificate's private key. Go's default ticket keys are random per
// process, so after a restart every agent would need a full handshake at
// once; keys derived from the private key survive the restart and are the
// same on every replica sharing --tls-cert, so agents resume instead.
// Anyone holding the private key could read the tickets, but could also
// impersonate the coordinator outright.
func ticketSecret(cert tls.Certificate) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("reading the TLS private key for session tickets: %w", err)
	}
	return der, nil
}

// ticketKeys returns the keys for the period holding now (issues tickets)
// and the one before it (still accepted), so they rotate daily without
// state and agree across processes.
func ticketKeys(secret []byte, now time.Time) ([][32]byte, error) {
	period := now.Unix() / int64(ticketPeriod/time.Second)
	keys := make([][32]byte, 2)
	for i := range keys {
		var salt [8]byte
		binary.BigEndian.PutUint64(salt[:], uint64(period-int64(i)))
		k, err := hkdf.Key(sha256.New, secret, salt[:], "agentd coordinator TLS session ticket key", 32)
		if err != nil {
			return nil, err
		}
		copy(keys[i][:], k)
	}
	return keys, nil
}

// rotateTicketKeys sets cfg's ticket keys now and at every period boundary
// until ctx ends.
func rotateTicketKeys(ctx context.Context, cfg *tls.Config, secret []byte) {
	for {
		now := time.Now()
		keys, err := ticketKeys(secret, now)
		if err == nil {
			cfg.SetSessionTicketKeys(keys)
		}
		next := now.Truncate(ticketPeriod).Add(ticketPeriod)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(next)):
		}
	}
}

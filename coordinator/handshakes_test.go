package coordinator_test

import (
	"crypto/tls"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agent/coordinator"
	"github.com/agentd/agent/coordinator/coordclient"
)

// TestHandshakeGate: with one handshake at a time, many at once all
// succeed, handshakes that fail give their place back, a connection that
// sends nothing holds none, and one that waited past the queue bound is
// refused.
func TestHandshakeGate(t *testing.T) {
	start := func(t *testing.T, queueWait time.Duration) (dial func() error, addr string) {
		tc := startCoordinator(t, t.TempDir(), coordOpts{tweak: func(c *coordinator.Config) {
			c.Limits.MaxHandshakes = 1
			c.Limits.HandshakeQueueWait = queueWait
		}})
		cfg, err := coordclient.TLSConfig(tc.Fingerprint())
		if err != nil {
			t.Fatal(err)
		}
		cfg.ClientSessionCache = nil // full handshakes every time
		return func() error {
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", tc.Addr().String(), cfg)
			if err == nil {
				c.Close()
			}
			return err
		}, tc.Addr().String()
	}

	t.Run("bounded", func(t *testing.T) {
		dial, addr := start(t, 0)
		// Silent connections and ones that leave mid-handshake first.
		for range 3 {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
		}
		for range 3 {
			raw, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			cfg, _ := coordclient.TLSConfig("")
			cfg.InsecureSkipVerify = true
			// Sends its ClientHello, then leaves before the answer.
			if err := tls.Client(deafConn{raw}, cfg).Handshake(); err == nil {
				t.Fatal("a handshake that cannot read succeeded")
			}
			raw.Close()
		}
		var wg sync.WaitGroup
		errs := make(chan error, 40)
		for range 40 {
			wg.Go(func() { errs <- dial() })
		}
		wg.Wait() // each dial has 5 s for its handshake too
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("a handshake failed with one at a time and 40 waiting: %v", err)
			}
		}
	})

	t.Run("stale", func(t *testing.T) {
		dial, _ := start(t, time.Nanosecond)
		if err := dial(); err == nil {
			t.Fatal("a handshake that waited past the queue bound was done")
		}
	})
}

// deafConn writes but cannot read.
type deafConn struct{ net.Conn }

func (deafConn) Read([]byte) (int, error) { return 0, net.ErrClosed }

// Package speedtest measures throughput over one TCP connection, in either
// direction: the agent serves it on tailnet port 3 (reachable only from
// peers the coordinator introduced, like every agent port), and
// `agent speedtest` runs the client side.
//
// The wire: the client sends a 16-byte request ("AGST", a direction byte,
// three zero bytes, the duration in milliseconds as a big-endian uint32,
// four zero bytes). For Download the server sends data for the duration and
// closes; for Upload the client sends data for the duration, half-closes,
// and the server answers with the number of bytes it read (big-endian
// uint64).
package speedtest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Direction says which side sends.
type Direction byte

const (
	// Download: the server (the workspace) sends.
	Download Direction = 'd'
	// Upload: the client (the laptop) sends.
	Upload Direction = 'u'
)

func (d Direction) String() string {
	if d == Upload {
		return "upload"
	}
	return "download"
}

// MaxDuration bounds one direction of a test, so a request cannot keep
// the agent sending for long.
const MaxDuration = 30 * time.Second

// maxConcurrent tests at once on one agent; more are refused by closing.
const maxConcurrent = 2

const magic = "AGST"

const chunk = 128 << 10

// Serve answers speed tests on ln until ctx ends or ln fails.
func Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	sem := make(chan struct{}, maxConcurrent)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		select {
		case sem <- struct{}{}:
		default:
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			defer c.Close()
			stopConn := context.AfterFunc(ctx, func() { c.Close() })
			defer stopConn()
			_ = serveConn(c)
		}()
	}
}

func serveConn(c net.Conn) error {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var req [16]byte
	if _, err := io.ReadFull(c, req[:]); err != nil {
		return err
	}
	if string(req[:4]) != magic {
		return errors.New("not a speed test request")
	}
	d := time.Duration(binary.BigEndian.Uint32(req[8:12])) * time.Millisecond
	d = min(d, MaxDuration)
	switch Direction(req[4]) {
	case Download:
		_ = c.SetDeadline(time.Now().Add(d + 10*time.Second))
		buf := make([]byte, chunk)
		end := time.Now().Add(d)
		for time.Now().Before(end) {
			if _, err := c.Write(buf); err != nil {
				return err
			}
		}
		return nil
	case Upload:
		_ = c.SetDeadline(time.Now().Add(d + 10*time.Second))
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return err
		}
		var ans [8]byte
		binary.BigEndian.PutUint64(ans[:], uint64(n))
		_, err = c.Write(ans[:])
		return err
	}
	return fmt.Errorf("unknown direction %q", req[4])
}

// Result is one direction's measurement.
type Result struct {
	Direction Direction
	Bytes     int64
	Duration  time.Duration
}

// BitsPerSecond is the throughput.
func (r Result) BitsPerSecond() float64 {
	if r.Duration <= 0 {
		return 0
	}
	return float64(r.Bytes) * 8 / r.Duration.Seconds()
}

// Run runs one direction of a test over c (which it closes) for about d.
func Run(ctx context.Context, c net.Conn, dir Direction, d time.Duration) (Result, error) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	d = min(d, MaxDuration)
	var req [16]byte
	copy(req[:], magic)
	req[4] = byte(dir)
	binary.BigEndian.PutUint32(req[8:12], uint32(d/time.Millisecond))
	_ = c.SetDeadline(time.Now().Add(d + 20*time.Second))
	if _, err := c.Write(req[:]); err != nil {
		return Result{}, wrap(ctx, err)
	}
	res := Result{Direction: dir}
	switch dir {
	case Download:
		buf := make([]byte, chunk)
		var start time.Time
		for {
			n, err := c.Read(buf)
			if n > 0 && start.IsZero() {
				start = time.Now()
			}
			res.Bytes += int64(n)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return res, wrap(ctx, err)
			}
		}
		if !start.IsZero() {
			res.Duration = time.Since(start)
		}
	case Upload:
		buf := make([]byte, chunk)
		start := time.Now()
		end := start.Add(d)
		for time.Now().Before(end) {
			if _, err := c.Write(buf); err != nil {
				return res, wrap(ctx, err)
			}
		}
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			if err := cw.CloseWrite(); err != nil {
				return res, wrap(ctx, err)
			}
		} else {
			return res, errors.New("the connection cannot half-close; cannot end the upload")
		}
		var ans [8]byte
		if _, err := io.ReadFull(c, ans[:]); err != nil {
			return res, wrap(ctx, fmt.Errorf("reading the workspace's byte count: %w", err))
		}
		res.Bytes = int64(binary.BigEndian.Uint64(ans[:]))
		res.Duration = time.Since(start)
	default:
		return res, fmt.Errorf("unknown direction %q", byte(dir))
	}
	return res, nil
}

func wrap(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return err
}

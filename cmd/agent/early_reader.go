package main

import (
	"io"
	"os"
	"sync"

	"github.com/agentd/agent/client/sshclient"
)

// earlyReader reads its source from the start on a goroutine of its own,
// so that the end of the source is seen at once, even before anyone reads:
// `agent ssh --stdio` must notice OpenSSH closing its standard input while
// the tunnel is still being set up, without losing the bytes OpenSSH sent
// first (its version line).
type earlyReader struct {
	chunks  chan []byte
	closed  chan struct{}
	err     error // the source's error; read after chunks is closed
	pending []byte
	current []byte // the chunk pending points into, returned to the pool when used up
	pool    sync.Pool
}

// earlyChunk is the ProxyCommand bridge's chunk; four of them may wait
// while the tunnel is slower than OpenSSH.
const earlyChunk = sshclient.StdioChunk

func newEarlyReader(src io.Reader) *earlyReader {
	if f, ok := src.(*os.File); ok {
		sshclient.GrowPipe(f)
	}
	r := &earlyReader{chunks: make(chan []byte, 4), closed: make(chan struct{})}
	r.pool.New = func() any { return make([]byte, earlyChunk) }
	go r.fill(src)
	return r
}

func (r *earlyReader) fill(src io.Reader) {
	defer close(r.chunks)
	for {
		buf := r.pool.Get().([]byte)
		n, err := src.Read(buf[:earlyChunk])
		if n > 0 {
			r.chunks <- buf[:n]
		} else {
			r.pool.Put(buf)
		}
		if err != nil {
			r.err = err
			close(r.closed)
			return
		}
	}
}

// Closed is closed once the source has ended (EOF or an error).
func (r *earlyReader) Closed() <-chan struct{} { return r.closed }

func (r *earlyReader) Read(p []byte) (int, error) {
	if len(r.pending) == 0 {
		if r.current != nil {
			r.pool.Put(r.current[:cap(r.current)])
			r.current = nil
		}
		chunk, ok := <-r.chunks
		if !ok {
			if r.err == nil || r.err == io.EOF {
				return 0, io.EOF
			}
			return 0, r.err
		}
		r.current, r.pending = chunk, chunk
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

// WriteTo hands each chunk to w as it came, without the copy Read makes;
// io.Copy uses it, so the ProxyCommand's upload path costs no more than
// reading stdin directly.
func (r *earlyReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	if len(r.pending) > 0 {
		n, err := w.Write(r.pending)
		total += int64(n)
		r.pending = nil
		if err != nil {
			return total, err
		}
	}
	for chunk := range r.chunks {
		n, err := w.Write(chunk)
		total += int64(n)
		r.pool.Put(chunk[:cap(chunk)])
		if err != nil {
			return total, err
		}
	}
	if r.err != nil && r.err != io.EOF {
		return total, r.err
	}
	return total, nil
}

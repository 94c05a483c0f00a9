package sshd

import (
	"bytes"
	"testing"
)

// The scrollback keeps exactly the last size bytes, across wraps, and
// reads back any offset it still holds.
func TestRingKeepsTheLastBytes(t *testing.T) {
	r := ring{size: 10}
	var all []byte
	for i, chunk := range []string{"abc", "defghij", "klmnopqrstu", "v", "wxyz0123456789"} {
		r.write([]byte(chunk))
		all = append(all, chunk...)
		if r.end != uint64(len(all)) {
			t.Fatalf("after write %d: end %d, want %d", i, r.end, len(all))
		}
		wantStart := max(0, len(all)-r.size)
		if r.start() != uint64(wantStart) {
			t.Fatalf("after write %d: start %d, want %d", i, r.start(), wantStart)
		}
		for off := r.start(); off < r.end; off++ {
			var got []byte
			buf := make([]byte, 3)
			for o := off; o < r.end; {
				n := r.read(o, buf)
				if n == 0 {
					t.Fatalf("read at %d returned nothing", o)
				}
				got = append(got, buf[:n]...)
				o += uint64(n)
			}
			if !bytes.Equal(got, all[off:]) {
				t.Fatalf("after write %d, from %d: %q, want %q", i, off, got, all[off:])
			}
		}
	}
}

package main

import (
	"bytes"
	"io"
	"testing"
	"time"
)

// Bytes read early come out in order, through Read or WriteTo, and Closed
// reports the end before anyone reads.
func TestEarlyReader(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789abcdef"), 10000)
	for _, useWriteTo := range []bool{false, true} {
		r := newEarlyReader(bytes.NewReader(data))
		select {
		case <-r.Closed():
		case <-time.After(5 * time.Second):
			t.Fatal("Closed never closed for a source at EOF")
		}
		var got bytes.Buffer
		// A first small Read, then the rest.
		head := make([]byte, 7)
		n, err := r.Read(head)
		if err != nil {
			t.Fatal(err)
		}
		got.Write(head[:n])
		if useWriteTo {
			_, err = r.WriteTo(&got)
		} else {
			_, err = io.Copy(&got, struct{ io.Reader }{r})
		}
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), data) {
			t.Fatalf("WriteTo=%v: got %d bytes, want %d (or out of order)", useWriteTo, got.Len(), len(data))
		}
	}
}

package protocol

import (
	"sync"
	"testing"
)

// The coordinator encodes one message for many sessions at once, each at
// its own version; encoding must not write to the shared message (the race
// detector catches it if it does).
func TestEncodeLeavesSharedMessageAlone(t *testing.T) {
	sm := &ServerMessage{Type: TypeError, Error: &Error{Code: "x", Message: "shared"}}
	pm := &PeerMessage{Type: TypeUntunnel, Untunnel: &TunnelRequest{Agent: "ws"}}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := 1 + i%Version
			if _, err := EncodeServer(v, sm); err != nil {
				t.Error(err)
			}
			if _, err := EncodePeer(v, pm); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if sm.V != 0 || pm.V != 0 {
		t.Errorf("encoding stamped the caller's message: server v=%d, peer v=%d", sm.V, pm.V)
	}
}

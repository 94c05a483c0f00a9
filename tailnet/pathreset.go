package tailnet

import (
	"reflect"
	"unsafe"

	"github.com/tailscale/wireguard-go/device"
	"tailscale.com/types/key"
)

// magicsockForgetPath is magicsock's own reaction to a changed network,
// for one peer: it drops the peer's direct address, so packets go through
// DERP at once and discovery pings every endpoint again. Tailscale calls it
// for every peer on a link change and exports no way to do it for one.
//
//go:linkname magicsockForgetPath tailscale.com/wgengine/magicsock.(*endpoint).noteConnectivityChange
func magicsockForgetPath(ep unsafe.Pointer)

// forgetDirectPath makes magicsock stop trusting the direct path to the
// peer with node key k, in place: the WireGuard peer keeps its endpoint.
// Rebuilding the WireGuard peer instead (ResetDevicePeer) deadlocks while
// the peer carries traffic: RemovePeer holds the device's peer lock while it
// waits for the peer's receive goroutine, which may be waiting for room on
// the outbound queue that only the goroutine reading from the TUN empties,
// and that one waits for the peer lock. It reports false when magicsock
// does not know the peer or no longer has the method.
func (c *Conn) forgetDirectPath(k key.NodePublic) bool {
	ep, err := c.mc.ParseEndpoint(k.UntypedHexString())
	if err != nil || ep == nil {
		return false
	}
	v := reflect.ValueOf(ep)
	if v.Kind() != reflect.Pointer || v.Type().String() != "*magicsock.endpoint" || v.IsNil() {
		return false
	}
	magicsockForgetPath(v.UnsafePointer())
	return true
}

// restartSession makes WireGuard start a fresh handshake with the peer on
// its next packet, in place: the current keys stop being used for sending
// and the handshake backoff is cleared, as ResetDevicePeer achieves by
// removing the peer, but without RemovePeer's wait under the peer lock
// (see forgetDirectPath). Tailscale's engine keeps the device unexported.
// It reports false when the engine no longer has the field it reaches.
func (c *Conn) restartSession(k key.NodePublic) bool {
	v := reflect.ValueOf(c.eng)
	if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
		return false
	}
	f := v.Elem().FieldByName("wgdev")
	if !f.IsValid() || f.Type() != reflect.TypeFor[*device.Device]() {
		return false
	}
	dev := *(**device.Device)(unsafe.Pointer(f.UnsafeAddr()))
	if dev == nil {
		return false
	}
	if p, ok := dev.LookupActivePeer(device.NoisePublicKey(k.Raw32())); ok {
		p.ExpireCurrentKeypairs()
	}
	// A peer the device does not hold has no session: its next packet
	// creates it afresh.
	return true
}

// resetSession restarts the peer's WireGuard handshake in place, or, if
// that is impossible, by rebuilding the peer.
func (c *Conn) resetSession(k key.NodePublic) {
	if !c.restartSession(k) {
		c.logger.Warn("cannot restart a WireGuard session in place; rebuilding the peer, which can stall under load")
		c.eng.ResetDevicePeer(k)
	}
}

package tailnet

import (
	"reflect"
	"unsafe"

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

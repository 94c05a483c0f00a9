//go:build tools

// Package deps records the modules the project builds on before every
// package uses them, so that go.mod and go.sum stay complete while parts of
// the tree are being written. It is never compiled into the binary.
package deps

import (
	_ "github.com/coder/websocket"
	_ "github.com/creack/pty"
	_ "github.com/gliderlabs/ssh"
	_ "github.com/pkg/sftp"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/spf13/cobra"
	_ "github.com/vishvananda/netlink"
	_ "go.etcd.io/bbolt"
	_ "golang.org/x/crypto/ssh"
	_ "tailscale.com/derp/derpserver"
	_ "tailscale.com/net/netcheck"
	_ "tailscale.com/net/stunserver"
	_ "tailscale.com/tsd"
	_ "tailscale.com/wgengine"
	_ "tailscale.com/wgengine/netstack"
)

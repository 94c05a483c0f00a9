package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Role is what a peer connected to the coordinator is.
type Role string

const (
	RoleAgent  Role = "agent"
	RoleClient Role = "client"
)

// RejectReason says why the coordinator refused a message. Reasons are a
// small fixed set (each one a label value): add a constant here rather than
// passing free text such as an error message.
type RejectReason string

const (
	RejectMalformed    RejectReason = "malformed"    // not decodable, or fields out of range
	RejectTooLarge     RejectReason = "too_large"    // over the message size limit
	RejectUnauthorized RejectReason = "unauthorized" // token missing, unknown or revoked
	RejectForbidden    RejectReason = "forbidden"    // authenticated, but no grant for the target
	RejectUnknownPeer  RejectReason = "unknown_peer" // refers to a peer the coordinator does not know
	RejectRateLimited  RejectReason = "rate_limited" // sender over its message rate, or a new session over the per-token or per-address limits
)

// Coordinator is the metric set of `agent coordinator`.
//
// Series (all prefixed coordinator_):
//
//	peers_connected{role}                  gauge      peers with an open coordination stream (agent|client)
//	tunnels                                gauge      pairs of connected peers allowed to talk
//	node_update_fanout_seconds             histogram  from receiving a node update to handing it to every recipient
//	messages_rejected_total{reason}        counter    messages refused, by reason
type Coordinator struct {
	peers    *prometheus.GaugeVec
	tunnels  prometheus.Gauge
	fanout   prometheus.Histogram
	rejected *prometheus.CounterVec
}

// NewCoordinator creates the coordinator's metric set on r. It panics if a
// Coordinator set is already registered on r.
func NewCoordinator(r *Registry) *Coordinator {
	c := &Coordinator{
		peers: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "coordinator", Name: "peers_connected",
			Help: "Peers with an open coordination stream, by role.",
		}, []string{"role"}),
		tunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "coordinator", Name: "tunnels",
			Help: "Pairs of connected peers that are allowed to talk to each other.",
		}),
		fanout: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "coordinator", Name: "node_update_fanout_seconds",
			Help: "Time from receiving a node update to handing it to every peer that must see it.",
			// 50µs to ~3.3s: a local fan-out is sub-millisecond; seconds mean a stuck peer.
			Buckets: prometheus.ExponentialBuckets(50e-6, 4, 9),
		}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "coordinator", Name: "messages_rejected_total",
			Help: "Messages the coordinator refused, by reason.",
		}, []string{"reason"}),
	}
	r.mustRegister("coordinator", c.peers, c.tunnels, c.fanout, c.rejected)
	for _, role := range []Role{RoleAgent, RoleClient} {
		c.peers.WithLabelValues(string(role))
	}
	for _, reason := range []RejectReason{RejectMalformed, RejectTooLarge, RejectUnauthorized, RejectForbidden, RejectUnknownPeer, RejectRateLimited} {
		c.rejected.WithLabelValues(string(reason))
	}
	return c
}

// PeerConnected counts a peer whose coordination stream opened and returns
// the function to call when it closes. Calling that function more than once
// has no further effect.
func (c *Coordinator) PeerConnected(role Role) (disconnected func()) {
	if c == nil {
		return func() {}
	}
	return track(c.peers.WithLabelValues(string(role)))
}

// SetTunnels records how many pairs of connected peers may talk now.
func (c *Coordinator) SetTunnels(n int) {
	if c == nil {
		return
	}
	c.tunnels.Set(float64(n))
}

// ObserveFanout records how long one node update took to reach every
// recipient's send queue.
func (c *Coordinator) ObserveFanout(d time.Duration) {
	if c == nil {
		return
	}
	c.fanout.Observe(d.Seconds())
}

// MessageRejected counts a refused message.
func (c *Coordinator) MessageRejected(reason RejectReason) {
	if c == nil {
		return
	}
	c.rejected.WithLabelValues(string(reason)).Inc()
}

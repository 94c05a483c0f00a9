// Package metrics holds the Prometheus metrics of the agent and of the
// coordinator. Each process makes its own Registry (there is no global
// default registry), hangs the metric sets it needs on it, and serves
// Registry.Handler on its /metrics endpoint.
//
// The metric sets (Agent, Coordinator) have one method per event, so callers
// never touch label names or metric objects. Every method is safe on a nil
// receiver and then does nothing: code that is instrumented can run without
// metrics (in tests, or in a library use) without nil checks at each call.
package metrics

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
)

// Registry is the set of metrics one process exposes.
type Registry struct {
	reg *prometheus.Registry
}

// NewRegistry returns a registry that already carries the Go runtime and
// process collectors (memory, goroutines, open files, CPU), which are the
// first things to look at when an agent misbehaves.
func NewRegistry() *Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return &Registry{reg: reg}
}

// Register adds a collector of the caller's own (for example one that reads
// engine statistics on scrape). It fails if the collector's metrics clash
// with ones already registered.
func (r *Registry) Register(c prometheus.Collector) error {
	if err := r.reg.Register(c); err != nil {
		return fmt.Errorf("register metrics collector: %w", err)
	}
	return nil
}

// Handler serves the registry in the Prometheus text (or, when asked,
// OpenMetrics) exposition format. A collector that fails on one scrape does
// not hide the others: the handler serves what it gathered.
func (r *Registry) Handler() http.Handler {
	return promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{
		ErrorHandling:     promhttp.ContinueOnError,
		EnableOpenMetrics: true,
	})
}

// HandlerWithout is Handler minus the named metric families, for a
// listener that must not show them (peer names to every local user).
func (r *Registry) HandlerWithout(families ...string) http.Handler {
	drop := make(map[string]bool, len(families))
	for _, f := range families {
		drop[f] = true
	}
	g := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		mfs, err := r.reg.Gather()
		kept := mfs[:0]
		for _, mf := range mfs {
			if !drop[mf.GetName()] {
				kept = append(kept, mf)
			}
		}
		return kept, err
	})
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorHandling:     promhttp.ContinueOnError,
		EnableOpenMetrics: true,
	})
}

// mustRegister is used by the metric-set constructors: their metric names are
// fixed in this package, so a clash is a programming error (for example two
// Agent sets on one registry) and is reported as such.
func (r *Registry) mustRegister(set string, cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.reg.Register(c); err != nil {
			panic(fmt.Sprintf("metrics: a %s metric set is already registered on this registry: %v", set, err))
		}
	}
}

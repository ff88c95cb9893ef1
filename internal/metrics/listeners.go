package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/connlimit"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Listeners reports the connection caps of the daemon's listeners: how full
// each is and how often it had to make room. A climbing evicted count means a
// local process is holding connections it does not use.
type Listeners struct {
	open   *prometheus.Desc
	closed *prometheus.Desc
	lns    []namedListener
}

type namedListener struct {
	name string
	l    *connlimit.Listener
}

// NewListeners returns the collector; Add listeners, then register it.
func NewListeners() *Listeners {
	return &Listeners{
		open: prometheus.NewDesc(prometheus.BuildFQName(scaler.MetricsNamespace, "", "listener_connections"),
			"Connections open on a listener of the daemon (api, api_socket, metrics, agent_check, spoa).", []string{"listener"}, nil),
		closed: prometheus.NewDesc(prometheus.BuildFQName(scaler.MetricsNamespace, "", "listener_closed_total"),
			"Connections a full listener closed: evicted (the oldest that had sent no request, to make room) or rejected (every connection was busy).",
			[]string{"listener", "reason"}, nil),
	}
}

// Add reports ln under name.
func (m *Listeners) Add(name string, ln *connlimit.Listener) {
	m.lns = append(m.lns, namedListener{name, ln})
}

// Describe implements prometheus.Collector.
func (m *Listeners) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.open
	ch <- m.closed
}

// Collect implements prometheus.Collector.
func (m *Listeners) Collect(ch chan<- prometheus.Metric) {
	for _, ln := range m.lns {
		s := ln.l.Stats()
		ch <- prometheus.MustNewConstMetric(m.open, prometheus.GaugeValue, float64(s.Open), ln.name)
		ch <- prometheus.MustNewConstMetric(m.closed, prometheus.CounterValue, float64(s.Evicted), ln.name, "evicted")
		ch <- prometheus.MustNewConstMetric(m.closed, prometheus.CounterValue, float64(s.Rejected), ln.name, "rejected")
	}
}

// Package metrics records the reconciler's work in Prometheus: it is the
// daemon's scaler.Recorder.
package metrics

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Reconciler holds the reconciler's Prometheus metrics.
type Reconciler struct {
	slots            *prometheus.GaugeVec
	reservations     *prometheus.GaugeVec
	waitSeconds      *prometheus.HistogramVec
	launches         *prometheus.CounterVec
	terminations     *prometheus.CounterVec
	reconcileSeconds prometheus.Histogram
	reconcileErrors  prometheus.Counter
	leaseExpiries    *prometheus.CounterVec
	providerErrors   *prometheus.CounterVec
	readinessUp      prometheus.Gauge
	notices          *prometheus.CounterVec
}

var _ scaler.Recorder = (*Reconciler)(nil)

// NewReconciler creates the reconciler's metrics and registers them on reg
// (nil: not registered).
func NewReconciler(reg prometheus.Registerer) *Reconciler {
	const ns = scaler.MetricsNamespace
	m := &Reconciler{
		slots: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "slots",
			Help: "Slots by pool and state."}, []string{"pool", "state"}),
		reservations: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "reservations",
			Help: "Live reservations by pool and state (pending, ready)."}, []string{"pool", "state"}),
		waitSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "reservation_wait_seconds",
			Help:    "Time from reservation creation to slot assignment.",
			Buckets: []float64{0.05, 0.25, 1, 5, 15, 30, 60, 120, 300, 600, 1800}}, []string{"pool"}),
		launches: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "launches_total",
			Help: "Builder launches by pool and result (ok, capacity, throttled, error)."}, []string{"pool", "result"}),
		terminations: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "terminations_total",
			Help: "Builder terminations by pool and reason."}, []string{"pool", "reason"}),
		reconcileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "reconcile_duration_seconds",
			Help: "Duration of reconcile rounds.", Buckets: prometheus.ExponentialBuckets(0.001, 4, 8)}),
		reconcileErrors: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "reconcile_errors_total",
			Help: "Reconcile rounds that failed."}),
		leaseExpiries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "lease_expiries_total",
			Help: "Reservations whose lease expired without release."}, []string{"pool"}),
		providerErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "provider_errors_total",
			Help: "Failed provider and load balancer calls by operation."}, []string{"op"}),
		notices: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "interruption_notices_total",
			Help: "Notices that the provider takes a builder back, by pool and kind (interruption, rebalance)."}, []string{"pool", "kind"}),
		readinessUp: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "load_balancer_up",
			Help: "1 if the load balancer answered the last reconcile round."}),
	}
	if reg != nil {
		reg.MustRegister(m.slots, m.reservations, m.waitSeconds, m.launches, m.terminations,
			m.reconcileSeconds, m.reconcileErrors, m.leaseExpiries, m.providerErrors, m.readinessUp, m.notices)
	}
	return m
}

func (m *Reconciler) Round(took time.Duration, failed bool) {
	m.reconcileSeconds.Observe(took.Seconds())
	if failed {
		m.reconcileErrors.Inc()
	}
}

func (m *Reconciler) CallFailed(op string) { m.providerErrors.WithLabelValues(op).Inc() }

func (m *Reconciler) LoadBalancer(answered bool) {
	if answered {
		m.readinessUp.Set(1)
	} else {
		m.readinessUp.Set(0)
	}
}

func (m *Reconciler) Assigned(pool string, wait time.Duration) {
	m.waitSeconds.WithLabelValues(pool).Observe(wait.Seconds())
}

func (m *Reconciler) LeaseExpired(pool string) { m.leaseExpiries.WithLabelValues(pool).Inc() }

func (m *Reconciler) Launched(pool string, err error) {
	result := "ok"
	switch {
	case errors.Is(err, scaler.ErrNoCapacity):
		result = "capacity"
	case errors.Is(err, scaler.ErrThrottled):
		result = "throttled"
	case err != nil:
		result = "error"
	}
	m.launches.WithLabelValues(pool, result).Inc()
}

func (m *Reconciler) Terminated(pool string, cause scaler.Cause) {
	m.terminations.WithLabelValues(pool, string(cause)).Inc()
}

func (m *Reconciler) Noticed(pool string, kind scaler.NoticeKind) {
	m.notices.WithLabelValues(pool, string(kind)).Inc()
}

// Observed sets the slot and reservation gauges of every configured pool.
func (m *Reconciler) Observed(pol scaler.Policy, obs scaler.Observed) {
	for _, pp := range pol.Pools {
		for _, st := range scaler.SlotStates {
			n := 0
			for _, s := range obs.Slots {
				if s.Pool == pp.Name && s.State == st {
					n++
				}
			}
			m.slots.WithLabelValues(pp.Name, string(st)).Set(float64(n))
		}
		for _, st := range []scaler.ReservationState{scaler.Pending, scaler.Assigned} {
			n := 0
			for _, r := range obs.Reservations {
				if r.Pool == pp.Name && r.State == st {
					n++
				}
			}
			m.reservations.WithLabelValues(pp.Name, string(st)).Set(float64(n))
		}
	}
}

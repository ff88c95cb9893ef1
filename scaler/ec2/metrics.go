package ec2

import (
	"github.com/prometheus/client_golang/prometheus"

	promshare "guardianproject.dev/ops/nix-builder-autoscaler/internal/metrics"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// metrics are the provider's Prometheus counters. Several Providers (one
// per region) may share a Registerer: they then share the collectors.
type metrics struct {
	attempts      *prometheus.CounterVec // pool, market, type, result
	fallbacks     *prometheus.CounterVec // pool, kind
	capacity      *prometheus.CounterVec // pool, type, code
	throttles     *prometheus.CounterVec // op
	interruptions *prometheus.CounterVec // pool
	running       *prometheus.CounterVec // market
}

// Launch attempt results (the result label).
const (
	resultOK        = "ok"
	resultCapacity  = "capacity"
	resultThrottled = "throttled"
	resultError     = "error"
)

// Fallback kinds (the kind label).
const (
	fallbackNextOffering = "next_offering"
	fallbackOnDemand     = "on_demand"
)

func newMetrics(reg prometheus.Registerer) *metrics {
	const ns = scaler.MetricsNamespace
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return promshare.RegisterShared(reg, prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: name, Help: help}, labels))
	}
	return &metrics{
		attempts: counter("ec2_launch_attempts_total",
			"RunInstances attempts by pool, market, instance type and result (ok, capacity, throttled, error).",
			"pool", "market", "type", "result"),
		fallbacks: counter("ec2_fallbacks_total",
			"Launches that moved on after a capacity error: to the next offering (type x subnet) or to on-demand.",
			"pool", "kind"),
		capacity: counter("ec2_capacity_errors_total",
			"Capacity errors from RunInstances by pool, instance type and EC2 error code.",
			"pool", "type", "code"),
		throttles: counter("ec2_throttles_total",
			"EC2 requests answered with a throttling error (each HTTP attempt; the SDK retries them).",
			"op"),
		interruptions: counter("ec2_interruptions_total",
			"Spot instances seen stopped by EC2 (StateReason Server.SpotInstanceTermination), once per instance.",
			"pool"),
		running: counter("ec2_running_instance_seconds_total",
			"Instance-seconds of running builders by market, sampled at each List (running instances x time since the previous List).",
			"market"),
	}
}

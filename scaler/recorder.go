package scaler

import "time"

// Recorder is told what the reconciler observed and did, so that it can be
// counted. The daemon records into Prometheus (internal/metrics); the core
// knows nothing of how.
type Recorder interface {
	// Round: one round ended after took; failed if it returned an error.
	Round(took time.Duration, failed bool)
	// Observed: the fleet as a round saw it.
	Observed(pol Policy, obs Observed)
	// CallFailed: a provider or load balancer call failed; op is one of
	// list, notices, bind, quiesce, terminate.
	CallFailed(op string)
	// LoadBalancer: whether the load balancer answered this round.
	LoadBalancer(answered bool)
	// Assigned: a reservation of pool got a builder after waiting wait.
	Assigned(pool string, wait time.Duration)
	// LeaseExpired: a reservation of pool ended without being released.
	LeaseExpired(pool string)
	// Launched: a launch in pool was tried; err is its failure, if any.
	Launched(pool string, err error)
	// Terminated: a builder of pool was terminated, for cause.
	Terminated(pool string, cause Cause)
	// Noticed: the provider announced that it takes back a builder of
	// pool (counted once per instance and kind).
	Noticed(pool string, kind NoticeKind)
}

// NopRecorder records nothing.
type NopRecorder struct{}

func (NopRecorder) Round(time.Duration, bool)      {}
func (NopRecorder) Observed(Policy, Observed)      {}
func (NopRecorder) CallFailed(string)              {}
func (NopRecorder) LoadBalancer(bool)              {}
func (NopRecorder) Assigned(string, time.Duration) {}
func (NopRecorder) LeaseExpired(string)            {}
func (NopRecorder) Launched(string, error)         {}
func (NopRecorder) Terminated(string, Cause)       {}
func (NopRecorder) Noticed(string, NoticeKind)     {}

// MetricsNamespace prefixes every metric of the autoscaler, whichever part
// registers it.
const MetricsNamespace = "nix_builder_autoscaler"

package config

import (
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// What a pool's settings mean beyond their values.

// Route is what sends a build to the pool: its systems and features.
func (p Pool) Route() scaler.Route {
	return scaler.Route{Systems: p.Systems, Features: p.Features}
}

// Serves reports whether the pool builds for system and offers every one of
// features.
func (p Pool) Serves(system string, features []string) bool {
	return p.Route().Serves(system, features)
}

// ForecastBuilders is the pool's forecast_max_builders, max_builders
// when it is not set.
func (p Pool) ForecastBuilders() int {
	if p.ForecastMaxBuilders == nil {
		return p.MaxBuilders
	}
	return *p.ForecastMaxBuilders
}

// DefaultBillingMinimum is a pool's billing_minimum when the file leaves it
// out: EC2 bills an instance for at least 60 seconds; a local builder costs
// nothing per launch.
func DefaultBillingMinimum(provider string) Duration {
	if provider == ProviderEC2 {
		return NewDuration(time.Minute)
	}
	return NewDuration(0)
}

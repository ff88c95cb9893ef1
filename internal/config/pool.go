package config

import (
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
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

// PoolOptions are the EC2 provider's settings of the pool: what the daemon
// launches with, and what preflight dry-runs.
func (e EC2) PoolOptions() ec2prov.PoolOptions {
	version := e.LaunchTemplateVersion
	if e.LaunchTemplateID == "" && e.LaunchTemplateName == "" {
		version = "" // the default "$Default" means nothing without a template
	}
	return ec2prov.PoolOptions{LaunchTemplateID: e.LaunchTemplateID, LaunchTemplateName: e.LaunchTemplateName,
		LaunchTemplateVersion: version, AMI: e.AMI, InstanceTypes: e.InstanceTypes, Subnets: e.Subnets,
		SecurityGroups: e.SecurityGroups, InstanceProfile: e.InstanceProfile, KeyName: e.KeyName,
		RootVolumeGB: e.RootVolumeGB, RootDeviceName: e.RootDeviceName, UserData: e.UserData, Market: e.Market,
		OnDemandFallback: e.OnDemandFallback, NestedVirtualization: e.NestedVirtualization, UnavailableFor: e.UnavailableFor.D()}
}

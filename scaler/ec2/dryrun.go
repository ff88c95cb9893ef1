package ec2

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/aws/aws-sdk-go-v2/aws"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// CodeDryRunOK is EC2's answer to a DryRun request that would have
// succeeded; CodeUnauthorized its answer when the caller may not make it.
const (
	CodeDryRunOK     = "DryRunOperation"
	CodeUnauthorized = "UnauthorizedOperation"
)

// DryRunSlot is the slot (and launch id) a dry run renders the user data
// and tags with: a real launch's are per slot, but any valid name asks
// for the same permissions.
const DryRunSlot = "preflight"

// DryRun names one offering of a pool for DryRunLaunch.
type DryRun struct {
	Pool, Market, InstanceType, Subnet string
	// WithoutTags leaves out the tags on instance and volumes: comparing
	// a dry run with and without them tells a missing ec2:CreateTags
	// permission from a missing ec2:RunInstances one.
	WithoutTags bool
}

// ErrDryRunIgnored: the endpoint launched an instance although DryRun
// was set (an EC2 stand-in without DryRun support). Terminate it.
var ErrDryRunIgnored = errors.New("RunInstances ignored DryRun and launched an instance")

// DryRunLaunch asks EC2 whether the pool's launch of one offering would be
// allowed: the very request Launch makes (built by runInput, user data
// rendered for DryRunSlot), with DryRun set. nil means EC2 answered
// DryRunOperation; otherwise the error is EC2's (errorCode and the SDK's
// smithy.APIError see its code), or ErrDryRunIgnored.
func (p *Provider) DryRunLaunch(ctx context.Context, d DryRun) error {
	pl, ok := p.pools[d.Pool]
	if !ok {
		return fmt.Errorf("ec2 provider: unknown pool %q", d.Pool)
	}
	if d.Market != MarketSpot && d.Market != MarketOnDemand {
		return fmt.Errorf("ec2 provider: pool %q: market %q: want %q or %q", d.Pool, d.Market, MarketSpot, MarketOnDemand)
	}
	if !slices.Contains(pl.InstanceTypes, d.InstanceType) || !slices.Contains(pl.Subnets, d.Subnet) {
		return fmt.Errorf("ec2 provider: pool %q: %s in %s is not one of its offerings", d.Pool, d.InstanceType, d.Subnet)
	}
	req := scaler.LaunchRequest{Pool: d.Pool, Slot: DryRunSlot, LaunchID: DryRunSlot}
	userData, err := p.renderUserData(pl, req)
	if err != nil {
		return fmt.Errorf("ec2 provider: pool %q: %w", d.Pool, err)
	}
	in := p.runInput(pl, req, offering{market: d.Market, typ: d.InstanceType, subnet: d.Subnet}, userData)
	in.DryRun = aws.Bool(true)
	if d.WithoutTags {
		in.TagSpecifications = nil
	}
	out, err := p.api.RunInstances(ctx, in, p.callOpts(opRun)...)
	switch {
	case errorCode(err) == CodeDryRunOK:
		return nil
	case err != nil:
		return err
	}
	var ids []string
	for _, i := range out.Instances {
		ids = append(ids, aws.ToString(i.InstanceId))
	}
	return fmt.Errorf("%w: %v", ErrDryRunIgnored, ids)
}

// ErrorCode is the EC2 (or other AWS service) error code in err, "" if
// it carries none.
func ErrorCode(err error) string { return errorCode(err) }

// ErrorMessage is the AWS error message in err, or err's text.
func ErrorMessage(err error) string { return errorMessage(err) }

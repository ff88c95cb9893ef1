package ec2

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// userDataVars are the fields of the user data template.
type userDataVars struct {
	Cluster, Pool, Slot, LaunchID string
}

// safeName is what a pool or slot name may be before it is put into
// user data, which a shell runs: config validation and the store allow no
// more, and this keeps it so whatever the caller passes.
var safeName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

func (p *Provider) renderUserData(pl *pool, req scaler.LaunchRequest) (string, error) {
	for _, v := range []string{req.Pool, req.Slot} {
		if !safeName.MatchString(v) {
			return "", fmt.Errorf("refusing to render user data for name %q: only lower-case letters, digits, '_' and '-' may reach a shell", v)
		}
	}
	if pl.userData == nil {
		return "", nil
	}
	var b bytes.Buffer
	err := pl.userData.Execute(&b, userDataVars{Cluster: p.cluster, Pool: req.Pool, Slot: req.Slot, LaunchID: req.LaunchID})
	if err != nil {
		return "", fmt.Errorf("user data template: %w", err)
	}
	if b.Len() > maxUserData {
		return "", fmt.Errorf("user data is %d bytes, EC2 takes at most %d", b.Len(), maxUserData)
	}
	return base64.StdEncoding.EncodeToString(b.Bytes()), nil
}

// Launch starts one instance for req's slot (see the package comment for
// the order of offerings and the fallbacks) and returns it as RunInstances
// reported it, usually pending. Errors name the pool; ErrNoCapacity and
// ErrThrottled mark the errors worth retrying later.
func (p *Provider) Launch(ctx context.Context, req scaler.LaunchRequest) (scaler.Instance, error) {
	pl, ok := p.pools[req.Pool]
	if !ok {
		return scaler.Instance{}, fmt.Errorf("ec2 provider: unknown pool %q", req.Pool)
	}
	if req.Slot == "" {
		return scaler.Instance{}, fmt.Errorf("ec2 provider: pool %q: launch request without slot", req.Pool)
	}
	if err := ctx.Err(); err != nil {
		return scaler.Instance{}, err
	}
	userData, err := p.renderUserData(pl, req)
	if err != nil {
		return scaler.Instance{}, fmt.Errorf("ec2 provider: pool %q: %w", req.Pool, err)
	}
	markets := []string{pl.market}
	if pl.market == MarketSpot && pl.OnDemandFallback {
		markets = append(markets, MarketOnDemand)
	}
	start := int((pl.next.Add(1) - 1) % uint64(len(pl.Subnets)))
	var failed []string // "spot c8i.large in subnet-a: InsufficientInstanceCapacity"
	skipped, tried := 0, 0
	lastMarket := "" // market of the previous attempt
	for mi, market := range markets {
		if mi > 0 {
			p.m.fallbacks.WithLabelValues(pl.name, fallbackOnDemand).Inc()
			p.log.Warn("no spot capacity; falling back to on-demand", "pool", pl.name, "slot", req.Slot)
		}
	offerings:
		for _, typ := range pl.InstanceTypes {
			for j := range pl.Subnets {
				off := offering{market: market, typ: typ, subnet: pl.Subnets[(start+j)%len(pl.Subnets)]}
				if _, ok := p.unavailableUntil(off); ok {
					skipped++
					continue
				}
				if lastMarket == market {
					p.m.fallbacks.WithLabelValues(pl.name, fallbackNextOffering).Inc()
				}
				lastMarket = market
				tried++
				in, err := p.runInstance(ctx, pl, req, off, userData)
				if err == nil {
					p.m.attempts.WithLabelValues(pl.name, market, typ, resultOK).Inc()
					p.log.Info("ec2 instance launched", "pool", pl.name, "slot", req.Slot, "instance", in.ID,
						"type", in.Type, "market", in.Market, "zone", in.Zone, "subnet", off.subnet,
						"launch_id", req.LaunchID, "attempts", tried)
					return in, nil
				}
				code := errorCode(err)
				switch {
				case capacityCodes[code]:
					p.m.attempts.WithLabelValues(pl.name, market, typ, resultCapacity).Inc()
					p.m.capacity.WithLabelValues(pl.name, typ, code).Inc()
					what := code
					if code != "InsufficientInstanceCapacity" {
						what += " (" + errorMessage(err) + ")" // e.g. what is Unsupported
					}
					failed = append(failed, fmt.Sprintf("%s %s in %s: %s", market, typ, off.subnet, what))
					until := p.markUnavailable(off, pl.UnavailableFor)
					p.log.Warn("ec2 offering has no capacity", "pool", pl.name, "slot", req.Slot,
						"market", market, "type", typ, "subnet", off.subnet, "code", code, "skipped_until", until, "err", err)
					if market == MarketSpot && spotQuotaCodes[code] {
						p.markUnavailable(offering{market: MarketSpot}, pl.UnavailableFor)
						break offerings
					}
				case isThrottle(code):
					p.m.attempts.WithLabelValues(pl.name, market, typ, resultThrottled).Inc()
					return scaler.Instance{}, fmt.Errorf("ec2 provider: pool %q: launch %s %s in %s: %w: %w",
						pl.name, market, typ, off.subnet, ErrThrottled, err)
				default:
					if ctx.Err() == nil {
						p.m.attempts.WithLabelValues(pl.name, market, typ, resultError).Inc()
					}
					return scaler.Instance{}, fmt.Errorf("ec2 provider: pool %q: launch %s %s in %s: %w",
						pl.name, market, typ, off.subnet, err)
				}
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "ec2 provider: pool %q: %v in %s", pl.name, ErrNoCapacity, strings.Join(markets, " or "))
	if len(failed) > 0 {
		fmt.Fprintf(&b, ": %s", strings.Join(failed, "; "))
	}
	if skipped > 0 {
		fmt.Fprintf(&b, " (%d offerings skipped: capacity errors in the last %s)", skipped, pl.UnavailableFor)
	}
	if pl.market == MarketSpot && !pl.OnDemandFallback {
		b.WriteString(" (on-demand fallback is off)")
	}
	return scaler.Instance{}, &capacityError{msg: b.String()}
}

type capacityError struct{ msg string }

func (e *capacityError) Error() string { return e.msg }
func (e *capacityError) Unwrap() error { return ErrNoCapacity }

func (p *Provider) unavailableUntil(off offering) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.clock.Now()
	for _, k := range []offering{off, {market: off.market}} {
		until, ok := p.unavailable[k]
		if !ok {
			continue
		}
		if now.Before(until) {
			return until, true
		}
		delete(p.unavailable, k)
	}
	return time.Time{}, false
}

func (p *Provider) markUnavailable(off offering, d time.Duration) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	until := p.clock.Now().Add(d)
	p.unavailable[off] = until
	return until
}

// runInstance makes one RunInstances attempt with a fresh client token.
func (p *Provider) runInstance(ctx context.Context, pl *pool, req scaler.LaunchRequest, off offering, userData string) (scaler.Instance, error) {
	token, err := newToken()
	if err != nil {
		return scaler.Instance{}, err
	}
	in := p.runInput(pl, req, off, userData)
	in.ClientToken = aws.String(token)
	out, err := p.api.RunInstances(ctx, in, p.callOpts(opRun)...)
	if err != nil {
		return scaler.Instance{}, err
	}
	if len(out.Instances) != 1 {
		return scaler.Instance{}, fmt.Errorf("RunInstances returned %d instances, want 1", len(out.Instances))
	}
	inst := p.instance(out.Instances[0])
	// What was asked for, where the answer leaves it out.
	inst.Pool, inst.Slot, inst.LaunchID = req.Pool, req.Slot, req.LaunchID
	inst.Market = off.market
	if inst.Type == "" {
		inst.Type = off.typ
	}
	if inst.State == "" {
		inst.State = scaler.InstancePending
	}
	if inst.LaunchedAt.IsZero() {
		inst.LaunchedAt = p.clock.Now().UTC()
	}
	return inst, nil
}

// runInput is the RunInstances request for one offering, without its
// client token.
func (p *Provider) runInput(pl *pool, req scaler.LaunchRequest, off offering, userData string) *ec2.RunInstancesInput {
	tags := []types.Tag{
		{Key: aws.String(TagCluster), Value: aws.String(p.cluster)},
		{Key: aws.String(TagPool), Value: aws.String(req.Pool)},
		{Key: aws.String(TagSlot), Value: aws.String(req.Slot)},
		{Key: aws.String(TagLaunchID), Value: aws.String(req.LaunchID)},
		{Key: aws.String(TagName), Value: aws.String(p.cluster + "-" + req.Pool + "-" + req.Slot)},
	}
	in := &ec2.RunInstancesInput{
		MinCount:     aws.Int32(1),
		MaxCount:     aws.Int32(1),
		InstanceType: types.InstanceType(off.typ),
		SubnetId:     aws.String(off.subnet),
		MetadataOptions: &types.InstanceMetadataOptionsRequest{
			HttpTokens:   types.HttpTokensStateRequired,
			HttpEndpoint: types.InstanceMetadataEndpointStateEnabled,
		},
		TagSpecifications: []types.TagSpecification{
			{ResourceType: types.ResourceTypeInstance, Tags: tags},
			{ResourceType: types.ResourceTypeVolume, Tags: slices.Clone(tags)},
		},
		// A builder that powers itself off is gone, not a stopped
		// instance whose volumes keep costing.
		InstanceInitiatedShutdownBehavior: types.ShutdownBehaviorTerminate,
	}
	if len(pl.SecurityGroups) > 0 {
		in.SecurityGroupIds = slices.Clone(pl.SecurityGroups)
	}
	if pl.AMI != "" {
		in.ImageId = aws.String(pl.AMI)
	}
	if pl.LaunchTemplateID != "" || pl.LaunchTemplateName != "" {
		lt := &types.LaunchTemplateSpecification{}
		if pl.LaunchTemplateID != "" {
			lt.LaunchTemplateId = aws.String(pl.LaunchTemplateID)
		} else {
			lt.LaunchTemplateName = aws.String(pl.LaunchTemplateName)
		}
		if pl.LaunchTemplateVersion != "" {
			lt.Version = aws.String(pl.LaunchTemplateVersion)
		}
		in.LaunchTemplate = lt
	}
	if pl.KeyName != "" {
		in.KeyName = aws.String(pl.KeyName)
	}
	if pl.InstanceProfile != "" {
		if strings.HasPrefix(pl.InstanceProfile, "arn:") {
			in.IamInstanceProfile = &types.IamInstanceProfileSpecification{Arn: aws.String(pl.InstanceProfile)}
		} else {
			in.IamInstanceProfile = &types.IamInstanceProfileSpecification{Name: aws.String(pl.InstanceProfile)}
		}
	}
	if pl.RootVolumeGB > 0 {
		in.BlockDeviceMappings = []types.BlockDeviceMapping{{
			DeviceName: aws.String(pl.RootDeviceName),
			Ebs: &types.EbsBlockDevice{
				VolumeSize:          aws.Int32(int32(min(pl.RootVolumeGB, 1<<30))),
				VolumeType:          types.VolumeTypeGp3,
				DeleteOnTermination: aws.Bool(true),
			},
		}}
	}
	if userData != "" {
		in.UserData = aws.String(userData)
	}
	if off.market == MarketSpot {
		in.InstanceMarketOptions = &types.InstanceMarketOptionsRequest{
			MarketType: types.MarketTypeSpot,
			SpotOptions: &types.SpotMarketOptions{
				SpotInstanceType:             types.SpotInstanceTypeOneTime,
				InstanceInterruptionBehavior: types.InstanceInterruptionBehaviorTerminate,
			},
		}
	}
	if pl.NestedVirtualization {
		in.CpuOptions = &types.CpuOptionsRequest{NestedVirtualization: types.NestedVirtualizationSpecificationEnabled}
	}
	return in
}

func newToken() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("ec2 provider: client token: %w", err)
	}
	return "nba-" + hex.EncodeToString(b[:]), nil
}

// Package ec2 is the production provider: builders are AWS EC2 instances.
//
// Every instance is tagged in its RunInstances call (never afterwards), on
// the instance and its volumes, with TagCluster, TagPool, TagSlot,
// TagLaunchID and Name = <cluster>-<pool>-<slot>. List finds the cluster's
// instances with one paginated DescribeInstances filtered on TagCluster, so
// an instance launched just before a crash is found again; Terminate never
// touches an instance without this cluster's tag.
//
// Launch tries a pool's offerings (instance type x subnet, types in the
// configured order, the first subnet rotating per launch to spread the
// builders over zones) in the pool's market, Spot by default. A capacity
// error marks the offering unavailable for UnavailableFor and moves on;
// when every Spot offering failed and the pool allows it, Launch tries the
// same list on-demand. Any other error ends the launch at once. Each
// attempt has a fresh ClientToken; the SDK's own retries of one attempt
// reuse it, so a retried request never starts a second instance.
//
// One Provider serves the pools of one EC2 client (one region and
// account); pools in the same region must share a Provider, or each would
// list the others' instances too.
package ec2

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"text/template"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Tag keys set on every instance and volume at launch.
const (
	TagCluster  = "nix-builder-autoscaler:cluster"
	TagPool     = "nix-builder-autoscaler:pool"
	TagSlot     = "nix-builder-autoscaler:slot"
	TagLaunchID = "nix-builder-autoscaler:launch-id"
	TagName     = "Name"
)

// Markets.
const (
	MarketSpot     = "spot"
	MarketOnDemand = "on-demand"
)

// ReasonSpotInterruption is the StateReason code of an instance EC2 stopped
// to reclaim Spot capacity.
const ReasonSpotInterruption = "Server.SpotInstanceTermination"

// Defaults of PoolOptions.
const (
	DefaultUnavailableFor = 5 * time.Minute
	DefaultRootDeviceName = "/dev/xvda"
)

// maxUserData is EC2's limit on user data before base64 encoding.
const maxUserData = 16 << 10

// Errors callers may branch on (errors.Is).
var (
	// ErrNoCapacity: every offering of the pool failed with a capacity
	// error or is remembered as unavailable. Retry later.
	ErrNoCapacity = scaler.ErrNoCapacity
	// ErrThrottled: EC2 kept throttling after the SDK's retries. Nothing
	// was launched by this call; retry later.
	ErrThrottled = fmt.Errorf("%w by EC2", scaler.ErrThrottled)
	// ErrNotOwned: Terminate was asked to stop an instance that does not
	// carry this cluster's tag; it was left alone.
	ErrNotOwned = errors.New("instance is not tagged for this cluster")
)

// capacityCodes are the RunInstances error codes that mean "not here, not
// now": the offering is skipped and the next one tried.
var capacityCodes = map[string]bool{
	"InsufficientInstanceCapacity":      true, // no capacity of this type in this zone
	"InsufficientCapacity":              true,
	"InsufficientFreeAddressesInSubnet": true,
	"Unsupported":                       true, // the type is not offered in this zone (or not for this market)
	"capacity-not-available":            true, // Spot request status code
	"SpotMaxPriceTooLow":                true,
	"MaxSpotInstanceCountExceeded":      true, // account-wide Spot vCPU quota: all Spot offerings
	"VcpuLimitExceeded":                 true, // on-demand vCPU quota of the type's family class
	"InstanceLimitExceeded":             true,
}

// spotQuotaCodes exhaust every Spot offering at once.
var spotQuotaCodes = map[string]bool{"MaxSpotInstanceCountExceeded": true}

// PoolOptions configures one pool's launches.
type PoolOptions struct {
	// A launch template (by id or by name; Version empty means the
	// template's default version) and/or an AMI. The explicit settings
	// below override the template's.
	LaunchTemplateID      string
	LaunchTemplateName    string
	LaunchTemplateVersion string
	AMI                   string
	// InstanceTypes are tried in this order; Subnets (one per zone) are
	// tried for each type, starting at a subnet that rotates per launch.
	InstanceTypes  []string
	Subnets        []string
	SecurityGroups []string
	// InstanceProfile is the instance profile's name, or its ARN
	// ("arn:...").
	InstanceProfile string
	KeyName         string
	// RootVolumeGB > 0 sets the root volume's size (gp3, deleted on
	// termination) through a block device mapping for RootDeviceName.
	RootVolumeGB int
	// RootDeviceName must be the AMI's root device name, or the mapping
	// adds an empty extra volume instead of resizing the root. Default
	// "/dev/xvda" (NixOS, Amazon Linux and Debian AMIs; Ubuntu AMIs use
	// "/dev/sda1").
	RootDeviceName string
	// UserData is a text/template rendered per launch with .Cluster .Pool
	// .Slot .LaunchID; it is base64-encoded for RunInstances. At most
	// 16 KiB after rendering.
	UserData string
	// Market is "spot" or "on-demand"; empty means spot, or on-demand for
	// a nested-virtualization pool.
	Market string
	// OnDemandFallback lets a Spot pool launch on-demand when every Spot
	// offering failed with a capacity error.
	OnDemandFallback bool
	// NestedVirtualization launches with CpuOptions.NestedVirtualization
	// enabled (8th generation Intel types: c8i, m8i, r8i and their flex
	// variants).
	NestedVirtualization bool
	// UnavailableFor is how long an offering that failed with a capacity
	// error is skipped; 0 means DefaultUnavailableFor.
	UnavailableFor time.Duration
}

// EffectiveMarket is the market a pool's launches start in.
func (o PoolOptions) EffectiveMarket() string {
	switch {
	case o.Market != "":
		return o.Market
	case o.NestedVirtualization:
		return MarketOnDemand
	}
	return MarketSpot
}

// Options configures a Provider.
type Options struct {
	Cluster    string                 // tag value of TagCluster; List and Terminate see only this cluster
	Pools      map[string]PoolOptions // by pool name
	Logger     *slog.Logger           // nil discards
	Registerer prometheus.Registerer  // nil: metrics are not registered
	Clock      clock.Clock            // nil = clock.Real
}

type pool struct {
	PoolOptions
	name     string
	market   string
	userData *template.Template // nil without user data
	next     atomic.Uint64      // rotates the first subnet
}

// offering is one place to launch: market, instance type and subnet. An
// empty type and subnet stand for every offering of the market.
type offering struct {
	market, typ, subnet string
}

// Provider is the EC2 scaler.Provider. It is safe for concurrent use.
type Provider struct {
	api     ec2API
	cluster string
	pools   map[string]*pool
	log     *slog.Logger
	clock   clock.Clock
	m       *metrics
	limits  map[string]*bucket
	// pageSize is DescribeInstances' MaxResults (5..1000).
	pageSize int32

	mu          sync.Mutex
	unavailable map[offering]time.Time // offering → skipped until
	interrupted map[string]bool        // instance ids counted as interrupted
	lastList    time.Time
}

var _ scaler.Provider = (*Provider)(nil)

// New checks o and returns a Provider that calls api (NewClient's
// *ec2.Client in production).
func New(api API, o Options) (*Provider, error) {
	if api == nil {
		return nil, errors.New("ec2 provider: no EC2 client")
	}
	if o.Cluster == "" {
		return nil, errors.New("ec2 provider: cluster is required")
	}
	if len(o.Pools) == 0 {
		return nil, errors.New("ec2 provider: no pools")
	}
	p := &Provider{
		api:         api,
		cluster:     o.Cluster,
		pools:       map[string]*pool{},
		log:         o.Logger,
		clock:       o.Clock,
		m:           newMetrics(o.Registerer),
		limits:      map[string]*bucket{},
		pageSize:    500,
		unavailable: map[offering]time.Time{},
		interrupted: map[string]bool{},
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.clock == nil {
		p.clock = clock.Real{}
	}
	for op, l := range defaultLimits {
		p.limits[op] = newBucket(l.burst, l.rate)
	}
	for _, name := range slices.Sorted(maps.Keys(o.Pools)) {
		pl, err := newPool(name, o.Pools[name])
		if err != nil {
			return nil, fmt.Errorf("ec2 provider: pool %q: %w", name, err)
		}
		p.pools[name] = pl
	}
	return p, nil
}

func newPool(name string, o PoolOptions) (*pool, error) {
	pl := &pool{PoolOptions: o, name: name, market: o.EffectiveMarket()}
	pl.InstanceTypes = slices.Clone(o.InstanceTypes)
	pl.Subnets = slices.Clone(o.Subnets)
	pl.SecurityGroups = slices.Clone(o.SecurityGroups)
	switch {
	case pl.market != MarketSpot && pl.market != MarketOnDemand:
		return nil, fmt.Errorf("market %q: want %q or %q", o.Market, MarketSpot, MarketOnDemand)
	case len(o.InstanceTypes) == 0 || slices.Contains(o.InstanceTypes, ""):
		return nil, errors.New("instance types: need at least one, none empty")
	case len(o.Subnets) == 0 || slices.Contains(o.Subnets, ""):
		return nil, errors.New("subnets: need at least one, none empty")
	case o.LaunchTemplateID != "" && o.LaunchTemplateName != "":
		return nil, errors.New("launch template: set its id or its name, not both")
	case o.AMI == "" && o.LaunchTemplateID == "" && o.LaunchTemplateName == "":
		return nil, errors.New("need an AMI or a launch template")
	case o.LaunchTemplateVersion != "" && o.LaunchTemplateID == "" && o.LaunchTemplateName == "":
		return nil, errors.New("launch template version without a launch template")
	case o.RootVolumeGB < 0:
		return nil, fmt.Errorf("root volume size %d GB is negative", o.RootVolumeGB)
	case o.UnavailableFor < 0:
		return nil, fmt.Errorf("unavailable-for %s is negative", o.UnavailableFor)
	}
	if pl.UnavailableFor == 0 {
		pl.UnavailableFor = DefaultUnavailableFor
	}
	if pl.RootDeviceName == "" {
		pl.RootDeviceName = DefaultRootDeviceName
	}
	if o.UserData != "" {
		t, err := template.New(name + "/user-data").Option("missingkey=error").Parse(o.UserData)
		if err != nil {
			return nil, fmt.Errorf("user data template: %w", err)
		}
		pl.userData = t
	}
	return pl, nil
}

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

// Terminate terminates an instance of this cluster. It first reads the
// instance: one that no longer exists (or is already terminated) is
// success, one without this cluster's tag is left alone (ErrNotOwned).
func (p *Provider) Terminate(ctx context.Context, instanceID string) error {
	if instanceID == "" {
		return errors.New("ec2 provider: terminate: empty instance id")
	}
	out, err := p.api.DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{instanceID}}, p.callOpts(opDescribe)...)
	if err != nil {
		if notFound(err) {
			return nil
		}
		return fmt.Errorf("ec2 provider: terminate %s: describe: %w", instanceID, err)
	}
	var found *types.Instance
	for _, r := range out.Reservations {
		for i := range r.Instances {
			if aws.ToString(r.Instances[i].InstanceId) == instanceID {
				found = &r.Instances[i]
			}
		}
	}
	if found == nil {
		return nil
	}
	if tagValue(found.Tags, TagCluster) != p.cluster {
		return fmt.Errorf("ec2 provider: terminate %s: %w %q; not terminating it", instanceID, ErrNotOwned, p.cluster)
	}
	if found.State != nil && found.State.Name == types.InstanceStateNameTerminated {
		return nil
	}
	_, err = p.api.TerminateInstances(ctx, &ec2.TerminateInstancesInput{InstanceIds: []string{instanceID}}, p.callOpts(opTerminate)...)
	if err != nil {
		if notFound(err) {
			return nil
		}
		return fmt.Errorf("ec2 provider: terminate %s: %w", instanceID, err)
	}
	p.log.Info("ec2 instance terminated", "instance", instanceID,
		"pool", tagValue(found.Tags, TagPool), "slot", tagValue(found.Tags, TagSlot))
	return nil
}

func notFound(err error) bool {
	switch errorCode(err) {
	case "InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed":
		return true
	}
	return false
}

// List returns every instance tagged for this cluster, terminated ones
// included while EC2 still shows them (about an hour): their StateReason
// tells why a slot's builder went away. One paginated DescribeInstances,
// filtered on TagCluster.
func (p *Provider) List(ctx context.Context) ([]scaler.Instance, error) {
	in := &ec2.DescribeInstancesInput{
		Filters:    []types.Filter{{Name: aws.String("tag:" + TagCluster), Values: []string{p.cluster}}},
		MaxResults: aws.Int32(p.pageSize),
	}
	pages := ec2.NewDescribeInstancesPaginator(p.api, in)
	var out []scaler.Instance
	seen := map[string]bool{}
	for pages.HasMorePages() {
		page, err := pages.NextPage(ctx, p.callOpts(opDescribe)...)
		if err != nil {
			return nil, fmt.Errorf("ec2 provider: list: %w", err)
		}
		for _, r := range page.Reservations {
			for _, i := range r.Instances {
				id := aws.ToString(i.InstanceId)
				if id == "" || seen[id] || tagValue(i.Tags, TagCluster) != p.cluster {
					continue
				}
				seen[id] = true
				out = append(out, p.instance(i))
			}
		}
	}
	p.observe(out)
	return out, nil
}

// observe updates the metrics List feeds: interruptions (once per
// instance) and running instance-seconds.
func (p *Provider) observe(ins []scaler.Instance) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.clock.Now()
	var elapsed float64
	if !p.lastList.IsZero() && now.After(p.lastList) {
		elapsed = now.Sub(p.lastList).Seconds()
	}
	p.lastList = now
	running := map[string]int{}
	listed := map[string]bool{}
	for _, in := range ins {
		listed[in.ID] = true
		if in.State == scaler.InstanceRunning {
			running[in.Market]++
		}
		if in.StateReason == ReasonSpotInterruption && !p.interrupted[in.ID] {
			p.interrupted[in.ID] = true
			p.m.interruptions.WithLabelValues(in.Pool).Inc()
			p.log.Warn("spot instance interrupted", "instance", in.ID, "pool", in.Pool, "slot", in.Slot,
				"type", in.Type, "zone", in.Zone)
		}
	}
	for id := range p.interrupted {
		if !listed[id] {
			delete(p.interrupted, id)
		}
	}
	if elapsed > 0 {
		for market, n := range running {
			p.m.running.WithLabelValues(market).Add(float64(n) * elapsed)
		}
	}
}

// instance maps an EC2 instance to the scaler's view.
func (p *Provider) instance(i types.Instance) scaler.Instance {
	in := scaler.Instance{
		ID:        aws.ToString(i.InstanceId),
		Pool:      tagValue(i.Tags, TagPool),
		Slot:      tagValue(i.Tags, TagSlot),
		LaunchID:  tagValue(i.Tags, TagLaunchID),
		Type:      string(i.InstanceType),
		Market:    MarketOnDemand,
		PrivateIP: aws.ToString(i.PrivateIpAddress),
		PublicIP:  aws.ToString(i.PublicIpAddress),
	}
	if i.State != nil {
		in.State = scaler.InstanceState(i.State.Name)
	}
	if i.StateReason != nil {
		in.StateReason = aws.ToString(i.StateReason.Code)
	}
	if i.InstanceLifecycle == types.InstanceLifecycleTypeSpot {
		in.Market = MarketSpot
	}
	if i.Placement != nil {
		in.Zone = aws.ToString(i.Placement.AvailabilityZone)
	}
	if i.LaunchTime != nil {
		in.LaunchedAt = i.LaunchTime.UTC()
	}
	return in
}

func tagValue(tags []types.Tag, key string) string {
	for _, t := range tags {
		if aws.ToString(t.Key) == key {
			return aws.ToString(t.Value)
		}
	}
	return ""
}

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
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"text/template"
	"time"

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
	// Queue: an interruption queue feeds Notify, so Notices does not poll
	// DescribeSpotInstanceRequests.
	Queue bool
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
	// listed are the cluster's instances the last List returned; notices
	// holds what Notify was told, by instance.
	listed  map[string]bool
	notices map[string]heldNotice
	queue   bool
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
		listed:      map[string]bool{},
		notices:     map[string]heldNotice{},
		queue:       o.Queue,
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

package ec2

import (
	"context"
	"encoding/base64"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

const cluster = "ci"

func newClock() *clocktest.Clock { return clocktest.New(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)) }

type env struct {
	fake  *ec2test.Fake
	p     *Provider
	reg   *prometheus.Registry
	clock *clocktest.Clock
}

func spotPool() PoolOptions {
	return PoolOptions{
		AMI:            "ami-0123456789abcdef0",
		InstanceTypes:  []string{"m7i.xlarge", "m6i.xlarge"},
		Subnets:        []string{"subnet-a", "subnet-b"},
		SecurityGroups: []string{"sg-1"},
	}
}

func newEnv(t *testing.T, pools map[string]PoolOptions) *env {
	t.Helper()
	e := &env{fake: ec2test.New(), reg: prometheus.NewRegistry(), clock: newClock()}
	e.fake.Now = e.clock.Now
	e.fake.Zones["subnet-a"] = "us-east-1a"
	e.fake.Zones["subnet-b"] = "us-east-1b"
	e.fake.Zones["subnet-c"] = "us-east-1c"
	p, err := New(e.fake, Options{Cluster: cluster, Pools: pools, Registerer: e.reg, Clock: e.clock})
	if err != nil {
		t.Fatal(err)
	}
	e.p = p
	return e
}

// counter reads a counter's value from the registry (0 if absent).
func (e *env) counter(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "nix_builder_autoscaler_"+name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelsMatch(m, labels) {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func labelsMatch(m *dto.Metric, want map[string]string) bool {
	got := map[string]string{}
	for _, l := range m.GetLabel() {
		got[l.GetName()] = l.GetValue()
	}
	return maps.Equal(got, want)
}

func tagMap(tags []types.Tag) map[string]string {
	m := map[string]string{}
	for _, t := range tags {
		m[aws.ToString(t.Key)] = aws.ToString(t.Value)
	}
	return m
}

// attempts lists the RunInstances calls as "market type subnet".
func attempts(f *ec2test.Fake) []string {
	var out []string
	for _, in := range f.RunInputs() {
		market := "on-demand"
		if in.InstanceMarketOptions != nil {
			market = string(in.InstanceMarketOptions.MarketType)
		}
		out = append(out, market+" "+string(in.InstanceType)+" "+aws.ToString(in.SubnetId))
	}
	return out
}

func launch(t *testing.T, e *env, pool, slot string) scaler.Instance {
	t.Helper()
	in, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: pool, Slot: slot, LaunchID: "L-" + slot})
	if err != nil {
		t.Fatalf("launch %s/%s: %v", pool, slot, err)
	}
	return in
}

func TestLaunchSpotWithTagsInTheCall(t *testing.T) {
	po := spotPool()
	po.InstanceProfile = "nix-builder"
	po.KeyName = "ops"
	po.RootVolumeGB = 200
	po.UserData = "#!/bin/sh\necho {{.Cluster}} {{.Pool}} {{.Slot}} {{.LaunchID}}\n"
	e := newEnv(t, map[string]PoolOptions{"x86": po})

	got := launch(t, e, "x86", "slot1")

	runs := e.fake.RunInputs()
	if len(runs) != 1 {
		t.Fatalf("RunInstances calls = %d, want 1", len(runs))
	}
	in := runs[0]
	if aws.ToInt32(in.MinCount) != 1 || aws.ToInt32(in.MaxCount) != 1 {
		t.Errorf("MinCount/MaxCount = %d/%d, want 1/1", aws.ToInt32(in.MinCount), aws.ToInt32(in.MaxCount))
	}
	if aws.ToString(in.ClientToken) == "" {
		t.Error("no ClientToken")
	}
	mo := in.InstanceMarketOptions
	if mo == nil || mo.MarketType != types.MarketTypeSpot || mo.SpotOptions == nil ||
		mo.SpotOptions.SpotInstanceType != types.SpotInstanceTypeOneTime ||
		mo.SpotOptions.InstanceInterruptionBehavior != types.InstanceInterruptionBehaviorTerminate {
		t.Errorf("InstanceMarketOptions = %+v, want spot one-time terminate", mo)
	}
	if md := in.MetadataOptions; md == nil || md.HttpTokens != types.HttpTokensStateRequired || md.HttpEndpoint != types.InstanceMetadataEndpointStateEnabled {
		t.Errorf("MetadataOptions = %+v, want HttpTokens required, endpoint enabled", md)
	}
	wantTags := map[string]string{
		TagCluster: cluster, TagPool: "x86", TagSlot: "slot1", TagLaunchID: "L-slot1", TagName: "ci-x86-slot1",
	}
	specs := map[types.ResourceType]map[string]string{}
	for _, ts := range in.TagSpecifications {
		specs[ts.ResourceType] = tagMap(ts.Tags)
	}
	for _, rt := range []types.ResourceType{types.ResourceTypeInstance, types.ResourceTypeVolume} {
		if !maps.Equal(specs[rt], wantTags) {
			t.Errorf("%s tags = %v, want %v", rt, specs[rt], wantTags)
		}
	}
	if aws.ToString(in.ImageId) != po.AMI || in.LaunchTemplate != nil {
		t.Errorf("ImageId %q, LaunchTemplate %+v; want the AMI and no template", aws.ToString(in.ImageId), in.LaunchTemplate)
	}
	if in.InstanceType != "m7i.xlarge" || aws.ToString(in.SubnetId) != "subnet-a" {
		t.Errorf("offering %s in %s, want m7i.xlarge in subnet-a", in.InstanceType, aws.ToString(in.SubnetId))
	}
	if !slices.Equal(in.SecurityGroupIds, []string{"sg-1"}) || aws.ToString(in.KeyName) != "ops" {
		t.Errorf("SecurityGroupIds %v KeyName %q", in.SecurityGroupIds, aws.ToString(in.KeyName))
	}
	if in.IamInstanceProfile == nil || aws.ToString(in.IamInstanceProfile.Name) != "nix-builder" || in.IamInstanceProfile.Arn != nil {
		t.Errorf("IamInstanceProfile = %+v, want name nix-builder", in.IamInstanceProfile)
	}
	if len(in.BlockDeviceMappings) != 1 || aws.ToString(in.BlockDeviceMappings[0].DeviceName) != "/dev/xvda" ||
		aws.ToInt32(in.BlockDeviceMappings[0].Ebs.VolumeSize) != 200 || !aws.ToBool(in.BlockDeviceMappings[0].Ebs.DeleteOnTermination) {
		t.Errorf("BlockDeviceMappings = %+v", in.BlockDeviceMappings)
	}
	ud, err := base64.StdEncoding.DecodeString(aws.ToString(in.UserData))
	if want := "#!/bin/sh\necho ci x86 slot1 L-slot1\n"; err != nil || string(ud) != want {
		t.Errorf("user data = %q (%v), want %q", ud, err, want)
	}
	if in.CpuOptions != nil {
		t.Errorf("CpuOptions = %+v on a pool without nested virtualization", in.CpuOptions)
	}
	if in.InstanceInitiatedShutdownBehavior != types.ShutdownBehaviorTerminate {
		t.Errorf("InstanceInitiatedShutdownBehavior = %q", in.InstanceInitiatedShutdownBehavior)
	}

	fi, _ := e.fake.Instance(got.ID)
	want := scaler.Instance{
		ID: aws.ToString(fi.InstanceId), Pool: "x86", Slot: "slot1", LaunchID: "L-slot1",
		State: scaler.InstancePending, LaunchedAt: e.clock.Now(), Type: "m7i.xlarge", Market: MarketSpot,
		Zone: "us-east-1a", PrivateIP: aws.ToString(fi.PrivateIpAddress),
	}
	if got != want {
		t.Errorf("Launch = %+v\nwant %+v", got, want)
	}
	if !maps.Equal(tagMap(fi.Tags), wantTags) || !maps.Equal(tagMap(e.fake.VolumeTags(got.ID)), wantTags) {
		t.Errorf("instance tags %v, volume tags %v", tagMap(fi.Tags), tagMap(e.fake.VolumeTags(got.ID)))
	}
	if v := e.counter(t, "ec2_launch_attempts_total", map[string]string{"pool": "x86", "market": "spot", "type": "m7i.xlarge", "result": "ok"}); v != 1 {
		t.Errorf("launch attempts ok = %v, want 1", v)
	}
}

func TestLaunchInstanceProfileARNAndLaunchTemplate(t *testing.T) {
	po := spotPool()
	po.AMI = ""
	po.LaunchTemplateName = "nix-builder"
	po.LaunchTemplateVersion = "$Latest"
	po.InstanceProfile = "arn:aws:iam::123456789012:instance-profile/nix-builder"
	e := newEnv(t, map[string]PoolOptions{"x86": po})
	launch(t, e, "x86", "slot1")
	in := e.fake.RunInputs()[0]
	if lt := in.LaunchTemplate; lt == nil || aws.ToString(lt.LaunchTemplateName) != "nix-builder" || lt.LaunchTemplateId != nil || aws.ToString(lt.Version) != "$Latest" {
		t.Errorf("LaunchTemplate = %+v", in.LaunchTemplate)
	}
	if in.ImageId != nil || in.BlockDeviceMappings != nil || in.UserData != nil {
		t.Errorf("ImageId %v, BlockDeviceMappings %v, UserData %v: want none", in.ImageId, in.BlockDeviceMappings, in.UserData)
	}
	if ip := in.IamInstanceProfile; ip == nil || aws.ToString(ip.Arn) != po.InstanceProfile || ip.Name != nil {
		t.Errorf("IamInstanceProfile = %+v, want the ARN", in.IamInstanceProfile)
	}
}

func TestLaunchSkipsOfferingsWithoutCapacity(t *testing.T) {
	e := newEnv(t, map[string]PoolOptions{"x86": spotPool()})
	e.fake.NoCapacity("spot", "m7i.xlarge", "")

	got := launch(t, e, "x86", "slot1")
	want := []string{"spot m7i.xlarge subnet-a", "spot m7i.xlarge subnet-b", "spot m6i.xlarge subnet-a"}
	if a := attempts(e.fake); !slices.Equal(a, want) {
		t.Errorf("attempts = %q\nwant %q", a, want)
	}
	if got.Type != "m6i.xlarge" || got.Zone != "us-east-1a" || got.Market != MarketSpot {
		t.Errorf("launched %s in %s (%s), want m6i.xlarge in us-east-1a (spot)", got.Type, got.Zone, got.Market)
	}
	if v := e.counter(t, "ec2_capacity_errors_total", map[string]string{"pool": "x86", "type": "m7i.xlarge", "code": "InsufficientInstanceCapacity"}); v != 2 {
		t.Errorf("capacity errors = %v, want 2", v)
	}
	if v := e.counter(t, "ec2_fallbacks_total", map[string]string{"pool": "x86", "kind": "next_offering"}); v != 2 {
		t.Errorf("next_offering fallbacks = %v, want 2", v)
	}
	if v := e.counter(t, "ec2_launch_attempts_total", map[string]string{"pool": "x86", "market": "spot", "type": "m7i.xlarge", "result": "capacity"}); v != 2 {
		t.Errorf("capacity attempts = %v, want 2", v)
	}

	// The failed offerings are skipped while remembered; the first subnet
	// rotates to subnet-b.
	e.fake.RestoreCapacity()
	e.clock.Advance(DefaultUnavailableFor - time.Second)
	launch(t, e, "x86", "slot2")
	if a := attempts(e.fake)[3:]; !slices.Equal(a, []string{"spot m6i.xlarge subnet-b"}) {
		t.Errorf("second launch attempts = %q, want only m6i.xlarge in subnet-b", a)
	}

	// Once UnavailableFor has passed, the first type is tried again.
	e.clock.Advance(2 * time.Second)
	launch(t, e, "x86", "slot3")
	if a := attempts(e.fake)[4:]; !slices.Equal(a, []string{"spot m7i.xlarge subnet-a"}) {
		t.Errorf("third launch attempts = %q, want m7i.xlarge in subnet-a again", a)
	}
}

func TestLaunchSkippedOfferingsCostNoCall(t *testing.T) {
	po := spotPool()
	po.InstanceTypes = []string{"m7i.xlarge"}
	po.Subnets = []string{"subnet-a"}
	po.UnavailableFor = time.Minute
	e := newEnv(t, map[string]PoolOptions{"x86": po})
	e.fake.NoCapacity("spot", "", "")
	if _, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1"}); !errors.Is(err, ErrNoCapacity) {
		t.Fatalf("Launch error = %v, want ErrNoCapacity", err)
	}
	e.fake.RestoreCapacity()
	_, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1"})
	if !errors.Is(err, ErrNoCapacity) || !strings.Contains(err.Error(), "1 offerings skipped") {
		t.Fatalf("Launch error = %v, want ErrNoCapacity with the offering skipped", err)
	}
	if n := e.fake.CallCount(ec2test.OpRun); n != 1 {
		t.Errorf("RunInstances calls = %d, want 1 (the skipped offering is not tried)", n)
	}
	e.clock.Advance(time.Minute)
	launch(t, e, "x86", "slot1")
}

func TestLaunchOnDemandFallback(t *testing.T) {
	for _, tc := range []struct {
		name     string
		fallback bool
	}{{"allowed", true}, {"not allowed", false}} {
		t.Run(tc.name, func(t *testing.T) {
			po := spotPool()
			po.OnDemandFallback = tc.fallback
			e := newEnv(t, map[string]PoolOptions{"x86": po})
			e.fake.NoCapacity("spot", "", "")

			in, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "L1"})
			spot := []string{"spot m7i.xlarge subnet-a", "spot m7i.xlarge subnet-b", "spot m6i.xlarge subnet-a", "spot m6i.xlarge subnet-b"}
			if !tc.fallback {
				if !errors.Is(err, ErrNoCapacity) {
					t.Fatalf("Launch error = %v, want ErrNoCapacity", err)
				}
				for _, s := range []string{`pool "x86"`, "no capacity", "InsufficientInstanceCapacity", "on-demand fallback is off"} {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not mention %q", err, s)
					}
				}
				if a := attempts(e.fake); !slices.Equal(a, spot) {
					t.Errorf("attempts = %q\nwant %q", a, spot)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := append(spot, "on-demand m7i.xlarge subnet-a")
			if a := attempts(e.fake); !slices.Equal(a, want) {
				t.Errorf("attempts = %q\nwant %q", a, want)
			}
			if in.Market != MarketOnDemand || in.Type != "m7i.xlarge" {
				t.Errorf("launched %s %s, want on-demand m7i.xlarge", in.Market, in.Type)
			}
			if v := e.counter(t, "ec2_fallbacks_total", map[string]string{"pool": "x86", "kind": "on_demand"}); v != 1 {
				t.Errorf("on_demand fallbacks = %v, want 1", v)
			}
			if v := e.counter(t, "ec2_fallbacks_total", map[string]string{"pool": "x86", "kind": "next_offering"}); v != 3 {
				t.Errorf("next_offering fallbacks = %v, want 3", v)
			}
			// Spot is remembered as unavailable: the next launch goes
			// straight to on-demand.
			launch(t, e, "x86", "slot2")
			if a := attempts(e.fake)[5:]; !slices.Equal(a, []string{"on-demand m7i.xlarge subnet-b"}) {
				t.Errorf("second launch attempts = %q", a)
			}
		})
	}
}

func TestLaunchSpotQuotaSkipsAllSpot(t *testing.T) {
	po := spotPool()
	po.OnDemandFallback = true
	e := newEnv(t, map[string]PoolOptions{"x86": po})
	e.fake.FailNext(ec2test.OpRun, 1, ec2test.APIError("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded"))
	in := launch(t, e, "x86", "slot1")
	want := []string{"spot m7i.xlarge subnet-a", "on-demand m7i.xlarge subnet-a"}
	if a := attempts(e.fake); !slices.Equal(a, want) || in.Market != MarketOnDemand {
		t.Errorf("attempts = %q (market %s), want %q", a, in.Market, want)
	}
	launch(t, e, "x86", "slot2")
	if a := attempts(e.fake)[2:]; !slices.Equal(a, []string{"on-demand m7i.xlarge subnet-b"}) {
		t.Errorf("second launch attempts = %q, want on-demand only", a)
	}
}

func TestLaunchNestedVirtualizationOnDemand(t *testing.T) {
	po := PoolOptions{
		LaunchTemplateID:     "lt-0abc",
		InstanceTypes:        []string{"c8i.2xlarge"},
		Subnets:              []string{"subnet-a"},
		NestedVirtualization: true,
	}
	e := newEnv(t, map[string]PoolOptions{"kvm": po})
	in := launch(t, e, "kvm", "slot1")
	run := e.fake.RunInputs()[0]
	if run.CpuOptions == nil || run.CpuOptions.NestedVirtualization != types.NestedVirtualizationSpecificationEnabled {
		t.Errorf("CpuOptions = %+v, want NestedVirtualization enabled", run.CpuOptions)
	}
	if run.InstanceMarketOptions != nil || in.Market != MarketOnDemand {
		t.Errorf("InstanceMarketOptions = %+v, market %s; want on-demand", run.InstanceMarketOptions, in.Market)
	}
	if lt := run.LaunchTemplate; lt == nil || aws.ToString(lt.LaunchTemplateId) != "lt-0abc" || lt.Version != nil {
		t.Errorf("LaunchTemplate = %+v", run.LaunchTemplate)
	}
	fi, _ := e.fake.Instance(in.ID)
	if fi.CpuOptions == nil || fi.CpuOptions.NestedVirtualization != types.NestedVirtualizationSpecificationEnabled {
		t.Errorf("instance CpuOptions = %+v", fi.CpuOptions)
	}

	// Explicitly spot stays spot, still with nested virtualization.
	po.Market = MarketSpot
	e = newEnv(t, map[string]PoolOptions{"kvm": po})
	launch(t, e, "kvm", "slot1")
	run = e.fake.RunInputs()[0]
	if run.InstanceMarketOptions == nil || run.CpuOptions == nil {
		t.Errorf("market %+v cpu %+v: want spot with nested virtualization", run.InstanceMarketOptions, run.CpuOptions)
	}
}

func TestLaunchFreshClientTokenPerAttempt(t *testing.T) {
	po := spotPool()
	po.OnDemandFallback = true
	po.Subnets = []string{"subnet-a", "subnet-b", "subnet-c"}
	e := newEnv(t, map[string]PoolOptions{"x86": po})
	e.fake.NoCapacity("spot", "", "")
	e.fake.NoCapacity("on-demand", "m7i.xlarge", "")
	launch(t, e, "x86", "slot1")
	e.fake.RestoreCapacity()
	e.clock.Advance(time.Hour)
	launch(t, e, "x86", "slot2")
	tokens := map[string]bool{}
	runs := e.fake.RunInputs()
	for _, in := range runs {
		tok := aws.ToString(in.ClientToken)
		if tok == "" || len(tok) > 64 {
			t.Errorf("bad ClientToken %q", tok)
		}
		tokens[tok] = true
	}
	if len(runs) != 6+3+1+1 || len(tokens) != len(runs) {
		t.Errorf("%d attempts with %d distinct tokens, want 11 distinct", len(runs), len(tokens))
	}
	for _, c := range e.fake.Calls() {
		if errorCode(c.Err) == ec2test.CodeMismatch {
			t.Errorf("call answered %v", c.Err)
		}
	}
}

func TestLaunchOtherErrorsFailAtOnce(t *testing.T) {
	e := newEnv(t, map[string]PoolOptions{"x86": spotPool()})
	e.fake.FailNext(ec2test.OpRun, 1, ec2test.APIError("UnauthorizedOperation", "You are not authorized to perform this operation."))
	_, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1"})
	if err == nil || !strings.Contains(err.Error(), `pool "x86"`) || !strings.Contains(err.Error(), "UnauthorizedOperation") || errors.Is(err, ErrNoCapacity) {
		t.Fatalf("Launch error = %v, want UnauthorizedOperation naming the pool", err)
	}
	if n := e.fake.CallCount(ec2test.OpRun); n != 1 {
		t.Errorf("RunInstances calls = %d, want 1", n)
	}
	if v := e.counter(t, "ec2_launch_attempts_total", map[string]string{"pool": "x86", "market": "spot", "type": "m7i.xlarge", "result": "error"}); v != 1 {
		t.Errorf("error attempts = %v, want 1", v)
	}
	// Nothing was marked unavailable.
	launch(t, e, "x86", "slot1")
	if a := attempts(e.fake)[1]; a != "spot m7i.xlarge subnet-b" {
		t.Errorf("next attempt %q, want m7i.xlarge (rotated to subnet-b)", a)
	}

	if _, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "nope", Slot: "slot1"}); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("unknown pool: %v", err)
	}
}

func TestLaunchThrottledIsNotACapacityError(t *testing.T) {
	e := newEnv(t, map[string]PoolOptions{"x86": spotPool()})
	e.fake.FailNext(ec2test.OpRun, 1, ec2test.APIError("RequestLimitExceeded", "Request limit exceeded."))
	_, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1"})
	if !errors.Is(err, ErrThrottled) || errors.Is(err, ErrNoCapacity) {
		t.Fatalf("Launch error = %v, want ErrThrottled", err)
	}
	if n := e.fake.CallCount(ec2test.OpRun); n != 1 {
		t.Errorf("RunInstances calls = %d, want 1 (no offering hopping on throttling)", n)
	}
	// The demand is not lost: the next Launch (the reconciler's retry) uses
	// the same offering, which was not marked unavailable.
	e.p.pools["x86"].next.Store(0)
	in := launch(t, e, "x86", "slot1")
	if in.Type != "m7i.xlarge" || in.Zone != "us-east-1a" {
		t.Errorf("retry launched %s in %s, want the first offering", in.Type, in.Zone)
	}
}

func TestListPaginatedByClusterTag(t *testing.T) {
	e := newEnv(t, map[string]PoolOptions{"x86": spotPool()})
	e.fake.PageSize = 2
	var ids []string
	for _, s := range []string{"slot1", "slot2", "slot3", "slot4", "slot5"} {
		ids = append(ids, launch(t, e, "x86", s).ID)
	}
	untagged := e.fake.Add(types.Instance{InstanceType: "t3.micro"})
	other := e.fake.Add(types.Instance{Tags: []types.Tag{{Key: aws.String(TagCluster), Value: aws.String("other")}}})
	before := e.fake.CallCount(ec2test.OpDescribe)

	got, err := e.p.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var gotIDs []string
	for _, in := range got {
		gotIDs = append(gotIDs, in.ID)
		if in.Pool != "x86" || in.LaunchID != "L-"+in.Slot || in.State != scaler.InstanceRunning || in.Market != MarketSpot || in.Zone == "" || in.PrivateIP == "" {
			t.Errorf("listed %+v", in)
		}
	}
	slices.Sort(gotIDs)
	slices.Sort(ids)
	if !slices.Equal(gotIDs, ids) {
		t.Errorf("List ids = %v, want %v (not %s, %s)", gotIDs, ids, untagged, other)
	}
	var describes []*ec2.DescribeInstancesInput
	for _, c := range e.fake.Calls() {
		if in, ok := c.Input.(*ec2.DescribeInstancesInput); ok {
			describes = append(describes, in)
		}
	}
	describes = describes[before:]
	if len(describes) != 3 {
		t.Fatalf("DescribeInstances calls = %d, want 3 pages", len(describes))
	}
	for i, in := range describes {
		if len(in.Filters) != 1 || aws.ToString(in.Filters[0].Name) != "tag:"+TagCluster || !slices.Equal(in.Filters[0].Values, []string{cluster}) {
			t.Errorf("page %d filters = %+v", i, in.Filters)
		}
		if (i == 0) != (in.NextToken == nil) {
			t.Errorf("page %d NextToken = %v", i, aws.ToString(in.NextToken))
		}
	}
}

func TestListMapsInterruptionAndCountsIt(t *testing.T) {
	po := spotPool()
	e := newEnv(t, map[string]PoolOptions{"x86": po})
	e.fake.PublicIPs = true
	in := launch(t, e, "x86", "slot1")
	e.fake.Interrupt(in.ID)
	for range 2 {
		got, err := e.p.List(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 {
			t.Fatalf("List = %+v", got)
		}
		g := got[0]
		if g.State != scaler.InstanceTerminated || g.StateReason != ReasonSpotInterruption || g.Market != MarketSpot ||
			g.Slot != "slot1" || g.PublicIP == "" || g.PrivateIP == "" || g.Type != "m7i.xlarge" {
			t.Errorf("listed %+v", g)
		}
	}
	if v := e.counter(t, "ec2_interruptions_total", map[string]string{"pool": "x86"}); v != 1 {
		t.Errorf("interruptions = %v, want 1 (once per instance)", v)
	}
}

func TestListCountsRunningSeconds(t *testing.T) {
	po := spotPool()
	e := newEnv(t, map[string]PoolOptions{"x86": po, "kvm": {AMI: "ami-1", InstanceTypes: []string{"c8i.large"}, Subnets: []string{"subnet-a"}, NestedVirtualization: true}})
	e.fake.BootDescribes = 1 // pending at the first List
	launch(t, e, "x86", "slot1")
	launch(t, e, "x86", "slot2")
	launch(t, e, "kvm", "slot1")
	list := func() {
		t.Helper()
		if _, err := e.p.List(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	list() // all pending; starts the clock
	e.clock.Advance(10 * time.Second)
	list() // running now: 10 s counted for each
	e.clock.Advance(30 * time.Second)
	list()
	spot := e.counter(t, "ec2_running_instance_seconds_total", map[string]string{"market": "spot"})
	od := e.counter(t, "ec2_running_instance_seconds_total", map[string]string{"market": "on-demand"})
	if spot != 2*(10+30) || od != 10+30 {
		t.Errorf("running seconds spot %v on-demand %v, want 80 and 40", spot, od)
	}
}

func TestTerminate(t *testing.T) {
	e := newEnv(t, map[string]PoolOptions{"x86": spotPool()})
	ctx := context.Background()
	in := launch(t, e, "x86", "slot1")
	if err := e.p.Terminate(ctx, in.ID); err != nil {
		t.Fatal(err)
	}
	fi, _ := e.fake.Instance(in.ID)
	if fi.State.Name != types.InstanceStateNameTerminated {
		t.Errorf("state %s after Terminate", fi.State.Name)
	}
	if err := e.p.Terminate(ctx, in.ID); err != nil {
		t.Errorf("second Terminate: %v", err)
	}
	if n := e.fake.CallCount(ec2test.OpTerminate); n != 1 {
		t.Errorf("TerminateInstances calls = %d, want 1 (already terminated)", n)
	}
	if err := e.p.Terminate(ctx, "i-0000000000000dead"); err != nil {
		t.Errorf("Terminate of an unknown instance: %v", err)
	}

	// An instance that vanishes between the check and the call.
	in2 := launch(t, e, "x86", "slot2")
	e.fake.FailNext(ec2test.OpTerminate, 1, ec2test.APIError(ec2test.CodeNotFound, "The instance ID does not exist"))
	if err := e.p.Terminate(ctx, in2.ID); err != nil {
		t.Errorf("Terminate answered NotFound: %v", err)
	}
	e.fake.FailNext(ec2test.OpTerminate, 1, ec2test.APIError("UnauthorizedOperation", "no"))
	if err := e.p.Terminate(ctx, in2.ID); err == nil || !strings.Contains(err.Error(), "UnauthorizedOperation") {
		t.Errorf("Terminate error = %v, want UnauthorizedOperation", err)
	}

	// Instances of nobody or of another cluster are never touched.
	untagged := e.fake.Add(types.Instance{})
	other := e.fake.Add(types.Instance{Tags: []types.Tag{{Key: aws.String(TagCluster), Value: aws.String("other")}}})
	before := e.fake.CallCount(ec2test.OpTerminate)
	for _, id := range []string{untagged, other} {
		if err := e.p.Terminate(ctx, id); !errors.Is(err, ErrNotOwned) {
			t.Errorf("Terminate(%s) = %v, want ErrNotOwned", id, err)
		}
		if fi, _ := e.fake.Instance(id); fi.State.Name != types.InstanceStateNameRunning {
			t.Errorf("%s is %s", id, fi.State.Name)
		}
	}
	if n := e.fake.CallCount(ec2test.OpTerminate); n != before {
		t.Errorf("TerminateInstances called for instances of others")
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	fake := ec2test.New()
	good := spotPool()
	for _, tc := range []struct {
		name string
		edit func(*Options)
		want string
	}{
		{"no cluster", func(o *Options) { o.Cluster = "" }, "cluster"},
		{"no pools", func(o *Options) { o.Pools = nil }, "no pools"},
		{"bad market", func(o *Options) { p := good; p.Market = "reserved"; o.Pools["x"] = p }, "market"},
		{"no types", func(o *Options) { p := good; p.InstanceTypes = nil; o.Pools["x"] = p }, "instance types"},
		{"no subnets", func(o *Options) { p := good; p.Subnets = nil; o.Pools["x"] = p }, "subnets"},
		{"no image", func(o *Options) { p := good; p.AMI = ""; o.Pools["x"] = p }, "AMI or a launch template"},
		{"template id and name", func(o *Options) {
			p := good
			p.LaunchTemplateID, p.LaunchTemplateName = "lt-1", "n"
			o.Pools["x"] = p
		}, "not both"},
		{"bad user data", func(o *Options) { p := good; p.UserData = "{{.Nope"; o.Pools["x"] = p }, "user data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := Options{Cluster: cluster, Pools: map[string]PoolOptions{"x": good}}
			tc.edit(&o)
			_, err := New(fake, o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestLaunchUserDataErrors(t *testing.T) {
	po := spotPool()
	po.UserData = "{{.Unknown}}"
	e := newEnv(t, map[string]PoolOptions{"x86": po})
	if _, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1"}); err == nil || !strings.Contains(err.Error(), "user data") {
		t.Errorf("Launch error = %v, want a user data error", err)
	}
	po.UserData = strings.Repeat("x", maxUserData+1)
	e = newEnv(t, map[string]PoolOptions{"x86": po})
	if _, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1"}); err == nil || !strings.Contains(err.Error(), "user data") {
		t.Errorf("Launch error = %v, want a user data size error", err)
	}
	if n := e.fake.CallCount(ec2test.OpRun); n != 0 {
		t.Errorf("RunInstances called %d times", n)
	}
}

func TestMetricsShareARegisterer(t *testing.T) {
	reg := prometheus.NewRegistry()
	for range 2 {
		if _, err := New(ec2test.New(), Options{Cluster: cluster, Pools: map[string]PoolOptions{"x": spotPool()}, Registerer: reg}); err != nil {
			t.Fatal(err)
		}
	}
}

func TestBucket(t *testing.T) {
	c := newClock()
	b := newBucket(2, 4)
	b.now = c.Now
	var slept []time.Duration
	b.sleep = func(_ context.Context, d time.Duration) error { slept = append(slept, d); return nil }
	ctx := context.Background()
	for range 4 {
		if err := b.wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Two tokens of burst, then one every 250 ms, queued behind each other.
	if want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond}; !slices.Equal(slept, want) {
		t.Errorf("waits = %v, want %v", slept, want)
	}
	c.Advance(10 * time.Second) // refills to the burst, not beyond
	slept = nil
	for range 3 {
		_ = b.wait(ctx)
	}
	if want := []time.Duration{250 * time.Millisecond}; !slices.Equal(slept, want) {
		t.Errorf("waits after refill = %v, want %v", slept, want)
	}
	// A cancelled wait gives its token back.
	b.sleep = func(context.Context, time.Duration) error { return context.Canceled }
	if err := b.wait(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("wait = %v", err)
	}
	if d := b.reserve(); d != 500*time.Millisecond {
		t.Errorf("next reservation waits %v, want 500ms", d)
	}
}

func TestLaunchUnsupportedOfferingSaysWhy(t *testing.T) {
	po := spotPool()
	po.InstanceTypes = []string{"c8i.large"}
	po.Subnets = []string{"subnet-c"}
	e := newEnv(t, map[string]PoolOptions{"x86": po})
	msg := "Your requested instance type (c8i.large) is not supported in your requested Availability Zone (us-east-1c)."
	e.fake.FailNext(ec2test.OpRun, 1, ec2test.APIError("Unsupported", msg))
	_, err := e.p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1"})
	if !errors.Is(err, ErrNoCapacity) || !strings.Contains(err.Error(), msg) {
		t.Errorf("Launch error = %v, want ErrNoCapacity with EC2's message", err)
	}
}

package ec2test

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// RunInstances launches one instance per call (MinCount = MaxCount = 1 are
// required), honouring ClientToken idempotency like EC2.
func (f *Fake) RunInstances(ctx context.Context, in *ec2.RunInstancesInput, _ ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error) {
	if f.RunHook != nil {
		if err := f.RunHook(in); err != nil {
			f.mu.Lock()
			f.record(OpRun, in, err)
			f.mu.Unlock()
			return nil, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.run(ctx, in)
	f.record(OpRun, in, err)
	return out, err
}

func (f *Fake) run(ctx context.Context, in *ec2.RunInstancesInput) (*ec2.RunInstancesOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpRun); err != nil {
		return nil, err
	}
	if err := checkRunInput(in); err != nil {
		return nil, err
	}
	if err := f.checkPreflight(in); err != nil {
		return nil, err
	}
	market := runMarket(in)
	typ, subnet := string(in.InstanceType), aws.ToString(in.SubnetId)
	fp := fingerprint(in)
	tok := aws.ToString(in.ClientToken)
	if use, ok := f.tokens[tok]; ok && tok != "" {
		if use.params != fp {
			return nil, APIError(CodeMismatch, "The client token "+tok+" was used with different parameters.")
		}
		return use.out, use.err
	}
	if err := f.noCapacity(market, typ, subnet); err != nil {
		if tok != "" {
			// EC2 remembers the token of a failed launch too: reusing
			// it for another offering is IdempotentParameterMismatch.
			f.tokens[tok] = tokenUse{params: fp, err: err}
		}
		return nil, err
	}
	tags, volTags := splitTags(in)
	id := f.newID()
	inst := f.newInstance(in, id, market, subnet, tags)
	f.instances = append(f.instances, &instance{inst: inst, volTags: volTags})
	f.byID[id] = f.instances[len(f.instances)-1]
	out := &ec2.RunInstancesOutput{
		ReservationId: aws.String(fmt.Sprintf("r-%017x", f.seq)),
		Instances:     []types.Instance{inst},
	}
	if tok != "" {
		f.tokens[tok] = tokenUse{params: fp, out: out}
	}
	return out, nil
}

// checkRunInput rejects a launch request EC2 (or the fake) would refuse
// before looking at capacity.
func checkRunInput(in *ec2.RunInstancesInput) error {
	if aws.ToInt32(in.MinCount) != 1 || aws.ToInt32(in.MaxCount) != 1 {
		return APIError(CodeInvalid, "the fake launches exactly one instance per call (MinCount = MaxCount = 1)")
	}
	if in.ImageId == nil && in.LaunchTemplate == nil {
		return APIError(CodeMissing, "The request must contain the parameter ImageId")
	}
	if in.InstanceType == "" && in.LaunchTemplate == nil {
		return APIError(CodeMissing, "The request must contain the parameter InstanceType")
	}
	if ud := aws.ToString(in.UserData); ud != "" {
		if _, err := base64.StdEncoding.DecodeString(ud); err != nil {
			return APIError(CodeInvalid, "Invalid BASE64 encoding of user data.")
		}
	}
	return nil
}

// runMarket is the market a launch request asks for: "spot" or "on-demand".
func runMarket(in *ec2.RunInstancesInput) string {
	market := "on-demand"
	if in.InstanceMarketOptions != nil && in.InstanceMarketOptions.MarketType == types.MarketTypeSpot {
		market = "spot"
	}
	return market
}

// noCapacity is the InsufficientInstanceCapacity error of an offering
// NoCapacity took away, or nil.
func (f *Fake) noCapacity(market, typ, subnet string) error {
	for _, o := range f.noCap {
		if (o.market == "" || o.market == market) && (o.typ == "" || o.typ == typ) && (o.subnet == "" || o.subnet == subnet) {
			return APIError(CodeCapacity, fmt.Sprintf("We currently do not have sufficient %s capacity in the Availability Zone you requested (%s).", typ, f.zone(subnet)))
		}
	}
	return nil
}

// splitTags splits a launch request's tags into the instance's and its
// volumes'.
func splitTags(in *ec2.RunInstancesInput) (tags, volTags []types.Tag) {
	for _, ts := range in.TagSpecifications {
		switch ts.ResourceType {
		case types.ResourceTypeInstance:
			tags = append(tags, ts.Tags...)
		case types.ResourceTypeVolume:
			volTags = append(volTags, ts.Tags...)
		}
	}
	return tags, volTags
}

// newInstance is the pending instance id that the launch request in starts;
// f.seq numbers its addresses.
func (f *Fake) newInstance(in *ec2.RunInstancesInput, id, market, subnet string, tags []types.Tag) types.Instance {
	inst := types.Instance{
		InstanceId:       aws.String(id),
		InstanceType:     in.InstanceType,
		ImageId:          in.ImageId,
		State:            state(types.InstanceStateNamePending),
		LaunchTime:       aws.Time(f.now().UTC()),
		Placement:        &types.Placement{AvailabilityZone: aws.String(f.zone(subnet))},
		SubnetId:         in.SubnetId,
		PrivateIpAddress: aws.String(fmt.Sprintf("10.0.%d.%d", f.seq/250, f.seq%250+4)),
		Tags:             tags,
		KeyName:          in.KeyName,
	}
	if f.PublicIPs {
		inst.PublicIpAddress = aws.String(fmt.Sprintf("198.51.100.%d", f.seq%250+1))
	}
	if market == "spot" {
		inst.InstanceLifecycle = types.InstanceLifecycleTypeSpot
		inst.SpotInstanceRequestId = aws.String(fmt.Sprintf("sir-%08x", f.seq))
	}
	if in.MetadataOptions != nil {
		inst.MetadataOptions = &types.InstanceMetadataOptionsResponse{
			HttpTokens:   in.MetadataOptions.HttpTokens,
			HttpEndpoint: in.MetadataOptions.HttpEndpoint,
		}
	}
	if in.CpuOptions != nil {
		inst.CpuOptions = &types.CpuOptions{NestedVirtualization: in.CpuOptions.NestedVirtualization}
	}
	for _, g := range in.SecurityGroupIds {
		inst.SecurityGroups = append(inst.SecurityGroups, types.GroupIdentifier{GroupId: aws.String(g)})
	}
	return inst
}

// fingerprint is what EC2 compares when a client token comes again.
func fingerprint(in *ec2.RunInstancesInput) string {
	lt := ""
	if in.LaunchTemplate != nil {
		lt = aws.ToString(in.LaunchTemplate.LaunchTemplateId) + aws.ToString(in.LaunchTemplate.LaunchTemplateName) + "@" + aws.ToString(in.LaunchTemplate.Version)
	}
	market := ""
	if in.InstanceMarketOptions != nil {
		market = string(in.InstanceMarketOptions.MarketType)
	}
	return strings.Join([]string{string(in.InstanceType), aws.ToString(in.SubnetId), market, aws.ToString(in.ImageId), lt, aws.ToString(in.UserData)}, "|")
}

func (f *Fake) zone(subnet string) string {
	if z, ok := f.Zones[subnet]; ok {
		return z
	}
	z := "us-east-1" + string(rune('a'+len(f.Zones)%26))
	f.Zones[subnet] = z
	return z
}

package ec2test

import (
	"context"
	"slices"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// OpSpotRequests is the operation name of DescribeSpotInstanceRequests.
const OpSpotRequests = "DescribeSpotInstanceRequests"

// Spot request status codes the fake sets.
const (
	SpotFulfilled            = "fulfilled"
	SpotMarkedForTermination = "marked-for-termination"
)

// MarkForTermination gives a Spot instance's request the status EC2 gives
// it two minutes before reclaiming the instance; the instance keeps
// running (call Interrupt to reclaim it). It panics for an instance that
// is not Spot.
func (f *Fake) MarkForTermination(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i, ok := f.byID[id]
	if !ok || i.inst.SpotInstanceRequestId == nil {
		panic("ec2test: MarkForTermination of a non-Spot instance " + id)
	}
	i.spotCode, i.spotUpdated = SpotMarkedForTermination, f.now().UTC()
}

// DescribeSpotInstanceRequests answers with the Spot request of every Spot
// instance (status fulfilled unless MarkForTermination changed it), by
// SpotInstanceRequestIds and Filters instance-id, status-code and state;
// other filter names are InvalidParameterValue.
func (f *Fake) DescribeSpotInstanceRequests(ctx context.Context, in *ec2.DescribeSpotInstanceRequestsInput, _ ...func(*ec2.Options)) (*ec2.DescribeSpotInstanceRequestsOutput, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.spotRequests(ctx, in)
	f.record(OpSpotRequests, in, err)
	return out, err
}

func (f *Fake) spotRequests(ctx context.Context, in *ec2.DescribeSpotInstanceRequestsInput) (*ec2.DescribeSpotInstanceRequestsOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpSpotRequests); err != nil {
		return nil, err
	}
	for _, flt := range in.Filters {
		switch aws.ToString(flt.Name) {
		case "instance-id", "status-code", "state":
		default:
			return nil, APIError(CodeInvalid, "The filter '"+aws.ToString(flt.Name)+"' is invalid")
		}
	}
	out := &ec2.DescribeSpotInstanceRequestsOutput{}
	for _, i := range f.instances {
		if i.inst.SpotInstanceRequestId == nil {
			continue
		}
		r := f.spotRequest(i)
		if len(in.SpotInstanceRequestIds) > 0 && !slices.Contains(in.SpotInstanceRequestIds, aws.ToString(r.SpotInstanceRequestId)) {
			continue
		}
		if spotMatches(r, in.Filters) {
			out.SpotInstanceRequests = append(out.SpotInstanceRequests, r)
		}
	}
	return out, nil
}

// spotRequest is the Spot request of instance i as EC2 shows it.
func (f *Fake) spotRequest(i *instance) types.SpotInstanceRequest {
	code, updated := i.spotCode, i.spotUpdated
	if code == "" {
		code, updated = SpotFulfilled, aws.ToTime(i.inst.LaunchTime)
	}
	st := types.SpotInstanceStateActive
	if i.inst.State.Name == types.InstanceStateNameTerminated {
		st = types.SpotInstanceStateClosed
	}
	return types.SpotInstanceRequest{
		SpotInstanceRequestId: i.inst.SpotInstanceRequestId,
		InstanceId:            i.inst.InstanceId,
		State:                 st,
		Status:                &types.SpotInstanceStatus{Code: aws.String(code), UpdateTime: aws.Time(updated)},
		Tags:                  i.inst.Tags,
	}
}

func spotMatches(r types.SpotInstanceRequest, filters []types.Filter) bool {
	for _, flt := range filters {
		var v string
		switch aws.ToString(flt.Name) {
		case "instance-id":
			v = aws.ToString(r.InstanceId)
		case "status-code":
			v = aws.ToString(r.Status.Code)
		case "state":
			v = string(r.State)
		}
		if !slices.Contains(flt.Values, v) {
			return false
		}
	}
	return true
}

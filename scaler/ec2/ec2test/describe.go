package ec2test

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// DescribeInstances answers by InstanceIds (InvalidInstanceID.NotFound if
// one is unknown) and Filters: tag:<key>, tag-key, instance-state-name,
// instance-id, instance-type, subnet-id; other filter names are
// InvalidParameterValue. Pages follow MaxResults (and PageSize); one
// instance per reservation.
func (f *Fake) DescribeInstances(ctx context.Context, in *ec2.DescribeInstancesInput, _ ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error) {
	if f.DescribeHook != nil {
		if err := f.DescribeHook(in); err != nil {
			f.mu.Lock()
			f.record(OpDescribe, in, err)
			f.mu.Unlock()
			return nil, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.describe(ctx, in)
	f.record(OpDescribe, in, err)
	return out, err
}

func (f *Fake) describe(ctx context.Context, in *ec2.DescribeInstancesInput) (*ec2.DescribeInstancesOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpDescribe); err != nil {
		return nil, err
	}
	if err := f.checkDescribeInput(in); err != nil {
		return nil, err
	}
	f.advanceBoots()
	match, err := f.matching(in)
	if err != nil {
		return nil, err
	}
	return describePage(in, match, f.PageSize)
}

// checkDescribeInput rejects a describe request EC2 would refuse.
func (f *Fake) checkDescribeInput(in *ec2.DescribeInstancesInput) error {
	if len(in.InstanceIds) > 0 && in.MaxResults != nil {
		return APIError(CodeInvalid, "The parameter instancesSet cannot be used with the parameter maxResults")
	}
	if mr := in.MaxResults; mr != nil && (*mr < 5 || *mr > 1000) {
		return APIError(CodeInvalid, fmt.Sprintf("Value ( %d ) for parameter maxResults is invalid. Expecting a value between 5 and 1000.", *mr))
	}
	for _, id := range in.InstanceIds {
		if _, ok := f.byID[id]; !ok {
			return APIError(CodeNotFound, fmt.Sprintf("The instance ID '%s' does not exist", id))
		}
	}
	return nil
}

// advanceBoots counts a describe for every instance, and makes running the
// pending ones described more than BootDescribes times.
func (f *Fake) advanceBoots() {
	for _, i := range f.instances {
		i.describes++
		if i.inst.State.Name == types.InstanceStateNamePending && i.describes > f.BootDescribes {
			i.inst.State = state(types.InstanceStateNameRunning)
		}
	}
}

// matching is the instances a describe request selects, in launch order.
func (f *Fake) matching(in *ec2.DescribeInstancesInput) ([]types.Instance, error) {
	var match []types.Instance
	for _, i := range f.instances {
		if len(in.InstanceIds) > 0 && !slices.Contains(in.InstanceIds, aws.ToString(i.inst.InstanceId)) {
			continue
		}
		ok, err := matches(i.inst, in.Filters)
		if err != nil {
			return nil, err
		}
		if ok {
			match = append(match, i.inst)
		}
	}
	return match, nil
}

// describePage is the page of match that a describe request asks for, at
// most pageSize instances when pageSize is above zero (Fake.PageSize).
func describePage(in *ec2.DescribeInstancesInput, match []types.Instance, pageSize int) (*ec2.DescribeInstancesOutput, error) {
	start := 0
	if tok := aws.ToString(in.NextToken); tok != "" {
		n, err := strconv.Atoi(strings.TrimPrefix(tok, "page-"))
		if err != nil || !strings.HasPrefix(tok, "page-") || n < 0 || n > len(match) {
			return nil, APIError("InvalidParameterValue", "Invalid NextToken")
		}
		start = n
	}
	size := defaultPageSize
	if in.MaxResults != nil {
		size = int(*in.MaxResults)
	}
	if pageSize > 0 {
		size = min(size, pageSize)
	}
	if len(in.InstanceIds) > 0 {
		size = len(match) + 1
	}
	end := min(start+size, len(match))
	out := &ec2.DescribeInstancesOutput{}
	for _, i := range match[start:end] {
		out.Reservations = append(out.Reservations, types.Reservation{Instances: []types.Instance{i}})
	}
	if end < len(match) {
		out.NextToken = aws.String("page-" + strconv.Itoa(end))
	}
	return out, nil
}

func matches(i types.Instance, filters []types.Filter) (bool, error) {
	for _, fl := range filters {
		name := aws.ToString(fl.Name)
		var have []string
		switch {
		case strings.HasPrefix(name, "tag:"):
			key := strings.TrimPrefix(name, "tag:")
			for _, t := range i.Tags {
				if aws.ToString(t.Key) == key {
					have = append(have, aws.ToString(t.Value))
				}
			}
		case name == "tag-key":
			for _, t := range i.Tags {
				have = append(have, aws.ToString(t.Key))
			}
		case name == "instance-state-name":
			have = []string{string(i.State.Name)}
		case name == "instance-id":
			have = []string{aws.ToString(i.InstanceId)}
		case name == "instance-type":
			have = []string{string(i.InstanceType)}
		case name == "subnet-id":
			have = []string{aws.ToString(i.SubnetId)}
		default:
			return false, APIError(CodeInvalid, fmt.Sprintf("The filter '%s' is invalid", name))
		}
		hit := false
		for _, v := range fl.Values {
			if slices.Contains(have, v) {
				hit = true
			}
		}
		if !hit {
			return false, nil
		}
	}
	return true, nil
}

package ec2test

// What preflight asks of EC2 besides launches: DryRun launches, subnets,
// instance type offerings per zone and images.

import (
	"context"
	"fmt"
	"slices"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// Operation names of the calls preflight makes.
const (
	OpDescribeSubnets   = "DescribeSubnets"
	OpDescribeOfferings = "DescribeInstanceTypeOfferings"
	OpDescribeImages    = "DescribeImages"
)

// Error codes of the preflight calls.
const (
	CodeDryRunOK        = "DryRunOperation"
	CodeUnauthorized    = "UnauthorizedOperation"
	CodeAMINotFound     = "InvalidAMIID.NotFound"
	CodeSubnetNotFound  = "InvalidSubnetID.NotFound"
	CodeUnsupported     = "Unsupported"
	dryRunOKMessage     = "Request would have succeeded, but DryRun flag is set."
	unauthorizedMessage = "You are not authorized to perform this operation. Encoded authorization failure message: AAAA-fake"
)

// Unauthorized is the error EC2 answers a call the caller's IAM policy
// does not allow.
func Unauthorized() error { return APIError(CodeUnauthorized, unauthorizedMessage) }

// NotOffered takes instanceType out of zone: DescribeInstanceTypeOfferings
// leaves it out and RunInstances in a subnet of the zone answers
// Unsupported.
func (f *Fake) NotOffered(instanceType, zone string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.notOffered = append(f.notOffered, [2]string{instanceType, zone})
}

func (f *Fake) offered(typ, zone string) bool {
	return !slices.Contains(f.notOffered, [2]string{typ, zone})
}

func (f *Fake) imageExists(id string) bool {
	return f.Images == nil || slices.Contains(f.Images, id)
}

// checkPreflight answers what EC2 checks of a launch before capacity:
// the image, the type's offering in the subnet's zone, and DryRun. The
// caller holds mu.
func (f *Fake) checkPreflight(in *ec2.RunInstancesInput) error {
	if in.ImageId != nil && !f.imageExists(*in.ImageId) {
		return APIError(CodeAMINotFound, fmt.Sprintf("The image id '[%s]' does not exist", *in.ImageId))
	}
	subnet := aws.ToString(in.SubnetId)
	if zone := f.zone(subnet); !f.offered(string(in.InstanceType), zone) {
		return APIError(CodeUnsupported, fmt.Sprintf("Your requested instance type (%s) is not supported in your requested Availability Zone (%s).", in.InstanceType, zone))
	}
	if aws.ToBool(in.DryRun) {
		return APIError(CodeDryRunOK, dryRunOKMessage)
	}
	return nil
}

// DescribeSubnets describes subnets by id with the zones of Zones; when
// Zones is set, an id it does not list is InvalidSubnetID.NotFound.
func (f *Fake) DescribeSubnets(ctx context.Context, in *ec2.DescribeSubnetsInput, _ ...func(*ec2.Options)) (*ec2.DescribeSubnetsOutput, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.describeSubnets(ctx, in)
	f.record(OpDescribeSubnets, in, err)
	return out, err
}

func (f *Fake) describeSubnets(ctx context.Context, in *ec2.DescribeSubnetsInput) (*ec2.DescribeSubnetsOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpDescribeSubnets); err != nil {
		return nil, err
	}
	out := &ec2.DescribeSubnetsOutput{}
	for _, id := range in.SubnetIds {
		if _, ok := f.Zones[id]; !ok && len(f.Zones) > 0 {
			return nil, APIError(CodeSubnetNotFound, fmt.Sprintf("The subnet ID '%s' does not exist", id))
		}
		out.Subnets = append(out.Subnets, types.Subnet{SubnetId: aws.String(id), AvailabilityZone: aws.String(f.zone(id))})
	}
	return out, nil
}

// DescribeInstanceTypeOfferings lists, for LocationType availability-zone
// and the filters instance-type and location, every pair not taken out by
// NotOffered.
func (f *Fake) DescribeInstanceTypeOfferings(ctx context.Context, in *ec2.DescribeInstanceTypeOfferingsInput, _ ...func(*ec2.Options)) (*ec2.DescribeInstanceTypeOfferingsOutput, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.describeOfferings(ctx, in)
	f.record(OpDescribeOfferings, in, err)
	return out, err
}

func (f *Fake) describeOfferings(ctx context.Context, in *ec2.DescribeInstanceTypeOfferingsInput) (*ec2.DescribeInstanceTypeOfferingsOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpDescribeOfferings); err != nil {
		return nil, err
	}
	if in.LocationType != types.LocationTypeAvailabilityZone {
		return nil, APIError(CodeInvalid, "the fake lists offerings by availability-zone only")
	}
	var typs, zones []string
	for _, flt := range in.Filters {
		switch aws.ToString(flt.Name) {
		case "instance-type":
			typs = flt.Values
		case "location":
			zones = flt.Values
		default:
			return nil, APIError(CodeInvalid, "the fake filters offerings on instance-type and location only")
		}
	}
	out := &ec2.DescribeInstanceTypeOfferingsOutput{}
	for _, t := range typs {
		for _, z := range zones {
			if f.offered(t, z) {
				out.InstanceTypeOfferings = append(out.InstanceTypeOfferings, types.InstanceTypeOffering{
					InstanceType: types.InstanceType(t), Location: aws.String(z), LocationType: types.LocationTypeAvailabilityZone,
				})
			}
		}
	}
	return out, nil
}

// DescribeImages describes images by id: every id exists unless Images is
// set, then only those listed do (one missing id fails the call with
// InvalidAMIID.NotFound, like EC2).
func (f *Fake) DescribeImages(ctx context.Context, in *ec2.DescribeImagesInput, _ ...func(*ec2.Options)) (*ec2.DescribeImagesOutput, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.describeImages(ctx, in)
	f.record(OpDescribeImages, in, err)
	return out, err
}

func (f *Fake) describeImages(ctx context.Context, in *ec2.DescribeImagesInput) (*ec2.DescribeImagesOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpDescribeImages); err != nil {
		return nil, err
	}
	out := &ec2.DescribeImagesOutput{}
	for _, id := range in.ImageIds {
		if !f.imageExists(id) {
			return nil, APIError(CodeAMINotFound, fmt.Sprintf("The image id '[%s]' does not exist", id))
		}
		out.Images = append(out.Images, types.Image{ImageId: aws.String(id), State: types.ImageStateAvailable, Name: aws.String("fake-" + id)})
	}
	return out, nil
}

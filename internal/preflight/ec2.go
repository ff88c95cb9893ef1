package preflight

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	"github.com/aws/aws-sdk-go-v2/service/sts"

	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
)

// SpotRole is the service-linked role EC2 needs to launch Spot instances
// in an account.
const SpotRole = "AWSServiceRoleForEC2Spot"

// EC2API is the read-only part of EC2 preflight calls.
type EC2API interface {
	DescribeSubnets(ctx context.Context, in *ec2.DescribeSubnetsInput, optFns ...func(*ec2.Options)) (*ec2.DescribeSubnetsOutput, error)
	DescribeInstanceTypeOfferings(ctx context.Context, in *ec2.DescribeInstanceTypeOfferingsInput, optFns ...func(*ec2.Options)) (*ec2.DescribeInstanceTypeOfferingsOutput, error)
	DescribeImages(ctx context.Context, in *ec2.DescribeImagesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeImagesOutput, error)
}

// Launcher dry-runs a pool's launch (*ec2prov.Provider): the request is the
// one the daemon would send.
type Launcher interface {
	DryRunLaunch(ctx context.Context, d ec2prov.DryRun) error
}

// Identity answers who the credentials are (STS).
type Identity interface {
	GetCallerIdentity(ctx context.Context, in *sts.GetCallerIdentityInput, optFns ...func(*sts.Options)) (*sts.GetCallerIdentityOutput, error)
}

// Roles reads IAM roles.
type Roles interface {
	GetRole(ctx context.Context, in *iam.GetRoleInput, optFns ...func(*iam.Options)) (*iam.GetRoleOutput, error)
}

// EC2Pool is one pool of a region, with the provider's settings.
type EC2Pool struct {
	Name    string
	Options ec2prov.PoolOptions
}

// EC2Region is everything the checks of one region (and endpoint) use.
// When the clients could not be made, Err says why and the rest is nil.
type EC2Region struct {
	Region   string
	Pools    []EC2Pool
	Err      error
	EC2      EC2API
	Launcher Launcher
	STS      Identity
	IAM      Roles // nil: the Spot role is not checked
}

// EC2Checks are the checks of one region: credentials first, and the
// pools' checks only when AWS accepted them.
func EC2Checks(r EC2Region) []Check {
	return []Check{func(ctx context.Context) []Result {
		names := make([]string, 0, len(r.Pools))
		for _, p := range r.Pools {
			names = append(names, p.Name)
		}
		pools := strings.Join(names, ",")
		cred := r.credentials(ctx, pools)
		if cred.Status != Pass {
			return []Result{cred, skip("ec2 (all)", pools, "not checked: the credentials check failed")}
		}
		out := []Result{cred}
		for _, p := range r.Pools {
			out = append(out, r.pool(ctx, p)...)
		}
		return append(out, r.spotRole(ctx)...)
	}}
}

func (r EC2Region) credentials(ctx context.Context, pools string) Result {
	if r.Err != nil {
		if errors.Is(r.Err, ec2prov.ErrNoRegion) {
			return fail(CheckCredentials, pools, "%v: set [pool.ec2] region", r.Err)
		}
		return fail(CheckCredentials, pools, "%s", credentialsFix(r.Err))
	}
	out, err := r.STS.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		return fail(CheckCredentials, pools, "region %s: %s", r.Region, credentialsFix(err))
	}
	return pass(CheckCredentials, pools, "region %s, account %s as %s", r.Region, aws.ToString(out.Account), aws.ToString(out.Arn))
}

// pool checks one pool: its subnets and their zones, its types' offerings
// there, its AMI, a dry-run launch of every offering, and tags at launch.
func (r EC2Region) pool(ctx context.Context, p EC2Pool) []Result {
	o := p.Options
	zones, res := r.subnets(ctx, p)
	out := []Result{res}
	offered := map[[2]string]bool{} // type, subnet → offered
	if zones != nil {
		var lines []Result
		lines, offered = r.offerings(ctx, p, zones)
		out = append(out, lines...)
	}
	if o.AMI != "" {
		out = append(out, r.ami(ctx, p))
	}
	market := o.EffectiveMarket()
	var first *ec2prov.DryRun // the first offering that was dry-run
	var firstErr error
	for _, typ := range o.InstanceTypes {
		for _, sn := range o.Subnets {
			where := fmt.Sprintf("%s %s in %s", market, typ, sn)
			if zones != nil && !offered[[2]string{typ, sn}] {
				out = append(out, skip(CheckLaunch, p.Name, "%s: not dry-run, the type is not offered in the subnet's zone", where))
				continue
			}
			d := ec2prov.DryRun{Pool: p.Name, Market: market, InstanceType: typ, Subnet: sn}
			err := r.Launcher.DryRunLaunch(ctx, d)
			if first == nil {
				first, firstErr = &d, err
			}
			if err != nil {
				out = append(out, fail(CheckLaunch, p.Name, "%s: %s", where, launchFix(err)))
				continue
			}
			out = append(out, pass(CheckLaunch, p.Name, "%s: EC2 answered DryRunOperation", where))
		}
	}
	return append(out, r.tagOnLaunch(ctx, p.Name, first, firstErr))
}

// subnets finds the zone of each subnet (nil when they cannot be read).
func (r EC2Region) subnets(ctx context.Context, p EC2Pool) (map[string]string, Result) {
	out, err := r.EC2.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{SubnetIds: p.Options.Subnets})
	switch {
	case isDenied(awsCode(err)):
		return nil, fail(CheckSubnets, p.Name, "%s", deniedFix(err, "ec2:DescribeSubnets"))
	case err != nil:
		return nil, fail(CheckSubnets, p.Name, "%s: fix [pool.ec2] subnets (subnets are per region: %s)", awsText(err), r.Region)
	}
	zones := map[string]string{}
	var where []string
	for _, s := range out.Subnets {
		zones[aws.ToString(s.SubnetId)] = aws.ToString(s.AvailabilityZone)
	}
	for _, sn := range p.Options.Subnets {
		z, ok := zones[sn]
		if !ok {
			return nil, fail(CheckSubnets, p.Name, "%s not found in %s: fix [pool.ec2] subnets", sn, r.Region)
		}
		where = append(where, sn+" ("+z+")")
	}
	return zones, pass(CheckSubnets, p.Name, "%s", strings.Join(where, ", "))
}

// offerings checks each type in each subnet's zone; the map says which
// type × subnet pairs are offered.
func (r EC2Region) offerings(ctx context.Context, p EC2Pool, zones map[string]string) ([]Result, map[[2]string]bool) {
	o := p.Options
	var zoneList []string
	for _, sn := range o.Subnets {
		if !slices.Contains(zoneList, zones[sn]) {
			zoneList = append(zoneList, zones[sn])
		}
	}
	have := map[[2]string]bool{} // type, zone
	in := &ec2.DescribeInstanceTypeOfferingsInput{
		LocationType: types.LocationTypeAvailabilityZone,
		Filters: []types.Filter{
			{Name: aws.String("instance-type"), Values: o.InstanceTypes},
			{Name: aws.String("location"), Values: zoneList},
		},
	}
	for {
		page, err := r.EC2.DescribeInstanceTypeOfferings(ctx, in)
		if err != nil {
			if isDenied(awsCode(err)) {
				return []Result{fail(CheckOfferings, p.Name, "%s", deniedFix(err, "ec2:DescribeInstanceTypeOfferings"))}, nil
			}
			return []Result{fail(CheckOfferings, p.Name, "%s", awsText(err))}, nil
		}
		for _, off := range page.InstanceTypeOfferings {
			have[[2]string{string(off.InstanceType), aws.ToString(off.Location)}] = true
		}
		if aws.ToString(page.NextToken) == "" {
			break
		}
		in.NextToken = page.NextToken
	}
	var out []Result
	offered := map[[2]string]bool{}
	for _, typ := range o.InstanceTypes {
		var missing []string
		for _, sn := range o.Subnets {
			if have[[2]string{typ, zones[sn]}] {
				offered[[2]string{typ, sn}] = true
			} else {
				missing = append(missing, zones[sn]+" ("+sn+")")
			}
		}
		if len(missing) > 0 {
			out = append(out, fail(CheckOfferings, p.Name, "%s is not offered in %s: drop the type from instance_types or those subnets from subnets",
				typ, strings.Join(missing, ", ")))
			continue
		}
		out = append(out, pass(CheckOfferings, p.Name, "%s offered in %s", typ, strings.Join(zoneList, ", ")))
	}
	return out, offered
}

func (r EC2Region) ami(ctx context.Context, p EC2Pool) Result {
	id := p.Options.AMI
	out, err := r.EC2.DescribeImages(ctx, &ec2.DescribeImagesInput{ImageIds: []string{id}})
	switch {
	case isDenied(awsCode(err)):
		return fail(CheckAMI, p.Name, "%s", deniedFix(err, "ec2:DescribeImages"))
	case err != nil:
		return fail(CheckAMI, p.Name, "%s: fix [pool.ec2] ami (AMIs are per region: %s)", awsText(err), r.Region)
	case len(out.Images) == 0:
		return fail(CheckAMI, p.Name, "%s not found in %s (or not shared with this account): fix [pool.ec2] ami", id, r.Region)
	}
	img := out.Images[0]
	if img.State != "" && img.State != types.ImageStateAvailable {
		return fail(CheckAMI, p.Name, "%s is %s, not available: fix [pool.ec2] ami", id, img.State)
	}
	return pass(CheckAMI, p.Name, "%s (%s) is available", id, aws.ToString(img.Name))
}

// tagOnLaunch tells a missing tagging permission from a missing launch
// permission: when the tagged dry run was refused, it dry-runs the same
// offering without tags.
func (r EC2Region) tagOnLaunch(ctx context.Context, pool string, d *ec2prov.DryRun, tagged error) Result {
	switch {
	case d == nil:
		return skip(CheckTagOnLaunch, pool, "not checked: no offering could be dry-run")
	case tagged == nil:
		return pass(CheckTagOnLaunch, pool, "instance and volume tags at launch are allowed")
	case awsCode(tagged) != ec2prov.CodeUnauthorized:
		return skip(CheckTagOnLaunch, pool, "not checked: the launch dry run failed for another reason")
	}
	untagged := *d
	untagged.WithoutTags = true
	if err := r.Launcher.DryRunLaunch(ctx, untagged); err != nil {
		return skip(CheckTagOnLaunch, pool, "not checked: the launch is refused even without tags (%s)", awsCode(err))
	}
	return fail(CheckTagOnLaunch, pool, "the launch is allowed only without tags: grant ec2:CreateTags on instance/* and volume/* with the condition ec2:CreateAction = RunInstances")
}

// spotRole checks the Spot service-linked role once for the region's Spot
// pools (IAM is global; EC2 creates the role on the first Spot launch
// only if the caller may call iam:CreateServiceLinkedRole).
func (r EC2Region) spotRole(ctx context.Context) []Result {
	var spot []string
	for _, p := range r.Pools {
		if o := p.Options; o.EffectiveMarket() == ec2prov.MarketSpot {
			spot = append(spot, p.Name)
		}
	}
	if len(spot) == 0 {
		return nil
	}
	pools := strings.Join(spot, ",")
	if r.IAM == nil {
		return []Result{skip(CheckSpotRole, pools, "not checked: no IAM client")}
	}
	out, err := r.IAM.GetRole(ctx, &iam.GetRoleInput{RoleName: aws.String(SpotRole)})
	code := awsCode(err)
	switch {
	case code == "NoSuchEntity":
		return []Result{fail(CheckSpotRole, pools, "%s does not exist: create it once with `aws iam create-service-linked-role --aws-service-name spot.amazonaws.com`, or grant the daemon iam:CreateServiceLinkedRole", SpotRole)}
	case isDenied(code):
		return []Result{skip(CheckSpotRole, pools, "not checked: %s (grant iam:GetRole on %s to check it)", awsText(err), SpotRole)}
	case err != nil:
		return []Result{fail(CheckSpotRole, pools, "%s", awsText(err))}
	}
	return []Result{pass(CheckSpotRole, pools, "%s exists", aws.ToString(out.Role.Arn))}
}

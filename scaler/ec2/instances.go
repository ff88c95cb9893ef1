package ec2

import (
	"context"
	"errors"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

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
	p.listed = listed
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

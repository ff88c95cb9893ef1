package ec2

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// SpotWarning is how long before reclaiming a Spot instance EC2 warns.
const SpotWarning = 2 * time.Minute

// markedCodes are the Spot request status codes of an instance EC2 is
// about to reclaim (terminate, stop or hibernate: a builder is lost
// either way).
var markedCodes = []string{"marked-for-termination", "marked-for-stop", "marked-for-hibernation"}

// spotFilterMax is the most values EC2 takes in one filter; a fleet of
// more Spot builders needs one call per this many.
const spotFilterMax = 200

var _ scaler.NoticeReader = (*Provider)(nil)

// Notices returns the interruption notices of the cluster's live
// instances among ins (scaler.NoticeReader). With an interruption queue
// (Options.Queue), they are the ones Notify was given; without, one
// DescribeSpotInstanceRequests asks EC2 which of the Spot builders it
// marked for termination, and none is made when no Spot builder runs.
func (p *Provider) Notices(ctx context.Context, ins []scaler.Instance) (map[string]scaler.Notice, error) {
	live := map[string]bool{}
	var spot []string
	for _, in := range ins {
		if in.State.Gone() {
			continue
		}
		live[in.ID] = true
		if in.Market == MarketSpot {
			spot = append(spot, in.ID)
		}
	}
	listed := map[string]bool{}
	for _, in := range ins {
		listed[in.ID] = true
	}
	p.mu.Lock()
	out := map[string]scaler.Notice{}
	now := p.clock.Now()
	for id, h := range p.notices {
		switch {
		case live[id]:
			out[id] = h.n
		case listed[id] || now.Sub(h.at) >= noticeHold:
			delete(p.notices, id) // gone, or never the cluster's
		}
	}
	queue := p.queue
	p.mu.Unlock()
	if queue || len(spot) == 0 {
		return out, nil
	}
	for chunk := range slices.Chunk(spot, spotFilterMax) {
		if err := p.pollSpot(ctx, chunk, out); err != nil {
			return out, err
		}
	}
	return out, nil
}

// pollSpot adds to into the notices of the instances among ids whose Spot
// request EC2 marked for termination.
func (p *Provider) pollSpot(ctx context.Context, ids []string, into map[string]scaler.Notice) error {
	resp, err := p.api.DescribeSpotInstanceRequests(ctx, &ec2.DescribeSpotInstanceRequestsInput{
		Filters: []types.Filter{
			{Name: aws.String("instance-id"), Values: ids},
			{Name: aws.String("status-code"), Values: markedCodes},
		},
	}, p.callOpts(opSpot)...)
	if err != nil {
		return fmt.Errorf("ec2 provider: spot requests: %w", err)
	}
	for _, r := range resp.SpotInstanceRequests {
		id := aws.ToString(r.InstanceId)
		// Checked here too: a filter the endpoint ignores must not turn
		// every Spot builder into an interrupted one.
		if r.Status == nil || !slices.Contains(markedCodes, aws.ToString(r.Status.Code)) || !slices.Contains(ids, id) {
			continue
		}
		n := scaler.Notice{Instance: id, Kind: scaler.NoticeInterruption}
		if r.Status.UpdateTime != nil {
			n.Deadline = r.Status.UpdateTime.UTC().Add(SpotWarning)
		}
		into[id] = n
	}
	return nil
}

// noticeHold is how long a notice about an instance no List showed yet is
// kept: the queue may be read before the first List after a start, or
// tell of a builder launched after the last one. Notices only ever
// returns notices about the cluster's listed instances, so one about
// another instance is ignored, then dropped.
const noticeHold = 5 * time.Minute

// heldNotice is a notice Notify was given, and when.
type heldNotice struct {
	n  scaler.Notice
	at time.Time
}

// Notify records a notice the interruption queue brought (see Queue). It
// reports whether the last List showed the instance as the cluster's; a
// notice about another is kept for noticeHold in case a List shows it
// yet. A weaker notice does not replace a stronger one.
func (p *Provider) Notify(n scaler.Notice) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if old, ok := p.notices[n.Instance]; !ok || !old.n.Stronger(n) {
		p.notices[n.Instance] = heldNotice{n: n, at: p.clock.Now()}
	}
	return p.listed[n.Instance]
}

package ec2

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/ec2"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// TestNoticesPollMarkedForTermination: without a queue, Notices asks EC2
// once which Spot builders are marked for termination, warns of those
// (deadline two minutes from the mark), and makes no call while no Spot
// builder runs.
func TestNoticesPollMarkedForTermination(t *testing.T) {
	ctx := context.Background()
	od := spotPool()
	od.Market = MarketOnDemand
	e := newEnv(t, map[string]PoolOptions{"x86": spotPool(), "od": od})
	onDemand := launch(t, e, "od", "slot1")
	list := func() []scaler.Instance {
		t.Helper()
		ins, err := e.p.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return ins
	}
	got, err := e.p.Notices(ctx, list())
	if err != nil || len(got) != 0 || e.fake.CallCount(ec2test.OpSpotRequests) != 0 {
		t.Fatalf("only on-demand builders: notices %v (err %v) after %d calls; want none, no call", got, err, e.fake.CallCount(ec2test.OpSpotRequests))
	}
	a, b := launch(t, e, "x86", "slot1"), launch(t, e, "x86", "slot2")
	e.clock.Advance(time.Minute)
	markedAt := e.clock.Now()
	e.fake.MarkForTermination(b.ID)
	got, err = e.p.Notices(ctx, list())
	if err != nil {
		t.Fatal(err)
	}
	want := scaler.Notice{Instance: b.ID, Kind: scaler.NoticeInterruption, Deadline: markedAt.Add(SpotWarning)}
	if len(got) != 1 || got[b.ID] != want {
		t.Errorf("notices = %v, want only %v", got, want)
	}
	if n := e.fake.CallCount(ec2test.OpSpotRequests); n != 1 {
		t.Errorf("%d DescribeSpotInstanceRequests calls for one round, want 1", n)
	}
	calls := e.fake.Calls()
	req := calls[len(calls)-1].Input.(*ec2.DescribeSpotInstanceRequestsInput)
	if ids := req.Filters[0].Values; len(ids) != 2 || slices.Contains(ids, onDemand.ID) || !slices.Contains(ids, a.ID) {
		t.Errorf("asked about %v; want the Spot builders %s and %s only", ids, a.ID, b.ID)
	}
	e.fake.Interrupt(b.ID)
	e.fake.Interrupt(a.ID)
	if got, _ = e.p.Notices(ctx, list()); len(got) != 0 || e.fake.CallCount(ec2test.OpSpotRequests) != 1 {
		t.Errorf("Spot builders gone: notices %v after %d calls; want none and no new call", got, e.fake.CallCount(ec2test.OpSpotRequests))
	}
}

// TestNoticesFromTheQueue: with a queue, Notices returns what Notify was
// told of the cluster's live instances and polls nothing; a notice that
// came before the List that shows its instance counts (the queue may be
// read before a start's first List); one about an instance that is not
// the cluster's is never returned and is dropped after noticeHold; a
// rebalance recommendation does not weaken an interruption warning.
func TestNoticesFromTheQueue(t *testing.T) {
	ctx := context.Background()
	fake := ec2test.New()
	clk := newClock()
	p, err := New(fake, Options{Cluster: cluster, Pools: map[string]PoolOptions{"x86": spotPool()}, Clock: clk, Queue: true})
	if err != nil {
		t.Fatal(err)
	}
	in, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
	if err != nil {
		t.Fatal(err)
	}
	warning := scaler.Notice{Instance: in.ID, Kind: scaler.NoticeInterruption, Deadline: clk.Now().Add(SpotWarning)}
	if p.Notify(warning) {
		t.Error("Notify said a builder no List showed yet is known")
	}
	ins, err := p.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p.Notify(scaler.Notice{Instance: "i-0000000000000dead", Kind: scaler.NoticeInterruption}) {
		t.Error("Notify said an instance not the cluster's is known")
	}
	if !p.Notify(scaler.Notice{Instance: in.ID, Kind: scaler.NoticeRebalance}) {
		t.Fatal("Notify did not know the cluster's listed instance")
	}
	got, err := p.Notices(ctx, ins)
	if err != nil || len(got) != 1 || got[in.ID] != warning {
		t.Errorf("notices = %v (err %v), want only %v", got, err, warning)
	}
	if n := fake.CallCount(ec2test.OpSpotRequests); n != 0 {
		t.Errorf("%d DescribeSpotInstanceRequests calls with a queue, want none", n)
	}
	clk.Advance(noticeHold)
	if _, err := p.Notices(ctx, ins); err != nil || len(p.notices) != 1 {
		t.Errorf("after %s: %d notices held, want only the cluster's (the other dropped)", noticeHold, len(p.notices))
	}
	fake.Interrupt(in.ID)
	if ins, err = p.List(ctx); err != nil {
		t.Fatal(err)
	}
	if got, _ = p.Notices(ctx, ins); len(got) != 0 {
		t.Errorf("instance gone: notices = %v, want none", got)
	}
}

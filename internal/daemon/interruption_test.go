package daemon_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// TestEC2InterruptionWarningDrainsAndReplaces: EC2 marks the Spot builder
// holding a reservation and a session for termination (its two-minute
// warning, found by the round's DescribeSpotInstanceRequests). The round
// that sees it drains the slot and launches the replacement; the
// reservation moves to the replacement once it is ready; the warned
// builder is not terminated while its session is open, and is once it
// closes.
func TestEC2InterruptionWarningDrainsAndReplaces(t *testing.T) {
	fake := ec2test.New()
	fake.Zones = map[string]string{ec2SubnetA: "us-east-1a", ec2SubnetB: "us-east-1b"}
	clock := clocktest.New(daemontest.T0)
	fake.Now = clock.Now
	d := startEC2(t, ec2Config(t, []string{ec2SubnetA, ec2SubnetB}, "ami-0123456789abcdef0", "", ""),
		clock, daemontest.NewReachable(), fake)
	slot2 := scaler.SlotKey{Pool: "x86", Slot: "slot2"}

	d.create("build-1")
	first := d.waitReady("build-1").InstanceID
	d.reach.SetSessions(ec2Slot1, 1)
	clock.Advance(10 * time.Second)
	fake.MarkForTermination(first)
	d.reconcile()

	if s := d.apiSlot(ec2Slot1); s.State != "draining" || s.InstanceID != first {
		t.Errorf("slot1 after the warning's round = %+v; want draining on %s (the agent says drain)", s, first)
	}
	if s := d.slot(ec2Slot1); s.DrainReason != scaler.DrainInterrupted {
		t.Errorf("slot1 drain reason = %q, want %q", s.DrainReason, scaler.DrainInterrupted)
	}
	if n := fake.CallCount(ec2test.OpRun); n != 2 {
		t.Errorf("RunInstances calls after the warning's round = %d, want 2 (the replacement launched in the same round)", n)
	}
	notices := eventsOf(d.events(api.EventQuery{Pool: "x86", Slot: "slot1"}), scaler.EvNotice)
	if want := "interruption warning, reclaimed at " + clock.Now().Add(2*time.Minute).UTC().Format(time.RFC3339); len(notices) != 1 ||
		notices[0].InstanceID != first || notices[0].Reason != want {
		t.Errorf("notice events = %+v, want one for %s: %q", notices, first, want)
	}
	if n := d.metric("nix_builder_autoscaler_interruption_notices_total", map[string]string{"pool": "x86", "kind": "interruption"}); n != 1 {
		t.Errorf("interruption_notices_total{pool=x86,kind=interruption} = %v, want 1", n)
	}

	var r api.Reservation
	d.WaitFor("build-1 moved to the replacement on slot2", func() bool {
		r = d.reservation("build-1")
		return r.State == "ready" && r.Slot == "slot2"
	})
	if r.InstanceID == first || d.slot(slot2).State != scaler.Ready {
		t.Errorf("build-1 = %+v, slot2 %s; want ready on the replacement", r, d.slot(slot2).State)
	}
	if got, want := eventKinds(d.events(api.EventQuery{Reservation: "build-1"})), "created assigned requeued assigned"; got != want {
		t.Errorf("build-1 events = %q, want %q", got, want)
	}

	// The session stays open: the warned builder is not terminated, however
	// many rounds pass.
	for range 3 {
		clock.Advance(20 * time.Second)
		d.reconcile()
	}
	if n := fake.CallCount(ec2test.OpTerminate); n != 0 {
		t.Errorf("TerminateInstances calls with a session open = %d, want none", n)
	}
	if s := d.slot(ec2Slot1); s.State != scaler.Draining {
		t.Errorf("slot1 with a session open = %s, want still draining", s.State)
	}

	d.reach.SetSessions(ec2Slot1, 0)
	d.reconcile()
	d.WaitFor("the warned builder terminated once its session closed", func() bool {
		return fake.CallCount(ec2test.OpTerminate) == 1
	})
	if s := d.slot(slot2); s.State != scaler.Ready || s.InstanceID != r.InstanceID {
		t.Errorf("slot2 = %s on %s, want the replacement still ready", s.State, s.InstanceID)
	}
}

// TestEC2MotoInterruptionQueue: with interruption_queue set, the daemon
// long-polls the queue (moto's SQS, the real SDK); a Spot interruption
// warning sent there for the builder of a ready reservation drains its
// slot and launches a replacement, and the message is deleted.
func TestEC2MotoInterruptionQueue(t *testing.T) {
	m := newMotoEC2(t)
	ctx := context.Background()
	sc, err := ec2prov.NewSQSClient(ctx, ec2test.MotoRegion, m.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	cq, err := sc.CreateQueue(ctx, &sqs.CreateQueueInput{QueueName: aws.String("nix-builders-interruptions")})
	if err != nil {
		t.Fatal(err)
	}
	url := aws.ToString(cq.QueueUrl)
	cfg := ec2Config(t, []string{m.subnets[0].ID, m.subnets[1].ID}, ec2test.MotoAMI, "",
		fmt.Sprintf("endpoint = %q\ninterruption_queue = %q", m.Endpoint, url))
	clock := clocktest.New(time.Now().UTC().Truncate(time.Second))
	d := startEC2(t, cfg, clock, daemontest.NewReachable(), nil)

	d.create("build-1")
	id := d.waitReady("build-1").InstanceID
	warning := fmt.Sprintf(`{"version":"0","id":"1e5527d7-bb36-4607-3370-4164db56a40e","detail-type":"EC2 Spot Instance Interruption Warning",
"source":"aws.ec2","account":"123456789012","time":%q,"region":"us-east-1","resources":["arn:aws:ec2:us-east-1b:instance/%s"],
"detail":{"instance-id":%q,"instance-action":"terminate"}}`, clock.Now().Format(time.RFC3339), id, id)
	if _, err := sc.SendMessage(ctx, &sqs.SendMessageInput{QueueUrl: aws.String(url), MessageBody: aws.String(warning)}); err != nil {
		t.Fatal(err)
	}
	d.WaitFor("slot1 draining after the queued warning", func() bool {
		d.reconcile()
		return d.slot(ec2Slot1).State == scaler.Draining
	})
	if s := d.slot(ec2Slot1); s.DrainReason != scaler.DrainInterrupted || s.InstanceID != id {
		t.Errorf("slot1 = %+v, want draining %s for %q", s, id, scaler.DrainInterrupted)
	}
	if n := len(m.ours(t)); n != 2 {
		t.Errorf("instances of cluster %s = %d after the warning, want 2 (the replacement)", ec2Cluster, n)
	}
	d.WaitFor("the warning deleted from the queue", func() bool {
		a, err := sc.GetQueueAttributes(ctx, &sqs.GetQueueAttributesInput{QueueUrl: aws.String(url),
			AttributeNames: []sqstypes.QueueAttributeName{"ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"}})
		return err == nil && a.Attributes["ApproximateNumberOfMessages"] == "0" && a.Attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
	})
	m.checkOthersUntouched(t, d)
}

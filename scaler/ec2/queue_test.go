package ec2

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Real-shaped EventBridge events as EC2 and AWS Health send them to the
// queue (ids, account and times made up).
const (
	evSpotWarning = `{"version":"0","id":"1e5527d7-bb36-4607-3370-4164db56a40e","detail-type":"EC2 Spot Instance Interruption Warning",
"source":"aws.ec2","account":"123456789012","time":"2026-03-01T12:00:00Z","region":"us-east-1",
"resources":["arn:aws:ec2:us-east-1b:instance/%[1]s"],"detail":{"instance-id":"%[1]s","instance-action":"terminate"}}`
	evRebalance = `{"version":"0","id":"2e5527d7-bb36-4607-3370-4164db56a40e","detail-type":"EC2 Instance Rebalance Recommendation",
"source":"aws.ec2","account":"123456789012","time":"2026-03-01T12:00:00Z","region":"us-east-1",
"resources":["arn:aws:ec2:us-east-1b:instance/%[1]s"],"detail":{"instance-id":"%[1]s"}}`
	evStateChange = `{"version":"0","id":"3e5527d7-bb36-4607-3370-4164db56a40e","detail-type":"EC2 Instance State-change Notification",
"source":"aws.ec2","account":"123456789012","time":"2026-03-01T12:00:00Z","region":"us-east-1",
"resources":["arn:aws:ec2:us-east-1:123456789012:instance/%[1]s"],"detail":{"instance-id":"%[1]s","state":"%[2]s"}}`
	evHealth = `{"version":"0","id":"4e5527d7-bb36-4607-3370-4164db56a40e","detail-type":"AWS Health Event","source":"aws.health",
"account":"123456789012","time":"2026-03-01T12:00:00Z","region":"us-east-1","resources":["%[1]s"],
"detail":{"eventArn":"arn:aws:health:us-east-1::event/EC2/AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED/AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED_1",
"service":"EC2","eventTypeCode":"AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED","eventTypeCategory":"%[2]s",
"startTime":"Sat, 14 Mar 2026 12:00:00 GMT","eventDescription":[{"language":"en_US","latestDescription":"retirement"}],
"affectedEntities":[{"entityValue":"%[1]s"}]}}`
)

func TestParseEvent(t *testing.T) {
	const id = "i-0123456789abcdef0"
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name, body string
		want       []scaler.Notice
		err        bool
	}{
		{"spot warning", fmt.Sprintf(evSpotWarning, id), []scaler.Notice{{Instance: id, Kind: scaler.NoticeInterruption, Deadline: at.Add(2 * time.Minute)}}, false},
		{"rebalance", fmt.Sprintf(evRebalance, id), []scaler.Notice{{Instance: id, Kind: scaler.NoticeRebalance}}, false},
		{"stopping", fmt.Sprintf(evStateChange, id, "stopping"), []scaler.Notice{{Instance: id, Kind: scaler.NoticeInterruption, Deadline: at}}, false},
		{"shutting down", fmt.Sprintf(evStateChange, id, "shutting-down"), []scaler.Notice{{Instance: id, Kind: scaler.NoticeInterruption, Deadline: at}}, false},
		{"running", fmt.Sprintf(evStateChange, id, "running"), nil, false},
		{"health scheduled change", fmt.Sprintf(evHealth, id, "scheduledChange"), []scaler.Notice{{Instance: id, Kind: scaler.NoticeRebalance}}, false},
		{"health issue", fmt.Sprintf(evHealth, id, "issue"), nil, false},
		{"other event", `{"detail-type":"EC2 AMI State Change","source":"aws.ec2","detail":{}}`, nil, true},
		{"no instance", `{"detail-type":"EC2 Spot Instance Interruption Warning","detail":{}}`, nil, true},
		{"not json", `hello`, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseEvent([]byte(tc.body))
			if (err != nil) != tc.err {
				t.Fatalf("err = %v, want error %v", err, tc.err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("notices = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestMotoInterruptionQueue: through moto's SQS, with the real SDK
// client: the queue's events about the cluster's builders reach Notices,
// an event about another instance and a message that is no event are
// ignored, and every message read is deleted.
func TestMotoInterruptionQueue(t *testing.T) {
	e := newMotoEnv(t)
	ctx := context.Background()
	p, err := New(e.client, Options{Cluster: "ci", Pools: e.pools(), Queue: true})
	if err != nil {
		t.Fatal(err)
	}
	a, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "L1"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot2", LaunchID: "L2"})
	if err != nil {
		t.Fatal(err)
	}
	foreign := e.runDirect(t, map[string]string{TagCluster: "other"})
	ins, err := p.List(ctx)
	if err != nil {
		t.Fatal(err)
	}

	client, err := NewSQSClient(ctx, "us-east-1", e.moto.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	cq, err := client.CreateQueue(ctx, &sqs.CreateQueueInput{QueueName: aws.String("nix-builders-interruptions")})
	if err != nil {
		t.Fatal(err)
	}
	url := aws.ToString(cq.QueueUrl)
	for _, body := range []string{
		fmt.Sprintf(evSpotWarning, a.ID), fmt.Sprintf(evRebalance, b.ID), fmt.Sprintf(evSpotWarning, foreign), "not an event",
	} {
		if _, err := client.SendMessage(ctx, &sqs.SendMessageInput{QueueUrl: aws.String(url), MessageBody: aws.String(body)}); err != nil {
			t.Fatal(err)
		}
	}
	kicks := 0
	q, err := NewQueue(client, QueueOptions{URL: url, Notify: p.Notify, Kick: func() { kicks++ }})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 { // SQS may hand out a batch in parts
		if err := q.Poll(ctx); err != nil {
			t.Fatal(err)
		}
		if got, _ := p.Notices(ctx, ins); len(got) == 2 {
			break
		}
	}
	got, err := p.Notices(ctx, ins)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[a.ID].Kind != scaler.NoticeInterruption || got[a.ID].Deadline.IsZero() || got[b.ID].Kind != scaler.NoticeRebalance {
		t.Errorf("notices = %v; want an interruption warning for %s and a rebalance recommendation for %s, nothing for %s", got, a.ID, b.ID, foreign)
	}
	if kicks == 0 {
		t.Error("no round kicked after notices about the cluster's builders")
	}
	attrs, err := client.GetQueueAttributes(ctx, &sqs.GetQueueAttributesInput{QueueUrl: aws.String(url),
		AttributeNames: []sqstypes.QueueAttributeName{"ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"}})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range attrs.Attributes {
		if v != "0" {
			t.Errorf("queue %s = %s after the poll; want every message deleted", k, v)
		}
	}
}

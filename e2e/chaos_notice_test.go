package e2e

import (
	"context"
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sqs"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
)

// faultWarning: EC2's two-minute Spot interruption warning for a running
// builder, sent to the daemon's interruption queue (moto's SQS) as
// EventBridge would. The daemon drains the builder, launches a
// replacement and moves the builder's reservations to it; it must not
// terminate the builder while a session is open on it (the terminate
// check; its reservations are followed as they move, see below). EC2 does not reclaim it here: the daemon's own
// terminate, once the builder is idle, is what is checked.
const faultWarning = "interruption-warning"

// startQueue creates the interruption queue in moto and returns its URL.
func (c *chaos) startQueue(endpoint string) string {
	sc, err := ec2prov.NewSQSClient(context.Background(), "us-east-1", endpoint)
	if err != nil {
		c.t.Fatalf("sqs client: %v", err)
	}
	out, err := sc.CreateQueue(context.Background(), &sqs.CreateQueueInput{QueueName: aws.String("chaos-interruptions")})
	if err != nil {
		c.t.Fatalf("create the interruption queue in moto: %v", err)
	}
	c.sqs, c.queue = sc, aws.ToString(out.QueueUrl)
	return c.queue
}

// interruptionWarning sends a warning for a random running builder; its
// acknowledged reservations are followed (relearn) until the daemon has
// moved them to a builder that stays.
func (c *chaos) interruptionWarning() string {
	running := c.farm.running()
	if len(running) == 0 {
		return faultWarning + "-nothing"
	}
	id := running[c.rng.IntN(len(running))]
	c.mu.Lock()
	c.warned[id] = true
	var moving []string
	for rid, r := range c.res {
		if r.instance == id && r.state == resAcked {
			// Stale until relearn sees it moved: a client learns of the
			// move on its next look, and the daemon may terminate the
			// builder a round after the move.
			r.stale = true
			moving = append(moving, rid)
		}
	}
	c.mu.Unlock()
	body := fmt.Sprintf(`{"version":"0","id":"chaos-%[1]s","detail-type":"EC2 Spot Instance Interruption Warning","source":"aws.ec2",
"account":"123456789012","time":%[2]q,"region":"us-east-1","resources":["arn:aws:ec2:us-east-1a:instance/%[1]s"],
"detail":{"instance-id":%[1]q,"instance-action":"terminate"}}`, id, time.Now().UTC().Format(time.RFC3339))
	if _, err := c.sqs.SendMessage(context.Background(), &sqs.SendMessageInput{QueueUrl: aws.String(c.queue), MessageBody: aws.String(body)}); err != nil {
		c.t.Fatalf("send the interruption warning for %s: %v", id, err)
	}
	for _, rid := range moving {
		go c.relearn(rid)
	}
	return faultWarning
}

// countNotices reports how many interruption warnings the daemon recorded
// (notice events): a figure, not an invariant, as a warning about a
// builder that went away first is rightly ignored.
func (c *chaos) countNotices(cl *api.Client) {
	n := 0
	for q := (api.EventQuery{Limit: api.MaxPageSize}); ; {
		l, err := cl.Events(context.Background(), q)
		if err != nil {
			c.t.Logf("count notice events: %v", err)
			return
		}
		for _, e := range l.Events {
			if e.Kind == scaler.EvNotice {
				n++
			}
		}
		if q.Cursor = l.Next; q.Cursor == "" {
			break
		}
	}
	c.count(func(r *chaosReportData) { r.NoticeEvents = n })
}

package ec2

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// The interruption queue: EventBridge rules send EC2's notices about the
// region's instances to an SQS queue; Queue long-polls it and hands the
// notices about the cluster's builders to the Provider (Notify).

// SQSAPI is the part of the SQS API Queue calls; *sqs.Client implements
// it.
type SQSAPI interface {
	ReceiveMessage(ctx context.Context, in *sqs.ReceiveMessageInput, optFns ...func(*sqs.Options)) (*sqs.ReceiveMessageOutput, error)
	DeleteMessageBatch(ctx context.Context, in *sqs.DeleteMessageBatchInput, optFns ...func(*sqs.Options)) (*sqs.DeleteMessageBatchOutput, error)
}

var _ SQSAPI = (*sqs.Client)(nil)

// EventBridge detail types the queue understands.
const (
	DetailSpotWarning = "EC2 Spot Instance Interruption Warning"
	DetailRebalance   = "EC2 Instance Rebalance Recommendation"
	DetailStateChange = "EC2 Instance State-change Notification"
	DetailHealth      = "AWS Health Event"
)

// Receive settings: SQS's longest wait and largest batch, so an idle
// queue costs one request per 20 s.
const (
	receiveWait  = 20
	receiveBatch = 10
	// retryAfter is the pause after a failed receive, so an unreachable
	// queue is not hammered.
	retryAfter = 10 * time.Second
)

// Queue reads an interruption queue.
type Queue struct {
	api    SQSAPI
	url    string
	notify func(scaler.Notice) bool
	kick   func()
	log    *slog.Logger
	clock  clock.Clock
}

// QueueOptions configures a Queue.
type QueueOptions struct {
	URL string
	// Notify is given each notice; it reports whether the instance is the
	// cluster's (Provider.Notify).
	Notify func(scaler.Notice) bool
	// Kick is called after a batch that told of the cluster's builders, so
	// that a round acts on it at once (the reconciler's Kick).
	Kick   func()
	Logger *slog.Logger // nil discards
	Clock  clock.Clock  // nil = clock.Real
}

// NewQueue returns a reader of the queue at o.URL through api.
func NewQueue(api SQSAPI, o QueueOptions) (*Queue, error) {
	if api == nil || o.URL == "" || o.Notify == nil {
		return nil, errors.New("interruption queue: need an SQS client, a queue URL and Notify")
	}
	q := &Queue{api: api, url: o.URL, notify: o.Notify, kick: o.Kick, log: o.Logger, clock: o.Clock}
	if q.log == nil {
		q.log = slog.New(slog.DiscardHandler)
	}
	if q.clock == nil {
		q.clock = clock.Real{}
	}
	if q.kick == nil {
		q.kick = func() {}
	}
	return q, nil
}

// Run long-polls the queue until ctx ends.
func (q *Queue) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		if err := q.Poll(ctx); err != nil && ctx.Err() == nil {
			q.log.Error("interruption queue: receive failed; notices wait for the queue", "queue", q.url, "err", err)
			if clock.Sleep(ctx, q.clock, retryAfter) != nil {
				break
			}
		}
	}
	return ctx.Err()
}

// Poll receives one batch (waiting up to 20 s for it), hands its notices
// on, and deletes every message it read: handled, about an instance that
// is not the cluster's, or not an event it understands (kept, it would
// come back forever).
func (q *Queue) Poll(ctx context.Context) error {
	out, err := q.api.ReceiveMessage(ctx, &sqs.ReceiveMessageInput{QueueUrl: aws.String(q.url),
		MaxNumberOfMessages: receiveBatch, WaitTimeSeconds: receiveWait})
	if err != nil {
		return fmt.Errorf("receive: %w", err)
	}
	var del []sqstypes.DeleteMessageBatchRequestEntry
	ours := 0
	for i, m := range out.Messages {
		notices, err := ParseEvent([]byte(aws.ToString(m.Body)))
		if err != nil {
			q.log.Warn("interruption queue: message is no event this daemon understands; deleted", "queue", q.url, "err", err)
		}
		for _, n := range notices {
			if q.notify(n) {
				ours++
				q.log.Info("interruption queue: notice", "instance", n.Instance, "kind", n.Kind, "deadline", n.Deadline)
			}
		}
		del = append(del, sqstypes.DeleteMessageBatchRequestEntry{Id: aws.String(strconv.Itoa(i)), ReceiptHandle: m.ReceiptHandle})
	}
	if ours > 0 {
		q.kick()
	}
	if len(del) == 0 {
		return nil
	}
	res, err := q.api.DeleteMessageBatch(ctx, &sqs.DeleteMessageBatchInput{QueueUrl: aws.String(q.url), Entries: del})
	if err != nil {
		// The messages come back after their visibility timeout; a notice
		// given twice changes nothing.
		return fmt.Errorf("delete: %w", err)
	}
	if len(res.Failed) > 0 {
		q.log.Warn("interruption queue: some messages not deleted; they come back", "queue", q.url, "failed", len(res.Failed))
	}
	return nil
}

// event is the EventBridge envelope, with the detail fields of the events
// Queue understands.
type event struct {
	DetailType string    `json:"detail-type"`
	Source     string    `json:"source"`
	Time       time.Time `json:"time"`
	Detail     struct {
		InstanceID string `json:"instance-id"`
		State      string `json:"state"`
		// AWS Health
		Service           string `json:"service"`
		EventTypeCategory string `json:"eventTypeCategory"`
		AffectedEntities  []struct {
			EntityValue string `json:"entityValue"`
		} `json:"affectedEntities"`
	} `json:"detail"`
}

// ParseEvent reads an EventBridge event (an SQS message's body) and
// returns its notices: none for an event that tells of no coming loss
// (an instance starting, a Health event that is not an EC2 scheduled
// change), an error for a body that is not such an event.
func ParseEvent(body []byte) ([]scaler.Notice, error) {
	var ev event
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, fmt.Errorf("not an EventBridge event: %w", err)
	}
	d := ev.Detail
	switch ev.DetailType {
	case DetailSpotWarning:
		return one(d.InstanceID, scaler.NoticeInterruption, ev.Time.Add(SpotWarning))
	case DetailRebalance:
		return one(d.InstanceID, scaler.NoticeRebalance, time.Time{})
	case DetailStateChange:
		if scaler.InstanceState(d.State).Gone() {
			return one(d.InstanceID, scaler.NoticeInterruption, ev.Time)
		}
		return nil, nil
	case DetailHealth:
		if d.Service != "EC2" || d.EventTypeCategory != "scheduledChange" {
			return nil, nil
		}
		var out []scaler.Notice
		for _, e := range d.AffectedEntities {
			if e.EntityValue != "" {
				out = append(out, scaler.Notice{Instance: e.EntityValue, Kind: scaler.NoticeRebalance})
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("event detail-type %q from %q is not one the interruption queue takes", ev.DetailType, ev.Source)
}

func one(instance string, kind scaler.NoticeKind, deadline time.Time) ([]scaler.Notice, error) {
	if instance == "" {
		return nil, errors.New("event without detail.instance-id")
	}
	if !deadline.IsZero() {
		deadline = deadline.UTC()
	}
	return []scaler.Notice{{Instance: instance, Kind: kind, Deadline: deadline}}, nil
}

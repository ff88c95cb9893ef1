package ec2

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// API is the part of the EC2 API the provider calls. *ec2.Client
// implements it (see NewClient); tests pass ec2test.Fake.
type API = ec2API

type ec2API interface {
	RunInstances(ctx context.Context, in *ec2.RunInstancesInput, optFns ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error)
	TerminateInstances(ctx context.Context, in *ec2.TerminateInstancesInput, optFns ...func(*ec2.Options)) (*ec2.TerminateInstancesOutput, error)
	// DescribeInstances is also driven through ec2.NewDescribeInstancesPaginator.
	DescribeInstances(ctx context.Context, in *ec2.DescribeInstancesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error)
	// DescribeSpotInstanceRequests finds the Spot builders EC2 marked for
	// termination, when no interruption queue tells of them.
	DescribeSpotInstanceRequests(ctx context.Context, in *ec2.DescribeSpotInstanceRequestsInput, optFns ...func(*ec2.Options)) (*ec2.DescribeSpotInstanceRequestsOutput, error)
}

var _ ec2API = (*ec2.Client)(nil)

// Operation names, as EC2 spells them (the op label of the throttle metric).
const (
	opRun       = "RunInstances"
	opDescribe  = "DescribeInstances"
	opTerminate = "TerminateInstances"
	opSpot      = "DescribeSpotInstanceRequests"
)

// Client-side request rates, per operation and per Provider: below EC2's
// per-account token buckets (RunInstances 5 burst / 2 per s, Describe* 100 /
// 20, TerminateInstances 100 / 5), so the daemon leaves headroom for other
// tools in the account. Every HTTP attempt takes a token, retries included.
var defaultLimits = map[string]struct {
	burst int
	rate  float64 // tokens per second
}{
	opRun:       {burst: 4, rate: 1.5},
	opDescribe:  {burst: 50, rate: 10},
	opTerminate: {burst: 50, rate: 4},
	opSpot:      {burst: 10, rate: 2},
}

// Retry settings of NewClient's SDK retryer. Throttling errors
// (RequestLimitExceeded and the SDK's other throttle codes) back off
// exponentially from 1 s with jitter, up to maxBackoff per wait.
const (
	maxAttempts = 8
	maxBackoff  = 20 * time.Second
)

// NewClient returns an EC2 client for region. The SDK's default credential
// chain applies (environment, shared files, instance role). endpoint, when
// set, replaces the service endpoint (BaseEndpoint), e.g. a moto_server on
// loopback; with an endpoint and no AWS_ACCESS_KEY_ID in the environment the
// client signs with static dummy credentials. The client retries throttling
// and transient errors up to 8 attempts with exponential backoff and jitter
// (the SDK standard retryer without its retry quota: the provider's own
// rate limit keeps the request rate down instead).
func NewClient(ctx context.Context, region, endpoint string) (*ec2.Client, error) {
	return newClient(ctx, region, endpoint, nil)
}

func newClient(ctx context.Context, region, endpoint string, tune func(*retry.StandardOptions)) (*ec2.Client, error) {
	cfg, err := loadConfig(ctx, region, endpoint, withRetryer(tune))
	if err != nil {
		return nil, fmt.Errorf("ec2 client: %w", err)
	}
	return ec2.NewFromConfig(cfg, func(o *ec2.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
	}), nil
}

// NewSQSClient returns an SQS client for an interruption queue in region,
// with NewClient's credentials, endpoint and retry settings (moto_server
// serves SQS on its EC2 endpoint).
func NewSQSClient(ctx context.Context, region, endpoint string) (*sqs.Client, error) {
	cfg, err := loadConfig(ctx, region, endpoint, withRetryer(nil))
	if err != nil {
		return nil, fmt.Errorf("sqs client: %w", err)
	}
	return sqs.NewFromConfig(cfg, func(o *sqs.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
	}), nil
}

// withRetryer is the SDK's standard retryer with NewClient's settings,
// changed by tune if set.
func withRetryer(tune func(*retry.StandardOptions)) func(*config.LoadOptions) error {
	return config.WithRetryer(func() aws.Retryer {
		return retry.NewStandard(func(o *retry.StandardOptions) {
			o.MaxAttempts = maxAttempts
			o.MaxBackoff = maxBackoff
			o.RateLimiter = ratelimit.None
			if tune != nil {
				tune(o)
			}
		})
	})
}

// AWSConfig is the SDK configuration NewClient builds its client from
// (region, credentials; the SDK's default retryer), for clients of other
// services that must see the same account: preflight's STS and IAM
// clients. With an endpoint, those clients need it as their BaseEndpoint
// too.
func AWSConfig(ctx context.Context, region, endpoint string) (aws.Config, error) {
	return loadConfig(ctx, region, endpoint)
}

func loadConfig(ctx context.Context, region, endpoint string, extra ...func(*config.LoadOptions) error) (aws.Config, error) {
	opts := slices.Clone(extra)
	if region != "" {
		opts = append(opts, config.WithRegion(region))
	}
	if endpoint != "" && os.Getenv("AWS_ACCESS_KEY_ID") == "" {
		opts = append(opts, config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider("testing", "testing", "")))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return aws.Config{}, fmt.Errorf("load AWS config: %w", err)
	}
	if cfg.Region == "" {
		return aws.Config{}, ErrNoRegion
	}
	return cfg, nil
}

// ErrNoRegion: neither the pool nor the environment names a region.
var ErrNoRegion = errors.New("no region (set the pool's region or AWS_REGION)")

// callOpts are the per-call options the provider passes with every request
// of operation op: a middleware right after the SDK's retry middleware, so
// it runs once per HTTP attempt, which waits for op's rate-limit token and
// counts throttled attempts. Clients that are not an *ec2.Client (the test
// fake) ignore them.
func (p *Provider) callOpts(op string) []func(*ec2.Options) {
	lim := p.limits[op]
	mw := middleware.FinalizeMiddlewareFunc("NixBuilderAutoscalerAttempt", func(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
		if lim != nil {
			if err := lim.wait(ctx); err != nil {
				return middleware.FinalizeOutput{}, middleware.Metadata{}, err
			}
		}
		out, md, err := next.HandleFinalize(ctx, in)
		if code := errorCode(err); isThrottle(code) {
			p.m.throttles.WithLabelValues(op).Inc()
			p.log.Warn("ec2 request throttled; the SDK retries with backoff", "op", op, "code", code)
		}
		return out, md, err
	})
	return []func(*ec2.Options){ec2.WithAPIOptions(func(s *middleware.Stack) error {
		if err := s.Finalize.Insert(mw, "Retry", middleware.After); err == nil {
			return nil
		}
		return s.Finalize.Add(mw, middleware.After)
	})}
}

// errorCode is the EC2 error code in err ("" if err carries none).
func errorCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// errorMessage is the EC2 error message in err.
func errorMessage(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorMessage()
	}
	return err.Error()
}

func isThrottle(code string) bool {
	_, ok := retry.DefaultThrottleErrorCodes[code]
	return ok
}

// bucket is a token bucket: burst tokens, refilled at rate per second. A
// waiter reserves a token at once (the balance may go negative) and sleeps
// until it is paid for, so waiters are served in order.
type bucket struct {
	mu     sync.Mutex
	burst  float64
	rate   float64
	tokens float64
	last   time.Time
	now    func() time.Time
	sleep  func(ctx context.Context, d time.Duration) error
}

func newBucket(burst int, rate float64) *bucket {
	// EC2 counts its request rate on the wall clock, whatever the
	// provider's clock says.
	return &bucket{burst: float64(burst), rate: rate, tokens: float64(burst), now: clock.Real{}.Now,
		sleep: func(ctx context.Context, d time.Duration) error { return clock.Sleep(ctx, clock.Real{}, d) }}
}

// reserve takes a token and says how long the caller must wait for it.
func (b *bucket) reserve() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	if !b.last.IsZero() {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	b.tokens--
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}

// cancel returns a reserved token that was not used.
func (b *bucket) cancel() {
	b.mu.Lock()
	b.tokens = min(b.burst, b.tokens+1)
	b.mu.Unlock()
}

func (b *bucket) wait(ctx context.Context) error {
	d := b.reserve()
	if d <= 0 {
		return nil
	}
	if err := b.sleep(ctx, d); err != nil {
		b.cancel()
		return err
	}
	return nil
}

package ec2

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// throttlingEC2 is an HTTP EC2 endpoint that answers the first throttle
// requests of each action with RequestLimitExceeded (HTTP 503, EC2's XML
// error document), then succeeds.
type throttlingEC2 struct {
	throttle int

	mu       sync.Mutex
	requests map[string][]http.Header // action → headers of each request
	tokens   []string                 // ClientToken of each RunInstances request
}

const instanceXML = `<item>
  <instanceId>i-0123456789abcdef0</instanceId>
  <imageId>ami-1</imageId>
  <instanceState><code>%d</code><name>%s</name></instanceState>
  <instanceType>m7i.xlarge</instanceType>
  <launchTime>2026-03-01T12:00:00.000Z</launchTime>
  <placement><availabilityZone>us-east-1b</availabilityZone></placement>
  <privateIpAddress>10.0.0.5</privateIpAddress>
  <instanceLifecycle>spot</instanceLifecycle>
  <tagSet>
    <item><key>nix-builder-autoscaler:cluster</key><value>ci</value></item>
    <item><key>nix-builder-autoscaler:pool</key><value>x86</value></item>
    <item><key>nix-builder-autoscaler:slot</key><value>slot1</value></item>
  </tagSet>
</item>`

func (s *throttlingEC2) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	action := r.PostForm.Get("Action")
	s.mu.Lock()
	if s.requests == nil {
		s.requests = map[string][]http.Header{}
	}
	s.requests[action] = append(s.requests[action], r.Header.Clone())
	n := len(s.requests[action])
	if action == "RunInstances" {
		s.tokens = append(s.tokens, r.PostForm.Get("ClientToken"))
	}
	s.mu.Unlock()
	w.Header().Set("Content-Type", "text/xml;charset=UTF-8")
	if n <= s.throttle {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>req-throttled</RequestID></Response>`)
		return
	}
	switch action {
	case "RunInstances":
		fmt.Fprintf(w, `<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<requestId>req-ok</requestId><reservationId>r-0abc</reservationId><ownerId>123456789012</ownerId>
<instancesSet>`+instanceXML+`</instancesSet></RunInstancesResponse>`, 0, "pending")
	case "DescribeInstances":
		fmt.Fprintf(w, `<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<requestId>req-ok</requestId><reservationSet><item><reservationId>r-0abc</reservationId>
<instancesSet>`+instanceXML+`</instancesSet></item></reservationSet></DescribeInstancesResponse>`, 16, "running")
	default:
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `<Response><Errors><Error><Code>InvalidAction</Code><Message>%s</Message></Error></Errors></Response>`, action)
	}
}

// fastRetry keeps the SDK's retry logic but waits only milliseconds.
func fastRetry(o *retry.StandardOptions) {
	o.Backoff = retry.BackoffDelayerFunc(func(int, error) (time.Duration, error) { return 5 * time.Millisecond, nil })
}

func TestThrottlingRetriedBySDKWithoutLosingTheLaunch(t *testing.T) {
	srv := &throttlingEC2{throttle: 2}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	ctx := context.Background()
	client, err := newClient(ctx, "us-east-1", hs.URL, fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	p, err := New(client, Options{Cluster: "ci", Pools: map[string]PoolOptions{"x86": spotPool()}, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	var slept []time.Duration
	b := newBucket(1, 0.001)
	b.sleep = func(_ context.Context, d time.Duration) error { slept = append(slept, d); return nil }
	p.limits[opRun] = b

	in, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "L1"})
	if err != nil {
		t.Fatalf("Launch through two throttles: %v", err)
	}
	if in.ID != "i-0123456789abcdef0" || in.Zone != "us-east-1b" || in.Market != MarketSpot || in.State != scaler.InstancePending ||
		in.PrivateIP != "10.0.0.5" || !in.LaunchedAt.Equal(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)) {
		t.Errorf("Launch = %+v", in)
	}
	if len(srv.tokens) != 3 || srv.tokens[0] == "" || srv.tokens[1] != srv.tokens[0] || srv.tokens[2] != srv.tokens[0] {
		t.Errorf("RunInstances client tokens = %q, want 3 requests with one token (SDK retries of one attempt are idempotent)", srv.tokens)
	}
	// Every HTTP attempt went through the client-side rate limit.
	if len(slept) != 2 {
		t.Errorf("rate-limit waits = %v, want 2 (burst 1, three attempts)", slept)
	}
	env := &env{reg: reg}
	if v := env.counter(t, "ec2_throttles_total", map[string]string{"op": "RunInstances"}); v != 2 {
		t.Errorf("throttles = %v, want 2", v)
	}
	if v := env.counter(t, "ec2_launch_attempts_total", map[string]string{"pool": "x86", "market": "spot", "type": "m7i.xlarge", "result": "ok"}); v != 1 {
		t.Errorf("ok attempts = %v, want 1", v)
	}
	// The SDK numbers its attempts; the retries are the same operation.
	if h := srv.requests["RunInstances"]; len(h) != 3 || h[2].Get("Amz-Sdk-Request") != "attempt=3; max=8" {
		t.Errorf("third request's amz-sdk-request = %q", h[len(h)-1].Get("Amz-Sdk-Request"))
	}

	ins, err := p.List(ctx)
	if err != nil {
		t.Fatalf("List through two throttles: %v", err)
	}
	if len(ins) != 1 || ins[0].State != scaler.InstanceRunning || ins[0].Slot != "slot1" {
		t.Errorf("List = %+v", ins)
	}
	if v := env.counter(t, "ec2_throttles_total", map[string]string{"op": "DescribeInstances"}); v != 2 {
		t.Errorf("describe throttles = %v, want 2", v)
	}
}

func TestThrottlingBeyondRetriesIsErrThrottled(t *testing.T) {
	srv := &throttlingEC2{throttle: 100}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	ctx := context.Background()
	client, err := newClient(ctx, "us-east-1", hs.URL, fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(client, Options{Cluster: "ci", Pools: map[string]PoolOptions{"x86": spotPool()}})
	if err != nil {
		t.Fatal(err)
	}
	p.limits = nil
	_, err = p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1"})
	if !errors.Is(err, ErrThrottled) {
		t.Fatalf("Launch = %v, want ErrThrottled", err)
	}
	if n := len(srv.requests["RunInstances"]); n != maxAttempts {
		t.Errorf("RunInstances requests = %d, want %d (one attempt, retried by the SDK)", n, maxAttempts)
	}
}

func TestNewClientNeedsRegion(t *testing.T) {
	t.Setenv("AWS_REGION", "")
	t.Setenv("AWS_DEFAULT_REGION", "")
	t.Setenv("AWS_CONFIG_FILE", "/nonexistent")
	t.Setenv("AWS_PROFILE", "")
	if _, err := NewClient(context.Background(), "", "http://127.0.0.1:1"); err == nil {
		t.Error("NewClient without a region succeeded")
	}
}

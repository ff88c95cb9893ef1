package ec2test

// A moto_server (https://github.com/getmoto/moto, 5.x) on loopback for
// integration tests through the real AWS SDK: the provider's own tests and
// the daemon's share this one harness.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"runtime"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// MotoAMI is one of the images moto ships (moto accepts any image id, but
// this one exists, and it passes the daemon's ami-… check).
const MotoAMI = "ami-03cf127a"

// MotoRegion is the region the raw client of a Moto uses.
const MotoRegion = "us-east-1"

// Moto is a moto_server on 127.0.0.1. One server serves the whole test
// binary: StartMoto starts it on first use and resets its state on every
// call, so tests that use it must not run in parallel with each other.
type Moto struct {
	// Endpoint is the server's URL, for an EC2 client's BaseEndpoint (or a
	// pool's [pool.ec2] endpoint).
	Endpoint string
	// Client is a plain SDK client of the server (region MotoRegion, dummy
	// credentials), for calls around the code under test.
	Client *ec2.Client
}

// Subnet is one of moto's default subnets.
type Subnet struct {
	ID, Zone string
}

var moto struct {
	mu      sync.Mutex
	started bool
	m       *Moto
	err     error
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the process has been waited for
	waitErr error
	out     *tailBuffer
}

// StartMoto returns the test binary's moto_server, started on first use,
// with its state reset (no instances; moto's default VPC and subnets). A
// test fails with a clear message when moto_server is not on PATH or does
// not start.
//
// The server is stopped by StopMoto (call it from TestMain after m.Run), and
// in any case when the test binary exits, however it exits: it is started
// with a parent-death signal from a thread that lives until the server is
// gone, so a test binary killed by its timeout leaves no moto_server behind.
func StartMoto(tb testing.TB) *Moto {
	tb.Helper()
	moto.mu.Lock()
	if !moto.started {
		moto.started = true
		moto.m, moto.err = startMoto()
	}
	m, err := moto.m, moto.err
	moto.mu.Unlock()
	if err != nil {
		tb.Fatalf("these EC2 integration tests need moto_server (moto 5.x, `pip install 'moto[server]'`) on PATH; the tests start it on 127.0.0.1 themselves: %v", err)
	}
	m.Reset(tb)
	return m
}

// Reset empties the server (POST /moto-api/reset).
func (m *Moto) Reset(tb testing.TB) {
	tb.Helper()
	resp, err := http.Post(m.Endpoint+"/moto-api/reset", "application/json", nil)
	if err != nil {
		tb.Fatalf("reset moto_server: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		tb.Fatalf("reset moto_server: %s", resp.Status)
	}
}

// StopMoto stops the moto_server StartMoto started, if any: SIGTERM to its
// process group, SIGKILL after 5 s. Later StartMoto calls fail.
func StopMoto() {
	moto.mu.Lock()
	defer moto.mu.Unlock()
	if moto.cmd == nil {
		moto.started = true
		moto.err = errors.New("moto_server was stopped (StopMoto)")
		return
	}
	pgid := moto.cmd.Process.Pid // its own process group (Setpgid)
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-moto.exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-moto.exited
	}
	moto.cmd, moto.m = nil, nil
	moto.err = errors.New("moto_server was stopped (StopMoto)")
}

func startMoto() (*Moto, error) {
	bin, err := exec.LookPath("moto_server")
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	out := &tailBuffer{max: 64 << 10}
	cmd := exec.Command(bin, "-H", "127.0.0.1", "-p", fmt.Sprint(port))
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group (StopMoto ends the group), and SIGKILL when the
	// thread that started it ends: that thread is locked to the goroutine
	// below until the server has exited, so the signal comes only when the
	// test binary itself goes away.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	exited := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		// Never unlocked: when this goroutine returns, its thread ends
		// with it, which is harmless once the server is gone.
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		moto.waitErr = cmd.Wait()
		close(exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	moto.cmd, moto.exited, moto.out = cmd, exited, out
	m := &Moto{Endpoint: fmt.Sprintf("http://127.0.0.1:%d", port)}
	m.Client = ec2.New(ec2.Options{
		Region:       MotoRegion,
		BaseEndpoint: aws.String(m.Endpoint),
		Credentials:  aws.NewCredentialsCache(credentials.NewStaticCredentialsProvider("testing", "testing", "")),
	})
	// Python's start-up on a busy machine is slow; the bound is only a hang
	// guard.
	const bound = 2 * time.Minute
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			moto.cmd = nil
			return nil, fmt.Errorf("moto_server exited (%v): %s", moto.waitErr, out.String())
		case <-time.After(50 * time.Millisecond):
		}
		resp, err := http.Get(m.Endpoint + "/moto-api/")
		if err == nil {
			resp.Body.Close()
			return m, nil
		}
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-exited
	moto.cmd = nil
	return nil, fmt.Errorf("moto_server did not answer on %s within %v; its output: %s", m.Endpoint, bound, out.String())
}

// DefaultSubnets returns moto's default subnets (one per zone of
// MotoRegion), ordered by zone. It fails the test when there are fewer
// than two.
func (m *Moto) DefaultSubnets(tb testing.TB) []Subnet {
	tb.Helper()
	out, err := m.Client.DescribeSubnets(context.Background(), &ec2.DescribeSubnetsInput{
		Filters: []types.Filter{{Name: aws.String("default-for-az"), Values: []string{"true"}}},
	})
	if err != nil {
		tb.Fatalf("describe moto's default subnets: %v", err)
	}
	var subnets []Subnet
	for _, s := range out.Subnets {
		subnets = append(subnets, Subnet{ID: aws.ToString(s.SubnetId), Zone: aws.ToString(s.AvailabilityZone)})
	}
	sort.Slice(subnets, func(i, j int) bool { return subnets[i].Zone < subnets[j].Zone })
	if len(subnets) < 2 {
		tb.Fatalf("moto has %d default subnets, want at least 2", len(subnets))
	}
	return subnets
}

// RunInstance launches one t3.micro of MotoAMI in subnet directly (around
// any provider), tagged with tags (none if empty), and returns its id.
func (m *Moto) RunInstance(tb testing.TB, subnet string, tags map[string]string) string {
	tb.Helper()
	in := &ec2.RunInstancesInput{
		MinCount: aws.Int32(1), MaxCount: aws.Int32(1), ImageId: aws.String(MotoAMI),
		InstanceType: types.InstanceTypeT3Micro, SubnetId: aws.String(subnet),
	}
	if len(tags) > 0 {
		spec := types.TagSpecification{ResourceType: types.ResourceTypeInstance}
		keys := make([]string, 0, len(tags))
		for k := range tags {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			spec.Tags = append(spec.Tags, types.Tag{Key: aws.String(k), Value: aws.String(tags[k])})
		}
		in.TagSpecifications = []types.TagSpecification{spec}
	}
	out, err := m.Client.RunInstances(context.Background(), in)
	if err != nil {
		tb.Fatalf("RunInstances in moto: %v", err)
	}
	return aws.ToString(out.Instances[0].InstanceId)
}

// Describe reads one instance.
func (m *Moto) Describe(tb testing.TB, id string) types.Instance {
	tb.Helper()
	out, err := m.Client.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{InstanceIds: []string{id}})
	if err != nil || len(out.Reservations) != 1 || len(out.Reservations[0].Instances) != 1 {
		tb.Fatalf("describe %s in moto: %v %+v", id, err, out)
	}
	return out.Reservations[0].Instances[0]
}

// Instances lists every instance matching filters (all of them without),
// in any state, in launch order.
func (m *Moto) Instances(tb testing.TB, filters ...types.Filter) []types.Instance {
	tb.Helper()
	pages := ec2.NewDescribeInstancesPaginator(m.Client, &ec2.DescribeInstancesInput{Filters: filters})
	var all []types.Instance
	for pages.HasMorePages() {
		page, err := pages.NextPage(context.Background())
		if err != nil {
			tb.Fatalf("describe instances in moto: %v", err)
		}
		for _, r := range page.Reservations {
			all = append(all, r.Instances...)
		}
	}
	sort.SliceStable(all, func(i, j int) bool {
		return aws.ToTime(all[i].LaunchTime).Before(aws.ToTime(all[j].LaunchTime))
	})
	return all
}

// State is an instance's state name ("" if it has none).
func State(in types.Instance) types.InstanceStateName {
	if in.State == nil {
		return ""
	}
	return in.State.Name
}

// Tags returns an instance's (or volume's) tags as a map.
func Tags(tags []types.Tag) map[string]string {
	m := make(map[string]string, len(tags))
	for _, t := range tags {
		m[aws.ToString(t.Key)] = aws.ToString(t.Value)
	}
	return m
}

// tailBuffer keeps the last max bytes written to it: the server's output,
// shown when it fails to start.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = bytes.Clone(t.b[over:])
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

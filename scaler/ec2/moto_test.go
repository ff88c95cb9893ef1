package ec2

// Integration tests against moto_server on loopback, through the real SDK
// client. moto_server is started once for the package (on a free loopback
// port), reset before each test, and stopped by its process group id when
// the tests end. Without moto_server on PATH these tests fail.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// motoAMI is one of the images moto ships (moto accepts any id, but this
// one exists).
const motoAMI = "ami-03cf127a"

var moto struct {
	once   sync.Once
	url    string
	cmd    *exec.Cmd
	exited chan error // cmd.Wait's result
	log    string
	err    error
}

func TestMain(m *testing.M) {
	code := m.Run()
	stopMoto()
	os.Exit(code)
}

// motoServer returns the URL of a freshly reset moto_server.
func motoServer(t *testing.T) string {
	t.Helper()
	moto.once.Do(startMoto)
	if moto.err != nil {
		t.Fatalf("these EC2 integration tests need moto_server (5.x) on PATH, started here on loopback: %v", moto.err)
	}
	resp, err := http.Post(moto.url+"/moto-api/reset", "application/json", nil)
	if err != nil {
		t.Fatalf("reset moto_server: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reset moto_server: %s", resp.Status)
	}
	return moto.url
}

func startMoto() {
	bin, err := exec.LookPath("moto_server")
	if err != nil {
		moto.err = err
		return
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		moto.err = err
		return
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	logf, err := os.CreateTemp("", "moto-*.log")
	if err != nil {
		moto.err = err
		return
	}
	defer logf.Close()
	moto.log = logf.Name()
	cmd := exec.Command(bin, "-H", "127.0.0.1", "-p", fmt.Sprint(port))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		moto.err = fmt.Errorf("start %s: %w", bin, err)
		return
	}
	moto.cmd = cmd
	exited := make(chan error, 1)
	moto.exited = exited
	go func() { exited <- cmd.Wait() }()
	moto.url = fmt.Sprintf("http://127.0.0.1:%d", port)
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			out, _ := os.ReadFile(moto.log)
			moto.err = fmt.Errorf("moto_server exited (%v): %s", err, out)
			moto.cmd = nil
			os.Remove(moto.log)
			return
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := http.Get(moto.url + "/moto-api/")
		if err == nil {
			resp.Body.Close()
			return
		}
	}
	moto.err = fmt.Errorf("moto_server did not answer on %s within 60s (log %s)", moto.url, moto.log)
}

// stopMoto ends the moto_server this package started: SIGTERM to its
// process group, SIGKILL if it is still there after 5 s.
func stopMoto() {
	if moto.cmd == nil || moto.cmd.Process == nil {
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
	if moto.log != "" {
		os.Remove(moto.log)
	}
}

type motoEnv struct {
	client  *ec2.Client
	subnets []string // default subnets, by zone
	zones   map[string]string
}

func newMotoEnv(t *testing.T) *motoEnv {
	t.Helper()
	url := motoServer(t)
	ctx := context.Background()
	c, err := newClient(ctx, "us-east-1", url, fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{
		Filters: []types.Filter{{Name: aws.String("default-for-az"), Values: []string{"true"}}},
	})
	if err != nil {
		t.Fatalf("describe moto's default subnets: %v", err)
	}
	e := &motoEnv{client: c, zones: map[string]string{}}
	sort.Slice(out.Subnets, func(i, j int) bool {
		return aws.ToString(out.Subnets[i].AvailabilityZone) < aws.ToString(out.Subnets[j].AvailabilityZone)
	})
	for _, s := range out.Subnets {
		e.subnets = append(e.subnets, aws.ToString(s.SubnetId))
		e.zones[aws.ToString(s.SubnetId)] = aws.ToString(s.AvailabilityZone)
	}
	if len(e.subnets) < 2 {
		t.Fatalf("moto has %d default subnets, want at least 2", len(e.subnets))
	}
	return e
}

func (e *motoEnv) pools() map[string]PoolOptions {
	return map[string]PoolOptions{
		"x86": {
			AMI: motoAMI, InstanceTypes: []string{"m7i.xlarge", "m6i.xlarge"}, Subnets: e.subnets[:2],
			RootVolumeGB: 50, UserData: "#!/bin/sh\necho {{.Slot}}\n",
		},
		"kvm": {
			AMI: motoAMI, InstanceTypes: []string{"c8i.2xlarge"}, Subnets: e.subnets[:1], NestedVirtualization: true,
		},
	}
}

func (e *motoEnv) provider(t *testing.T) *Provider {
	t.Helper()
	p, err := New(e.client, Options{Cluster: "ci", Pools: e.pools(), Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// describe reads one instance directly.
func (e *motoEnv) describe(t *testing.T, id string) types.Instance {
	t.Helper()
	out, err := e.client.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{InstanceIds: []string{id}})
	if err != nil || len(out.Reservations) != 1 || len(out.Reservations[0].Instances) != 1 {
		t.Fatalf("describe %s: %v %+v", id, err, out)
	}
	return out.Reservations[0].Instances[0]
}

// runDirect launches an instance around the provider, with the tags given.
func (e *motoEnv) runDirect(t *testing.T, tags map[string]string) string {
	t.Helper()
	in := &ec2.RunInstancesInput{
		MinCount: aws.Int32(1), MaxCount: aws.Int32(1), ImageId: aws.String(motoAMI),
		InstanceType: "t3.micro", SubnetId: aws.String(e.subnets[0]),
	}
	if len(tags) > 0 {
		spec := types.TagSpecification{ResourceType: types.ResourceTypeInstance}
		for k, v := range tags {
			spec.Tags = append(spec.Tags, types.Tag{Key: aws.String(k), Value: aws.String(v)})
		}
		in.TagSpecifications = []types.TagSpecification{spec}
	}
	out, err := e.client.RunInstances(context.Background(), in)
	if err != nil {
		t.Fatal(err)
	}
	return aws.ToString(out.Instances[0].InstanceId)
}

func listIDs(t *testing.T, p *Provider) map[string]scaler.Instance {
	t.Helper()
	ins, err := p.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	m := map[string]scaler.Instance{}
	for _, in := range ins {
		m[in.ID] = in
	}
	if len(m) != len(ins) {
		t.Errorf("List returned duplicates: %+v", ins)
	}
	return m
}

func TestMotoLaunchListRestartTerminate(t *testing.T) {
	e := newMotoEnv(t)
	ctx := context.Background()
	untagged := e.runDirect(t, nil)
	foreign := e.runDirect(t, map[string]string{TagCluster: "other", TagPool: "x86", TagSlot: "slot1"})

	p := e.provider(t)
	spot, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "L1"})
	if err != nil {
		t.Fatalf("Launch spot: %v", err)
	}
	if spot.Market != MarketSpot || spot.Type != "m7i.xlarge" || spot.Zone != e.zones[e.subnets[0]] || spot.PrivateIP == "" ||
		spot.Pool != "x86" || spot.Slot != "slot1" || spot.LaunchID != "L1" || spot.LaunchedAt.IsZero() {
		t.Errorf("Launch = %+v", spot)
	}
	od, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "kvm", Slot: "slot1", LaunchID: "L2"})
	if err != nil {
		t.Fatalf("Launch on-demand: %v", err)
	}
	if od.Market != MarketOnDemand {
		t.Errorf("nested-virtualization pool launched %s", od.Market)
	}

	// What EC2 (moto) holds: tags on instance and volume, IMDSv2, Spot.
	raw := e.describe(t, spot.ID)
	want := map[string]string{TagCluster: "ci", TagPool: "x86", TagSlot: "slot1", TagLaunchID: "L1", TagName: "ci-x86-slot1"}
	if got := tagMap(raw.Tags); !maps.Equal(got, want) {
		t.Errorf("instance tags = %v, want %v", got, want)
	}
	if raw.MetadataOptions == nil || raw.MetadataOptions.HttpTokens != types.HttpTokensStateRequired {
		t.Errorf("MetadataOptions = %+v, want HttpTokens required", raw.MetadataOptions)
	}
	if raw.InstanceLifecycle != types.InstanceLifecycleTypeSpot {
		t.Errorf("InstanceLifecycle = %q, want spot", raw.InstanceLifecycle)
	}
	vols, err := e.client.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{
		Filters: []types.Filter{{Name: aws.String("attachment.instance-id"), Values: []string{spot.ID}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	tagged := 0
	for _, v := range vols.Volumes {
		if maps.Equal(tagMap(v.Tags), want) && aws.ToInt32(v.Size) == 50 {
			tagged++
		}
	}
	if tagged != 1 {
		t.Errorf("volumes of %s: %d tagged with size 50, want 1 (%+v)", spot.ID, tagged, vols.Volumes)
	}

	got := listIDs(t, p)
	if len(got) != 2 || got[spot.ID].Slot != "slot1" || got[spot.ID].LaunchID != "L1" || got[spot.ID].Market != MarketSpot ||
		got[od.ID].Pool != "kvm" || got[od.ID].Market != MarketOnDemand || got[spot.ID].State.Gone() {
		t.Errorf("List = %+v, want the two launched instances", got)
	}

	// A restarted daemon (a new Provider) finds them by tag alone.
	p2 := e.provider(t)
	got2 := listIDs(t, p2)
	if !slices.Equal(sortedKeys(got2), sortedKeys(got)) || got2[spot.ID].Zone != spot.Zone || got2[spot.ID].PrivateIP != spot.PrivateIP {
		t.Errorf("List after restart = %+v, want %+v", got2, got)
	}

	// Terminate leaves other people's instances alone.
	for _, id := range []string{untagged, foreign} {
		if err := p2.Terminate(ctx, id); !errors.Is(err, ErrNotOwned) {
			t.Errorf("Terminate(%s) = %v, want ErrNotOwned", id, err)
		}
	}
	if err := p2.Terminate(ctx, spot.ID); err != nil {
		t.Fatalf("Terminate: %v", err)
	}
	if err := p2.Terminate(ctx, spot.ID); err != nil {
		t.Errorf("second Terminate: %v", err)
	}
	if err := p2.Terminate(ctx, "i-0123456789abcdef0"); err != nil {
		t.Errorf("Terminate of an unknown instance: %v", err)
	}
	got2 = listIDs(t, p2)
	if in := got2[spot.ID]; in.State != scaler.InstanceTerminated || in.StateReason != "Client.UserInitiatedShutdown" {
		t.Errorf("after Terminate: %+v", in)
	}
	if in := got2[od.ID]; in.State != scaler.InstanceRunning {
		t.Errorf("the other builder is %s", in.State)
	}
	for _, id := range []string{untagged, foreign} {
		if _, listed := got2[id]; listed {
			t.Errorf("%s (not ours) was listed", id)
		}
		if s := e.describe(t, id).State.Name; s != types.InstanceStateNameRunning {
			t.Errorf("%s (not ours) is %s", id, s)
		}
	}
}

func TestMotoListPaginates(t *testing.T) {
	e := newMotoEnv(t)
	p := e.provider(t)
	p.pageSize = 5
	ctx := context.Background()
	var want []string
	for i := range 7 {
		in, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: fmt.Sprintf("slot%d", i+1)})
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, in.ID)
	}
	e.runDirect(t, nil)
	slices.Sort(want)
	if got := sortedKeys(listIDs(t, p)); !slices.Equal(got, want) {
		t.Errorf("List = %v, want %v", got, want)
	}
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

package ec2

// Integration tests against moto_server on loopback, through the real SDK
// client. ec2test.StartMoto starts moto_server once for the package (on a
// free loopback port) and resets it before each test; TestMain stops it.
// Without moto_server on PATH these tests fail.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// motoAMI is one of the images moto ships.
const motoAMI = ec2test.MotoAMI

// TestMain stops the moto_server that ec2test.StartMoto started.
func TestMain(m *testing.M) {
	code := m.Run()
	ec2test.StopMoto()
	os.Exit(code)
}

type motoEnv struct {
	moto    *ec2test.Moto
	client  *ec2.Client // the provider's client (NewClient's settings)
	subnets []string    // default subnets, by zone
	zones   map[string]string
}

func newMotoEnv(t *testing.T) *motoEnv {
	t.Helper()
	m := ec2test.StartMoto(t)
	c, err := newClient(context.Background(), ec2test.MotoRegion, m.Endpoint, fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	e := &motoEnv{moto: m, client: c, zones: map[string]string{}}
	for _, s := range m.DefaultSubnets(t) {
		e.subnets = append(e.subnets, s.ID)
		e.zones[s.ID] = s.Zone
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
	return e.moto.Describe(t, id)
}

// runDirect launches an instance around the provider, with the tags given.
func (e *motoEnv) runDirect(t *testing.T, tags map[string]string) string {
	t.Helper()
	return e.moto.RunInstance(t, e.subnets[0], tags)
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

// TestMotoSpotRequestsPoll: the poll's DescribeSpotInstanceRequests (its
// instance-id and status-code filters) is a request moto accepts, and a
// Spot builder nobody marked gets no notice. moto 5.2 neither records a
// Spot request for a Spot RunInstances nor marks one for termination; the
// fake tests the marked case (TestNoticesPollMarkedForTermination).
func TestMotoSpotRequestsPoll(t *testing.T) {
	e := newMotoEnv(t)
	ctx := context.Background()
	p := e.provider(t)
	spot, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "L1"})
	if err != nil {
		t.Fatalf("Launch spot: %v", err)
	}
	ins, err := p.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := p.Notices(ctx, ins)
	if err != nil {
		t.Fatalf("Notices: %v", err)
	}
	if len(got) != 0 {
		t.Errorf("notices = %v for a fulfilled Spot builder %s, want none", got, spot.ID)
	}
}

package preflight

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	iamtypes "github.com/aws/aws-sdk-go-v2/service/iam/types"
	"github.com/aws/aws-sdk-go-v2/service/sts"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery/discoverytest"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

type fakeSTS struct{ err error }

func (f fakeSTS) GetCallerIdentity(context.Context, *sts.GetCallerIdentityInput, ...func(*sts.Options)) (*sts.GetCallerIdentityOutput, error) {
	if f.err != nil {
		return nil, f.err
	}
	return &sts.GetCallerIdentityOutput{Account: aws.String("123456789012"), Arn: aws.String("arn:aws:iam::123456789012:role/nba")}, nil
}

type fakeIAM struct{ err error }

func (f fakeIAM) GetRole(_ context.Context, in *iam.GetRoleInput, _ ...func(*iam.Options)) (*iam.GetRoleOutput, error) {
	if f.err != nil {
		return nil, f.err
	}
	return &iam.GetRoleOutput{Role: &iamtypes.Role{Arn: aws.String("arn:aws:iam::123456789012:role/aws-service-role/spot.amazonaws.com/" + *in.RoleName)}}, nil
}

const (
	goodAMI = "ami-0123456789abcdef0"
	subnetA = "subnet-a"
	subnetB = "subnet-b"
)

// fakeRegion is a region of one Spot pool (two types, two subnets in two
// zones) over the fake EC2, where everything passes until a test changes
// the fake.
func fakeRegion(t *testing.T) (*ec2test.Fake, EC2Region) {
	t.Helper()
	f := ec2test.New()
	f.Zones = map[string]string{subnetA: "us-east-1a", subnetB: "us-east-1b"}
	f.Images = []string{goodAMI}
	opts := ec2prov.PoolOptions{AMI: goodAMI, InstanceTypes: []string{"m7i.xlarge", "m6i.xlarge"}, Subnets: []string{subnetA, subnetB},
		UserData: "#!/bin/sh\necho {{.Slot}}\n"}
	prov, err := ec2prov.New(f, ec2prov.Options{Cluster: "ci", Pools: map[string]ec2prov.PoolOptions{"x86": opts}})
	if err != nil {
		t.Fatal(err)
	}
	return f, EC2Region{Region: "us-east-1", Pools: []EC2Pool{{Name: "x86", Options: opts}},
		EC2: f, Launcher: prov, STS: fakeSTS{}, IAM: fakeIAM{}}
}

func run(r EC2Region) Report { return Run(context.Background(), EC2Checks(r)) }

// lines are the report's lines of one check as "RESULT detail".
func lines(r Report, check string) []string {
	var out []string
	for _, l := range r.Results {
		if l.Check == check {
			out = append(out, string(l.Status)+" "+l.Detail)
		}
	}
	return out
}

func wantLine(t *testing.T, r Report, check string, status Status, substr ...string) {
	t.Helper()
	for _, l := range lines(r, check) {
		if !strings.HasPrefix(l, string(status)+" ") {
			continue
		}
		ok := true
		for _, s := range substr {
			ok = ok && strings.Contains(l, s)
		}
		if ok {
			return
		}
	}
	var b bytes.Buffer
	_ = r.WriteTable(&b)
	t.Fatalf("no %s line of %s containing %q in:\n%s", status, check, substr, b.String())
}

func TestFakeAllPass(t *testing.T) {
	f, r := fakeRegion(t)
	rep := run(r)
	if !rep.OK() {
		var b bytes.Buffer
		_ = rep.WriteTable(&b)
		t.Fatalf("want every check to pass:\n%s", b.String())
	}
	for _, c := range []string{CheckCredentials, CheckSubnets, CheckOfferings, CheckAMI, CheckLaunch, CheckTagOnLaunch, CheckSpotRole} {
		wantLine(t, rep, c, Pass)
	}
	if n := len(lines(rep, CheckLaunch)); n != 4 {
		t.Errorf("%d launch lines, want one per type and subnet (4)", n)
	}
	// The dry runs are the daemon's own request, DryRun set, nothing launched.
	for _, in := range f.RunInputs() {
		if !aws.ToBool(in.DryRun) || in.InstanceMarketOptions == nil || len(in.TagSpecifications) != 2 || in.UserData == nil {
			t.Errorf("dry run input %+v is not the launch request with DryRun", in)
		}
	}
	if len(f.Instances()) != 0 {
		t.Errorf("preflight launched %d instances", len(f.Instances()))
	}
}

func TestFakeLaunchUnauthorized(t *testing.T) {
	f, r := fakeRegion(t)
	f.RunHook = func(*ec2.RunInstancesInput) error { return ec2test.Unauthorized() }
	rep := run(r)
	if rep.OK() {
		t.Fatal("report OK with RunInstances unauthorized")
	}
	wantLine(t, rep, CheckLaunch, Fail, "UnauthorizedOperation", "ec2:RunInstances", "iam:PassRole")
	wantLine(t, rep, CheckTagOnLaunch, Skip, "refused even without tags")
}

func TestFakeTaggingUnauthorized(t *testing.T) {
	f, r := fakeRegion(t)
	f.RunHook = func(in *ec2.RunInstancesInput) error {
		if len(in.TagSpecifications) > 0 {
			return ec2test.Unauthorized()
		}
		return nil
	}
	rep := run(r)
	wantLine(t, rep, CheckTagOnLaunch, Fail, "ec2:CreateTags", "ec2:CreateAction = RunInstances")
	if rep.OK() {
		t.Fatal("report OK with tagging unauthorized")
	}
}

func TestFakeMissingAMI(t *testing.T) {
	f, r := fakeRegion(t)
	f.Images = []string{"ami-somethingelse"}
	rep := run(r)
	wantLine(t, rep, CheckAMI, Fail, "InvalidAMIID.NotFound", "fix [pool.ec2] ami")
	wantLine(t, rep, CheckLaunch, Fail, "InvalidAMIID.NotFound", "fix [pool.ec2] ami")
	if rep.OK() {
		t.Fatal("report OK with a missing AMI")
	}
}

func TestFakeTypeNotOffered(t *testing.T) {
	f, r := fakeRegion(t)
	f.NotOffered("m6i.xlarge", "us-east-1b")
	rep := run(r)
	wantLine(t, rep, CheckOfferings, Fail, "m6i.xlarge is not offered in us-east-1b (subnet-b)", "instance_types")
	wantLine(t, rep, CheckOfferings, Pass, "m7i.xlarge")
	wantLine(t, rep, CheckLaunch, Skip, "m6i.xlarge in subnet-b")
	wantLine(t, rep, CheckLaunch, Pass, "m6i.xlarge in subnet-a")
	if rep.OK() {
		t.Fatal("report OK with a type not offered")
	}
}

func TestFakeDescribeDenied(t *testing.T) {
	f, r := fakeRegion(t)
	f.FailNext(ec2test.OpDescribeSubnets, 1, ec2test.Unauthorized())
	f.FailNext(ec2test.OpDescribeImages, 1, ec2test.Unauthorized())
	rep := run(r)
	wantLine(t, rep, CheckSubnets, Fail, "grant ec2:DescribeSubnets")
	wantLine(t, rep, CheckAMI, Fail, "grant ec2:DescribeImages")
	wantLine(t, rep, CheckLaunch, Pass) // launches are still dry-run
}

func TestFakeUnknownSubnet(t *testing.T) {
	f, r := fakeRegion(t)
	delete(f.Zones, subnetB)
	f.Zones["subnet-other"] = "us-east-1c"
	rep := run(r)
	wantLine(t, rep, CheckSubnets, Fail, "InvalidSubnetID.NotFound", "fix [pool.ec2] subnets")
}

func TestCredentialsFailSkipsTheRest(t *testing.T) {
	f, r := fakeRegion(t)
	r.STS = fakeSTS{err: ec2test.APIError("InvalidClientTokenId", "The security token included in the request is invalid.")}
	rep := run(r)
	wantLine(t, rep, CheckCredentials, Fail, "InvalidClientTokenId", "AWS rejected the credentials")
	if len(rep.Results) != 2 || rep.Results[1].Status != Skip {
		t.Fatalf("want the credentials line and one SKIP, got %+v", rep.Results)
	}
	if n := len(f.Calls()); n != 0 {
		t.Fatalf("%d EC2 calls after the credentials failed", n)
	}

	r = EC2Region{Pools: r.Pools, Err: ec2prov.ErrNoRegion}
	wantLine(t, run(r), CheckCredentials, Fail, "set [pool.ec2] region")
}

func TestSpotRole(t *testing.T) {
	_, r := fakeRegion(t)
	r.IAM = fakeIAM{err: ec2test.APIError("NoSuchEntity", "Role AWSServiceRoleForEC2Spot not found")}
	wantLine(t, run(r), CheckSpotRole, Fail, "create-service-linked-role --aws-service-name spot.amazonaws.com")
	r.IAM = fakeIAM{err: ec2test.APIError("AccessDenied", "not allowed")}
	rep := run(r)
	wantLine(t, rep, CheckSpotRole, Skip, "grant iam:GetRole")
	if !rep.OK() {
		t.Fatal("a Spot role that cannot be read must not fail the preflight")
	}
	// An on-demand pool needs no Spot role.
	r.Pools[0].Options.Market = ec2prov.MarketOnDemand
	if got := lines(run(r), CheckSpotRole); got != nil {
		t.Fatalf("spot-role lines %q for an on-demand pool", got)
	}
}

// serveRuntime answers every command on a unix socket like HAProxy's
// runtime API answers "show info".
func serveRuntime(t *testing.T) string {
	t.Helper()
	sock := discoverytest.ShortDir(t) + "/admin.sock"
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = bufio.NewReader(c).ReadString('\n')
			_, _ = c.Write([]byte("Name: HAProxy\nVersion: 3.0.5\nUptime_sec: 1\n\n"))
			c.Close()
		}
	}()
	return sock
}

func TestHAProxyCheck(t *testing.T) {
	sock := serveRuntime(t)
	rep := Run(context.Background(), []Check{HAProxyCheck(haproxy.NewClient(sock, 0))})
	wantLine(t, rep, CheckHAProxy, Pass, "HAProxy 3.0.5", sock)

	missing := discoverytest.ShortDir(t) + "/none.sock"
	rep = Run(context.Background(), []Check{HAProxyCheck(haproxy.NewClient(missing, 0))})
	wantLine(t, rep, CheckHAProxy, Fail, missing, "stats socket")
	if rep.OK() {
		t.Fatal("report OK without HAProxy")
	}
	wantLine(t, Run(context.Background(), []Check{HAProxyCheck(nil)}), CheckHAProxy, Skip, "not configured")
}

type fakeKey struct{ err error }

func (k fakeKey) CheckKey(context.Context) (int, error) { return 3, k.err }

func TestTailscaleChecks(t *testing.T) {
	api := discoverytest.Start(t, discoverytest.NewPeer("n1", "nix-builder-i-1", "100.64.0.1", true))
	ts := Tailscale{Pools: []string{"x86"}, LocalAPI: discovery.NewLocalAPI(api.Socket), Key: fakeKey{}}
	rep := Run(context.Background(), []Check{TailscaleChecks(ts)})
	wantLine(t, rep, CheckLocalAPI, Pass, "Running", "1 peers")
	wantLine(t, rep, CheckTailscaleKey, Pass, "3 devices")

	missing := discoverytest.ShortDir(t) + "/tailscaled.sock"
	ts = Tailscale{Pools: []string{"x86"}, LocalAPI: discovery.NewLocalAPI(missing), Key: fakeKey{err: errors.New("401 Unauthorized")}}
	rep = Run(context.Background(), []Check{TailscaleChecks(ts)})
	wantLine(t, rep, CheckLocalAPI, Fail, missing, "run tailscaled")
	wantLine(t, rep, CheckTailscaleKey, Fail, "401")

	ts = Tailscale{Pools: []string{"x86"}, LocalAPI: discovery.NewLocalAPI(api.Socket), KeyErr: errors.New("open /run/secrets/ts: permission denied")}
	wantLine(t, Run(context.Background(), []Check{TailscaleChecks(ts)}), CheckTailscaleKey, Fail, "fix tailscale.api_key_file")

	wantLine(t, Run(context.Background(), []Check{TailscaleChecks(Tailscale{})}), CheckLocalAPI, Skip, "not configured")
}

type fakeQueue struct {
	attrs map[string]string
	err   error
}

func (q fakeQueue) QueueAttributes(context.Context, string) (map[string]string, error) {
	return q.attrs, q.err
}

func TestQueueCheck(t *testing.T) {
	const url = "https://sqs.us-east-1.amazonaws.com/123456789012/spot-interruptions"
	check := func(q fakeQueue) Report { return Run(context.Background(), []Check{QueueCheck("x86", url, q)}) }
	wantLine(t, check(fakeQueue{attrs: map[string]string{"ApproximateNumberOfMessages": "0"}}), CheckQueue, Pass, url, "0 messages")
	wantLine(t, check(fakeQueue{err: ec2test.APIError("AWS.SimpleQueueService.NonExistentQueue", "The specified queue does not exist")}),
		CheckQueue, Fail, "fix [pool.ec2] interruption_queue")
	wantLine(t, check(fakeQueue{err: ec2test.APIError("AccessDenied", "no")}), CheckQueue, Fail, "grant sqs:GetQueueAttributes")
}

func TestReportOutput(t *testing.T) {
	rep := Report{Results: []Result{
		{Check: CheckCredentials, Pool: "x86", Status: Pass, Detail: "ok"},
		{Check: CheckHAProxy, Status: Skip, Detail: "multi\nline"},
	}}
	var b bytes.Buffer
	if err := rep.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	want := "CHECK           POOL  RESULT  DETAIL\ncredentials     x86   PASS    ok\nhaproxy-socket  -     SKIP    multi line\npreflight: 1 PASS, 0 FAIL, 1 SKIP: ready\n"
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	rep.Results = append(rep.Results, Result{Check: CheckAMI, Pool: "x86", Status: Fail, Detail: "gone"})
	if err := rep.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var doc struct {
		OK      bool
		Results []map[string]string
	}
	if err := json.Unmarshal(b.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	if doc.OK || len(doc.Results) != 3 || doc.Results[2]["result"] != "FAIL" || doc.Results[2]["pool"] != "x86" {
		t.Errorf("JSON %s", b.String())
	}
}

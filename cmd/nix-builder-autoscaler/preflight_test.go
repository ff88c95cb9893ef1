package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	"github.com/aws/aws-sdk-go-v2/service/sqs"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// preflightConfig is a config of one Spot pool on moto's default subnets
// and AMI; extra is appended to its [pool.ec2] table.
func preflightConfig(t *testing.T, m *ec2test.Moto, subnets []string, extra string) string {
	t.Helper()
	q := make([]string, len(subnets))
	for i, s := range subnets {
		q[i] = fmt.Sprintf("%q", s)
	}
	cfg := fmt.Sprintf(`[daemon]
cluster = "ci"

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
max_builders = 4
frontend = "127.0.0.1:2222"
provider = "ec2"

[pool.ec2]
region = %q
endpoint = %q
instance_types = ["m7i.xlarge"]
subnets = [%s]
discovery = "ec2-private-ip"
%s`, ec2test.MotoRegion, m.Endpoint, strings.Join(q, ", "), extra)
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// createSpotRole makes the Spot service-linked role in moto, under the
// name EC2 gives it (moto's CreateServiceLinkedRole names it otherwise).
func createSpotRole(t *testing.T, m *ec2test.Moto) {
	t.Helper()
	c := iam.New(iam.Options{Region: ec2test.MotoRegion, BaseEndpoint: aws.String(m.Endpoint),
		Credentials: credentials.NewStaticCredentialsProvider("testing", "testing", "")})
	_, err := c.CreateRole(context.Background(), &iam.CreateRoleInput{RoleName: aws.String("AWSServiceRoleForEC2Spot"),
		Path: aws.String("/aws-service-role/spot.amazonaws.com/"), AssumeRolePolicyDocument: aws.String(`{"Version":"2012-10-17","Statement":[]}`)})
	if err != nil {
		t.Fatal(err)
	}
}

func runPreflight(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(append([]string{"preflight"}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestPreflightMotoPasses(t *testing.T) {
	m := ec2test.StartMoto(t)
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	var subnets []string
	for _, s := range m.DefaultSubnets(t)[:2] {
		subnets = append(subnets, s.ID)
	}
	cfg := preflightConfig(t, m, subnets, fmt.Sprintf("ami = %q\n", ec2test.MotoAMI))
	createSpotRole(t, m)
	code, out, errOut := runPreflight(t, "--config", cfg)
	if code != 0 {
		t.Fatalf("preflight exit %d, want 0:\n%s%s", code, out, errOut)
	}
	for _, want := range []string{"credentials", "type-offered", "launch-dry-run", "DryRunOperation", "tag-on-launch", "spot-role", "preflight: 8 PASS, 0 FAIL, 2 SKIP: ready"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if n := len(m.Instances(t)); n != 0 {
		t.Errorf("preflight launched %d instances in moto", n)
	}
}

func TestPreflightMotoFails(t *testing.T) {
	m := ec2test.StartMoto(t)
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	// moto offers no m7i in us-east-1e; the AMI does not exist; no Spot role.
	var subnets []string
	for _, s := range m.DefaultSubnets(t) {
		if s.Zone == "us-east-1a" || s.Zone == "us-east-1e" {
			subnets = append(subnets, s.ID)
		}
	}
	cfg := preflightConfig(t, m, subnets, "ami = \"ami-0badc0ffee0000000\"\n")
	code, out, _ := runPreflight(t, "--config", cfg, "--json")
	if code != 1 {
		t.Fatalf("preflight exit %d, want 1:\n%s", code, out)
	}
	var doc struct {
		OK      bool `json:"ok"`
		Results []struct{ Check, Pool, Result, Detail string }
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("JSON: %v\n%s", err, out)
	}
	failed := map[string]string{}
	for _, r := range doc.Results {
		if r.Result == "FAIL" {
			failed[r.Check] = r.Detail
		}
	}
	if doc.OK || !strings.Contains(failed["type-offered"], "us-east-1e") || !strings.Contains(failed["ami"], "InvalidAMIID.NotFound") ||
		!strings.Contains(failed["spot-role"], "create-service-linked-role") {
		t.Fatalf("want FAIL lines for the type in us-east-1e, the AMI and the Spot role:\n%s", out)
	}
}

func TestPreflightUsageAndConfigErrors(t *testing.T) {
	if code, _, errOut := runPreflight(t, "--config", filepath.Join(t.TempDir(), "none.toml")); code != 2 || errOut == "" {
		t.Errorf("missing config: exit %d, stderr %q; want 2 and the error", code, errOut)
	}
	if code, _, _ := runPreflight(t, "--nope"); code != 2 {
		t.Errorf("bad flag: exit %d, want 2", code)
	}
	if code, out, _ := runPreflight(t, "--help"); code != 0 || !strings.Contains(out, "DryRun") {
		t.Errorf("--help: exit %d, %q", code, out)
	}
}

// TestPreflightMotoQueue: a pool's interruption queue is checked with the
// daemon's SQS client: one that exists passes, a wrong URL fails naming
// the setting.
func TestPreflightMotoQueue(t *testing.T) {
	m := ec2test.StartMoto(t)
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	var subnets []string
	for _, s := range m.DefaultSubnets(t)[:1] {
		subnets = append(subnets, s.ID)
	}
	createSpotRole(t, m)
	c := sqs.New(sqs.Options{Region: ec2test.MotoRegion, BaseEndpoint: aws.String(m.Endpoint),
		Credentials: credentials.NewStaticCredentialsProvider("testing", "testing", "")})
	cq, err := c.CreateQueue(context.Background(), &sqs.CreateQueueInput{QueueName: aws.String("nix-builders-interruptions")})
	if err != nil {
		t.Fatal(err)
	}
	url := aws.ToString(cq.QueueUrl)
	for _, tc := range []struct {
		url, want string
		code      int
	}{
		{url, "interruption-queue  x86   PASS", 0},
		{strings.Replace(url, "nix-builders-interruptions", "no-such-queue", 1), "fix [pool.ec2] interruption_queue", 1},
	} {
		cfg := preflightConfig(t, m, subnets, fmt.Sprintf("ami = %q\ninterruption_queue = %q\n", ec2test.MotoAMI, tc.url))
		code, out, errOut := runPreflight(t, "--config", cfg)
		if code != tc.code || !strings.Contains(out, tc.want) {
			t.Errorf("queue %s: exit %d, want %d with %q:\n%s%s", tc.url, code, tc.code, tc.want, out, errOut)
		}
	}
}

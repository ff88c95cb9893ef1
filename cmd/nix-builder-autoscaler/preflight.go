package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/preflight"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
)

const preflightUsage = `usage: nix-builder-autoscaler preflight [--config FILE] [--json] [--timeout D]

Checks, with read-only and DryRun calls only, that what the config file
relies on answers as the daemon needs: AWS credentials and region; per EC2
pool its subnets, its instance types' offerings in their zones, its AMI, a
DryRun RunInstances of every offering (the daemon's own request: IAM,
launch template, AMI, tags at launch) and the Spot service-linked role;
tailscaled's LocalAPI and the Tailscale API key; HAProxy's runtime socket.
Prints one line per check, naming the fix of each failure.

  -c, --config FILE  the daemon's config file
                     (default /etc/nix-builder-autoscaler/config.toml)
  --json             print {"ok", "results": [{"check","pool","result","detail"}]}
  --timeout D        give up on the checks after D (default 2m)

Exit codes: 0 every check passed (or does not apply), 1 a check failed,
2 usage error or a config file that cannot be read.
`

func preflightCmd(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("preflight", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	path := fs.StringP("config", "c", "/etc/nix-builder-autoscaler/config.toml", "config file")
	asJSON := fs.Bool("json", false, "print JSON")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, preflightUsage)
			return 0
		}
		fmt.Fprintf(stderr, "nix-builder-autoscaler preflight: %v\n\n%s", err, preflightUsage)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "nix-builder-autoscaler preflight: unexpected argument %q\n\n%s", fs.Arg(0), preflightUsage)
		return 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		var ps config.Problems
		if errors.As(err, &ps) {
			printConfigError(stderr, *path, err)
		} else {
			fmt.Fprintf(stderr, "nix-builder-autoscaler preflight: %v\n", err)
		}
		return 2
	}
	ctx, stop := signalContext()
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	report := preflight.Run(ctx, preflightChecks(ctx, cfg))
	if *asJSON {
		err = report.WriteJSON(stdout)
	} else {
		err = report.WriteTable(stdout)
	}
	if err != nil {
		fmt.Fprintf(stderr, "nix-builder-autoscaler preflight: %v\n", err)
		return 1
	}
	if !report.OK() {
		return 1
	}
	return 0
}

// preflightChecks lists the checks of cfg: the EC2 pools' per region (and
// endpoint, as the daemon groups them), then Tailscale and HAProxy. A
// pool's interruption queue check, once the config has the queue, joins
// this list (preflight.QueueCheck).
func preflightChecks(ctx context.Context, cfg *config.Config) []preflight.Check {
	type regionKey struct{ region, endpoint string }
	groups := map[regionKey][]config.Pool{}
	var order []regionKey
	var tsPools []string
	for _, p := range cfg.Pools {
		if p.Provider != config.ProviderEC2 {
			continue
		}
		k := regionKey{p.EC2.Region, p.EC2.Endpoint}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], p)
		if p.EC2.Discovery == "tailscale" {
			tsPools = append(tsPools, p.Name)
		}
	}
	var checks []preflight.Check
	for _, k := range order {
		checks = append(checks, preflight.EC2Checks(ec2Region(ctx, cfg.Daemon.Cluster, k.region, k.endpoint, groups[k]))...)
		if c := queueCheck(ctx, k.region, k.endpoint, groups[k]); c != nil {
			checks = append(checks, c)
		}
	}
	ts := preflight.Tailscale{Pools: tsPools, LocalAPI: discovery.NewLocalAPI(cfg.Tailscale.Socket)}
	if len(tsPools) > 0 {
		ts.Key, ts.KeyErr = tailscaleCredentials(cfg.Tailscale)
	}
	checks = append(checks, preflight.TailscaleChecks(ts))
	var rt preflight.RuntimeAPI
	if cfg.HAProxy.Enabled() {
		rt = haproxy.NewClient(cfg.HAProxy.RuntimeSocket, cfg.HAProxy.Timeout.D())
	}
	return append(checks, preflight.HAProxyCheck(rt))
}

// ec2Region makes the clients of one region the way the daemon does: the
// EC2 client of NewClient, and a Provider over it whose DryRunLaunch sends
// the daemon's own RunInstances request.
func ec2Region(ctx context.Context, cluster, region, endpoint string, pools []config.Pool) preflight.EC2Region {
	r := preflight.EC2Region{Region: region}
	popts := map[string]ec2prov.PoolOptions{}
	for _, p := range pools {
		o := p.EC2.PoolOptions()
		popts[p.Name] = o
		r.Pools = append(r.Pools, preflight.EC2Pool{Name: p.Name, Options: o})
	}
	client, err := ec2prov.NewClient(ctx, region, endpoint)
	if err != nil {
		r.Err = err
		return r
	}
	prov, err := ec2prov.New(client, ec2prov.Options{Cluster: cluster, Pools: popts})
	if err != nil {
		r.Err = err
		return r
	}
	awsCfg, err := ec2prov.AWSConfig(ctx, region, endpoint)
	if err != nil {
		r.Err = err
		return r
	}
	r.EC2, r.Launcher = client, prov
	r.STS = sts.NewFromConfig(awsCfg, func(o *sts.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
	})
	r.IAM = iam.NewFromConfig(awsCfg, func(o *iam.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
	})
	return r
}

// tailscaleCredentials is the daemon's own client for deleting devices, as
// an interface value that is nil when none is configured.
func tailscaleCredentials(ts config.Tailscale) (preflight.TailscaleKey, error) {
	api, err := daemon.TailscaleAPI(ts)
	if api == nil || err != nil {
		return nil, err
	}
	return api, nil
}

// queueCheck checks the interruption queue the pools of one region name
// (validation makes them name the same one), with the SQS client the
// daemon reads it with; nil when they name none.
func queueCheck(ctx context.Context, region, endpoint string, pools []config.Pool) preflight.Check {
	var url string
	var names []string
	for _, p := range pools {
		if p.EC2.InterruptionQueue != "" {
			url = p.EC2.InterruptionQueue
			names = append(names, p.Name)
		}
	}
	if url == "" {
		return nil
	}
	c, err := ec2prov.NewSQSClient(ctx, region, endpoint)
	if err != nil {
		return preflight.QueueCheck(strings.Join(names, ","), url, failingQueue{err})
	}
	return preflight.QueueCheck(strings.Join(names, ","), url, sqsQueue{c})
}

// sqsQueue reads a queue's attributes over SQS.
type sqsQueue struct{ c *sqs.Client }

func (q sqsQueue) QueueAttributes(ctx context.Context, url string) (map[string]string, error) {
	out, err := q.c.GetQueueAttributes(ctx, &sqs.GetQueueAttributesInput{QueueUrl: &url,
		AttributeNames: []sqstypes.QueueAttributeName{sqstypes.QueueAttributeNameAll}})
	if err != nil {
		return nil, err
	}
	return out.Attributes, nil
}

// failingQueue is a queue whose client could not be made.
type failingQueue struct{ err error }

func (q failingQueue) QueueAttributes(context.Context, string) (map[string]string, error) {
	return nil, q.err
}

package preflight

import (
	"context"
	"strings"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery"
)

// RuntimeAPI runs a command on HAProxy's runtime socket (*haproxy.Client).
type RuntimeAPI interface {
	Exec(ctx context.Context, cmd string) (string, error)
	Socket() string
}

// HAProxyCheck asks HAProxy's runtime socket "show info", which changes
// nothing. A nil api means no socket is configured.
func HAProxyCheck(api RuntimeAPI) Check {
	return func(ctx context.Context) []Result {
		if api == nil {
			return []Result{skip(CheckHAProxy, "", "not configured (haproxy.runtime_socket is empty: builders are probed directly)")}
		}
		out, err := api.Exec(ctx, "show info")
		if err != nil {
			return []Result{fail(CheckHAProxy, "", "%v: start HAProxy with `stats socket %s level admin`, and let the daemon's user open it", err, api.Socket())}
		}
		version := "unknown version"
		for line := range strings.Lines(out) {
			if v, ok := strings.CutPrefix(line, "Version:"); ok {
				version = "HAProxy " + strings.TrimSpace(v)
			}
		}
		return []Result{pass(CheckHAProxy, "", "%s answers on %s", version, api.Socket())}
	}
}

// LocalAPI reads tailscaled's status (*discovery.LocalAPI).
type LocalAPI interface {
	Status(ctx context.Context) (*discovery.Status, error)
	Socket() string
}

// TailscaleKey proves a Tailscale API key (*discovery.TailscaleAPI).
type TailscaleKey interface {
	CheckKey(ctx context.Context) (int, error)
}

// Tailscale is what the Tailscale checks use. Pools are the pools that
// find their builders on the tailnet; none means the checks do not apply.
type Tailscale struct {
	Pools    []string
	LocalAPI LocalAPI
	// Key is nil when neither tailscale.api_key_file nor an OAuth client
	// is set; KeyErr says why the credentials could not be read.
	Key    TailscaleKey
	KeyErr error
}

// TailscaleChecks checks tailscaled's LocalAPI and, if configured, the API
// key the daemon deletes terminated builders' devices with.
func TailscaleChecks(t Tailscale) Check {
	return func(ctx context.Context) []Result {
		if len(t.Pools) == 0 {
			return []Result{skip(CheckLocalAPI, "", "not configured (no pool has discovery = \"tailscale\")")}
		}
		pools := strings.Join(t.Pools, ",")
		var out []Result
		st, err := t.LocalAPI.Status(ctx)
		if err != nil {
			out = append(out, fail(CheckLocalAPI, pools, "%v: run tailscaled, logged in, with its socket at tailscale.socket (%s), readable by the daemon's user", err, t.LocalAPI.Socket()))
		} else {
			out = append(out, pass(CheckLocalAPI, pools, "tailscaled on %s is %s with %d peers", t.LocalAPI.Socket(), st.BackendState, len(st.Peer)))
		}
		switch {
		case t.KeyErr != nil:
			out = append(out, fail(CheckTailscaleKey, pools, "%v: fix tailscale.api_key_file or tailscale.oauth_client_secret_file", t.KeyErr))
		case t.Key == nil:
			out = append(out, skip(CheckTailscaleKey, pools, "not configured (no tailscale.api_key_file or tailscale.oauth_client_id: terminated builders' devices stay in the tailnet until Tailscale expires them)"))
		default:
			if n, err := t.Key.CheckKey(ctx); err != nil {
				out = append(out, fail(CheckTailscaleKey, pools, "%v", err))
			} else {
				out = append(out, pass(CheckTailscaleKey, pools, "the credentials list the tailnet's %d devices", n))
			}
		}
		return out
	}
}

// QueueAttributes reads an SQS queue's attributes; an adapter over the SQS
// client's GetQueueAttributes (AttributeNames All) satisfies it.
type QueueAttributes interface {
	QueueAttributes(ctx context.Context, url string) (map[string]string, error)
}

// QueueCheck checks a pool's Spot interruption queue: it exists and the
// daemon may read it. It is meant for the Check list of a pool with an
// interruption queue configured.
func QueueCheck(pool, url string, q QueueAttributes) Check {
	return func(ctx context.Context) []Result {
		attrs, err := q.QueueAttributes(ctx, url)
		code := awsCode(err)
		switch {
		case isDenied(code):
			return []Result{fail(CheckQueue, pool, "%s: grant sqs:GetQueueAttributes, sqs:ReceiveMessage and sqs:DeleteMessage on the queue", awsText(err))}
		case strings.Contains(code, "NonExistentQueue") || strings.Contains(code, "QueueDoesNotExist"):
			return []Result{fail(CheckQueue, pool, "%s: fix [pool.ec2] interruption_queue (the queue's URL, in the pool's region)", awsText(err))}
		case err != nil:
			return []Result{fail(CheckQueue, pool, "%s", awsText(err))}
		}
		detail := url + " exists"
		if n, ok := attrs["ApproximateNumberOfMessages"]; ok {
			detail += " (" + n + " messages waiting)"
		}
		return []Result{pass(CheckQueue, pool, "%s", detail)}
	}
}

package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/template"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
)

// Problem is one thing wrong with a config file. Its Key names the value as
// a dotted TOML path: "daemon.listen", "pool[1] (name \"arm\").max_builders"
// (pools are counted from 0; the name is shown when the pool has one),
// "pool[0].systems[2]" for a list element, or "pool" for the list of pools as
// a whole. It is haproxy.Problem, so that the problems haproxy.Generate finds
// in a config read here are the same type and print the same way.
type Problem = haproxy.Problem

// Problems is every problem found in a config file, grouped by section:
// unknown top-level keys, then [daemon], [reservations] and each [[pool]].
type Problems = haproxy.Problems

var (
	clusterRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	poolNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)
	systemRE   = regexp.MustCompile(`^[a-z0-9_]+-[a-z0-9_]+$`)
	featureRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)
)

// Limits on values.
const (
	// MaxBuilders is the most slots (HAProxy servers) a pool may have.
	MaxBuilders = 64
	// maxSocketPath is the longest unix socket path Linux accepts
	// (sizeof sun_path, less the terminating NUL).
	maxSocketPath = 107
	minReconcile  = time.Second
)

// Validate checks every value and returns nil or Problems listing all that
// is wrong.
func (c *Config) Validate() error {
	var v validator
	v.daemon(c.Daemon)
	v.reservations(c.Reservations)
	v.haproxy(c.HAProxy)
	v.pools(c.Pools)
	usesTailscale := false
	for _, p := range c.Pools {
		usesTailscale = usesTailscale || p.Provider == ProviderEC2 && p.EC2.Discovery == "tailscale"
	}
	v.tailscale(c.Tailscale, usesTailscale)
	if c.HAProxy.Enabled() {
		for i, pool := range c.Pools {
			if pool.Frontend == "" {
				v.add(poolKey(i, pool.Name)+".frontend", `is required with haproxy.runtime_socket; set the address HAProxy accepts this pool's SSH on, like "0.0.0.0:2222"`)
			}
		}
	}
	if len(v.problems) == 0 {
		return nil
	}
	return v.problems
}

type validator struct {
	problems Problems
}

// add reports a problem. Text from the file among args is clipped
// (Clip), so that a huge value is not repeated whole.
func (v *validator) add(key, format string, args ...any) {
	v.problems = append(v.problems, Problem{Key: clip(key, maxMessage), Message: clip(fmt.Sprintf(format, clipArgs(args)...), maxMessage)})
}

func (v *validator) daemon(d Daemon) {
	const p = "daemon."
	if !clusterRE.MatchString(d.Cluster) {
		if d.Cluster == "" {
			v.add(p+"cluster", `is required; it tags every instance of this daemon; the default is "nix-builders"`)
		} else {
			v.add(p+"cluster", "%q is not a valid cluster name; use 1 to 63 lower-case letters, digits and '-', starting with a letter or digit", d.Cluster)
		}
	}
	if v.absPath(p+"socket", d.Socket, `like "/run/nix-builder-autoscaler/daemon.sock"`) && len(d.Socket) > maxSocketPath {
		v.add(p+"socket", "is %d bytes long; unix socket paths may be at most %d bytes; choose a shorter path", len(d.Socket), maxSocketPath)
	}
	if d.Listen != "" {
		v.hostPort(p+"listen", d.Listen, "127.0.0.1:8080")
		if d.TokenFile == "" {
			v.add(p+"token_file", "token_file is required when listen is set; point it at a file holding the bearer token")
		}
	}
	if d.TokenFile != "" {
		v.absPath(p+"token_file", d.TokenFile, `like "/run/secrets/nix-builder-autoscaler-token"`)
	}
	if d.MetricsListen != "" {
		v.hostPort(p+"metrics_listen", d.MetricsListen, "127.0.0.1:9464")
	}
	v.absPath(p+"state_dir", d.StateDir, `like "/var/lib/nix-builder-autoscaler"`)
	if d.Database != "" {
		v.absPath(p+"database", d.Database, `or leave it out to use <state_dir>/state.db`)
	}
	v.oneOf(p+"log_level", "log level", d.LogLevel, "debug", "info", "warn", "error")
	v.oneOf(p+"log_format", "log format", d.LogFormat, "text", "json")
	if v.duration(p+"reconcile_interval", d.ReconcileInterval, "10s") && d.ReconcileInterval.D() < minReconcile {
		v.add(p+"reconcile_interval", "%q is too short; reconcile_interval must be at least %s", d.ReconcileInterval, NewDuration(minReconcile))
	}
	v.duration(p+"event_retention", d.EventRetention, "720h")
}

// maxHold keeps the SPOE hold (and so HAProxy's inspect-delay) sane.
const maxHold = 30 * time.Minute

func (v *validator) haproxy(h HAProxy) {
	const p = "haproxy."
	if h.RuntimeSocket != "" {
		v.absPath(p+"runtime_socket", h.RuntimeSocket, `like "/run/haproxy/admin.sock"`)
	}
	v.hostPort(p+"agent_listen", h.AgentListen, "127.0.0.1:5555")
	v.hostPort(p+"spoa_listen", h.SPOAListen, "127.0.0.1:12345")
	if h.StatsListen != "" {
		v.hostPort(p+"stats_listen", h.StatsListen, "127.0.0.1:8404")
	}
	if v.duration(p+"hold", h.Hold, "3m") && h.Hold.D() > maxHold {
		v.add(p+"hold", "%q is longer than %s; a connection should not wait that long for a builder", h.Hold, NewDuration(maxHold))
	}
	if v.duration(p+"check_interval", h.CheckInterval, "1s") && h.CheckInterval.D() < 100*time.Millisecond {
		v.add(p+"check_interval", "%q is too short; use at least 100ms", h.CheckInterval)
	}
	if v.duration(p+"agent_interval", h.AgentInterval, "10s") && h.AgentInterval.D() < 100*time.Millisecond {
		v.add(p+"agent_interval", "%q is too short; use at least 100ms", h.AgentInterval)
	}
	v.duration(p+"timeout", h.Timeout, "5s")
	v.absPath(p+"state_file", h.StateFile, `like "/var/lib/haproxy/nix-builder-autoscaler.state"`)
	if host, port, err := net.SplitHostPort(h.Placeholder); err != nil {
		v.add(p+"placeholder", "%q is not ip:port; write it like \"192.0.2.1:22\"", h.Placeholder)
	} else if a, err := netip.ParseAddr(host); err != nil || !a.Is4() {
		v.add(p+"placeholder", "%q is not an IPv4 address; HAProxy needs an address family to accept `set server addr` later; use an unrouted address like \"192.0.2.1\"", host)
	} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		v.add(p+"placeholder", "port %q is not a number in 1..65535", port)
	}
	if h.Log == "" {
		v.add(p+"log", `is required; "/dev/log" for syslog, or "stdout" when HAProxy runs in the foreground`)
	}
}

func (v *validator) reservations(r Reservations) {
	const p = "reservations."
	lease := v.duration(p+"lease", r.Lease, "10m")
	maxLease := v.duration(p+"max_lease", r.MaxLease, "24h")
	if lease && maxLease && r.Lease.D() > r.MaxLease.D() {
		v.add(p+"lease", "lease (%s) is longer than max_lease (%s); lower lease or raise max_lease", r.Lease, r.MaxLease)
	}
	v.duration(p+"pending_timeout", r.PendingTimeout, "1h")
	v.duration(p+"max_poll", r.MaxPoll, "60s")
}

func (v *validator) pools(pools []Pool) {
	if len(pools) == 0 {
		v.add("pool", "at least one [[pool]] is required; add a [[pool]] table with name, systems, max_builders and provider")
		return
	}
	first := map[string]int{}
	for i, pool := range pools {
		p := poolKey(i, pool.Name) + "."
		if j, dup := first[pool.Name]; dup && pool.Name != "" {
			v.add(p+"name", "duplicate name; pool[%d] is also named %q; give each pool its own name", j, pool.Name)
		} else {
			first[pool.Name] = i
		}
		v.pool(p, pool)
	}
	v.interruptionQueues(pools)
}

func (v *validator) pool(p string, pool Pool) {
	switch {
	case pool.Name == "":
		v.add(p+"name", `is required; name the pool, like name = "x86"`)
	case !poolNameRE.MatchString(pool.Name):
		v.add(p+"name", "%q is not a valid pool name; use 1 to 32 lower-case letters, digits, '_' and '-', starting with a letter or digit", pool.Name)
	}

	if len(pool.Systems) == 0 {
		v.add(p+"systems", `is required; list the Nix systems this pool builds for, like systems = ["x86_64-linux"]`)
	}
	v.list(p+"systems", pool.Systems, func(key, s string) {
		if !systemRE.MatchString(s) {
			v.add(key, "%q is not a Nix system; write it like \"x86_64-linux\" or \"aarch64-linux\"", s)
		}
	})
	v.list(p+"features", pool.Features, func(key, f string) {
		if !featureRE.MatchString(f) {
			v.add(key, "%q is not a valid feature; use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit, like \"kvm\" or \"big-parallel\"", f)
		}
	})

	maxOK := false
	switch {
	case pool.MaxBuilders < 1:
		v.add(p+"max_builders", "must be at least 1; set max_builders = 1 or more (at most %d)", MaxBuilders)
	case pool.MaxBuilders > MaxBuilders:
		v.add(p+"max_builders", "%d is more than %d; lower max_builders, or split the builders over two pools", pool.MaxBuilders, MaxBuilders)
	default:
		maxOK = true
	}
	v.poolCounts(p, pool, maxOK)

	if !pool.IdleTimeout.IsAuto() {
		v.idleTimeout(p+"idle_timeout", pool.IdleTimeout.Duration)
	}
	v.duration(p+"drain_timeout", pool.DrainTimeout, "2h")
	v.duration(p+"launch_timeout", pool.LaunchTimeout, "5m")
	v.duration(p+"boot_timeout", pool.BootTimeout, "10m")
	v.duration(p+"bind_timeout", pool.BindTimeout, "5m")
	if pool.Frontend != "" {
		v.hostPort(p+"frontend", pool.Frontend, "0.0.0.0:2222")
	}

	v.forecastMax(p, pool, maxOK)
	v.poolDurations(p, pool)

	def := DefaultPool()
	switch pool.Provider {
	case "":
		v.add(p+"provider", "is required; set provider = %q (accepted: %s)", ProviderLocal, strings.Join(Providers, ", "))
	case ProviderLocal:
		v.local(p+"local.", pool.Local)
	case ProviderEC2:
		v.ec2(p+"ec2.", pool.EC2)
	default:
		v.add(p+"provider", "%q is not a known provider; use one of: %s", pool.Provider, strings.Join(Providers, ", "))
	}
	if pool.Provider != ProviderLocal && pool.Local != def.Local {
		v.add(p+"local", "[pool.local] is used only with provider = %q; remove it or change provider", ProviderLocal)
	}
	if pool.Provider != ProviderEC2 && !reflect.DeepEqual(pool.EC2, def.EC2) {
		v.add(p+"ec2", "[pool.ec2] is used only with provider = %q; remove it or change provider", ProviderEC2)
	}
}

// maxBillingMinimum bounds billing_minimum (per-hour billing is the longest
// in use).
const maxBillingMinimum = time.Hour

// idleTimeout reports an idle_timeout that is neither "auto" nor a
// duration above zero.
func (v *validator) idleTimeout(key string, d Duration) {
	switch {
	case d.err != nil:
		v.add(key, "%q is not a duration; write \"auto\" (the default: as long as a boot of the pool costs), or a duration like \"5m\"", d.raw)
	case d.D() < 0:
		v.add(key, "%q is negative; write \"auto\" (the default: as long as a boot of the pool costs), or a positive duration like \"5m\"", d)
	case d.D() == 0:
		v.add(key, "%q is not above zero; write \"auto\" (the default: as long as a boot of the pool costs), or a duration like \"5m\"", d)
	default:
		v.tooLong(key, d)
	}
}

// localTemplateFuncs names the functions the local provider gives its
// command templates (scaler/local parseHook). Parsing needs only the names.
var localTemplateFuncs = template.FuncMap{
	"quote": func(s string) string { return s },
}

func (v *validator) template(key, text string) {
	if text == "" {
		return
	}
	if _, err := template.New(key).Funcs(localTemplateFuncs).Parse(text); err != nil {
		msg := err.Error()
		// The error repeats the template name, which is the key.
		msg = strings.TrimPrefix(msg, "template: "+key+":")
		v.add(key, "is not a valid Go text/template (%s); fix the template syntax", strings.TrimSpace(msg))
	}
}

// list checks each element of a string list with check, under the key
// "<key>[i]", and reports duplicates.
func (v *validator) list(key string, items []string, check func(key, item string)) {
	for i, item := range items {
		k := fmt.Sprintf("%s[%d]", key, i)
		if j := slices.Index(items, item); j < i {
			v.add(k, "%q is listed twice (also at [%d]); remove one", item, j)
			continue
		}
		check(k, item)
	}
}

// duration reports a duration that did not parse or is not above zero, and
// tells whether it is fine. def is the default, shown as an example.
func (v *validator) duration(key string, d Duration, def string) bool {
	switch {
	case d.err != nil:
		v.add(key, "%q is not a duration; write it like \"5m\" or \"1h30m\"", d.raw)
	case d.D() < 0:
		v.add(key, "%q is negative; write a positive duration, like %q (the default)", d, def)
	case d.D() == 0:
		v.add(key, "must be more than zero; write a duration, like %q (the default)", def)
	case v.tooLong(key, d):
	default:
		return true
	}
	return false
}

func (v *validator) absPath(key, path, example string) bool {
	switch {
	case path == "":
		v.add(key, "is required; give an absolute path, %s", example)
	case !filepath.IsAbs(path):
		v.add(key, "%q is not an absolute path; give a path starting with /, %s", path, example)
	default:
		return true
	}
	return false
}

func (v *validator) hostPort(key, addr, example string) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		msg := err.Error()
		var ae *net.AddrError
		if errors.As(err, &ae) {
			msg = ae.Err
		}
		v.add(key, "%q is not host:port (%s); write it like %q, or \"[::1]:port\" for IPv6", addr, msg, example)
		return
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		v.add(key, "port %q in %q is not a number from 0 to 65535; write it like %q", port, addr, example)
	}
}

func (v *validator) oneOf(key, what, value string, accepted ...string) {
	if !slices.Contains(accepted, value) {
		v.add(key, "%q is not a %s; use one of: %s", value, what, strings.Join(accepted, ", "))
	}
}

// sortProblems orders problems by section, keeping the order within each:
// unknown top-level keys, [daemon], [reservations], then each pool.
func sortProblems(ps Problems) {
	slices.SortStableFunc(ps, func(a, b Problem) int {
		return sectionRank(a.Key) - sectionRank(b.Key)
	})
}

func sectionRank(key string) int {
	head, _, _ := strings.Cut(key, ".")
	switch {
	case head == "daemon":
		return 1
	case head == "reservations":
		return 2
	case key == "pool":
		return 3
	case strings.HasPrefix(key, "pool["):
		var i int
		if _, err := fmt.Sscanf(key, "pool[%d]", &i); err == nil {
			return 3 + i
		}
		return 3
	}
	return 0
}

// forecastMax checks forecast_max_builders against max_builders (when that
// is valid, maxOK).
func (v *validator) forecastMax(p string, pool Pool, maxOK bool) {
	if n := pool.ForecastMaxBuilders; n != nil && (*n < 0 || *n > MaxBuilders || maxOK && *n > pool.MaxBuilders) {
		v.add(p+"forecast_max_builders", "%d is outside 0..max_builders (%d); write 0 to ignore forecasts, or leave it out to allow up to max_builders",
			*n, pool.MaxBuilders)
	}
}

// poolDurations checks the pool's optional durations: warm_for,
// billing_minimum and max_lifetime.
func (v *validator) poolDurations(p string, pool Pool) {
	if pool.WarmFor.err != nil {
		v.add(p+"warm_for", "%q is not a duration; write it like \"30m\", or \"0s\" to keep the warm pool always", pool.WarmFor.raw)
	} else if pool.WarmFor.D() < 0 {
		v.add(p+"warm_for", "%q is negative; write \"0s\" to keep the warm pool always, or a duration like \"30m\"", pool.WarmFor)
	} else {
		v.tooLong(p+"warm_for", pool.WarmFor)
	}
	if pool.BillingMinimum.err != nil {
		v.add(p+"billing_minimum", "%q is not a duration; write it like \"60s\" (EC2's), or \"0s\" for none", pool.BillingMinimum.raw)
	} else if pool.BillingMinimum.D() < 0 {
		v.add(p+"billing_minimum", "%q is negative; write \"0s\" for none, or a duration like \"60s\" (EC2's)", pool.BillingMinimum)
	} else if pool.BillingMinimum.D() > maxBillingMinimum {
		v.add(p+"billing_minimum", "%q is longer than %s; an idle builder is kept that long after its launch; lower it", pool.BillingMinimum, NewDuration(maxBillingMinimum))
	}
	if pool.MaxLifetime.err != nil {
		v.add(p+"max_lifetime", "%q is not a duration; write it like \"24h\", or \"0s\" for no limit", pool.MaxLifetime.raw)
	} else if pool.MaxLifetime.D() < 0 {
		v.add(p+"max_lifetime", "%q is negative; write \"0s\" for no limit, or a duration like \"24h\"", pool.MaxLifetime)
	} else {
		v.tooLong(p+"max_lifetime", pool.MaxLifetime)
	}
}

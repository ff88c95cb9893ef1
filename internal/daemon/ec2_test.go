package daemon_test

// The daemon with an EC2 pool, end to end: against the in-process ec2test
// fake (a Spot interruption, capacity fallbacks) and against moto_server on
// loopback through the real AWS SDK (launch, restart and adoption, idle
// drain, leaked and foreign instances).
//
// EC2 builders have private addresses that nothing here may connect to, so
// every daemon runs with daemontest.Reachable in place of HAProxy: a bound
// slot counts as healthy at once. Time is the harness's manual clock; the
// reconciler runs rounds when kicked (API calls, its own changes) and when
// the test asks for one.

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// ec2Cluster is the daemon.cluster of these tests: the value of the
// instances' cluster tag.
const ec2Cluster = "ci"

// Subnets and zones of the fake EC2 (ids the config accepts).
const (
	ec2SubnetA = "subnet-0aaaaaaaaaaaaaaa1"
	ec2SubnetB = "subnet-0bbbbbbbbbbbbbbb2"
)

var ec2Slot1 = scaler.SlotKey{Pool: "x86", Slot: "slot1"}

// ec2Daemon is a daemon with one EC2 pool "x86" and a Reachable in place of
// HAProxy.
type ec2Daemon struct {
	*daemontest.Harness
	t     *testing.T
	cfg   *config.Config
	clock *clocktest.Clock
	reach *daemontest.Reachable
	reg   *prometheus.Registry
}

// ec2Config is the configuration of a pool "x86" on EC2 with ec2-private-ip
// discovery: poolKeys are more keys of the pool, ec2Keys more keys of its
// [pool.ec2] table.
func ec2Config(t *testing.T, subnets []string, ami, poolKeys, ec2Keys string) *config.Config {
	t.Helper()
	quoted := make([]string, len(subnets))
	for i, s := range subnets {
		quoted[i] = fmt.Sprintf("%q", s)
	}
	pool := fmt.Sprintf(`max_builders = 2
idle_timeout = "5m"
%s

[pool.ec2]
region = "us-east-1"
ami = %q
instance_types = ["m7i.xlarge", "m6i.xlarge"]
subnets = [%s]
discovery = "ec2-private-ip"
%s
`, poolKeys, ami, strings.Join(quoted, ", "), ec2Keys)
	return daemontest.ConfigProvider(t, config.ProviderEC2, fmt.Sprintf("cluster = %q", ec2Cluster), pool)
}

// TestEC2PoolWithAMIAndNoLaunchTemplateStarts: a pool with an AMI and no
// launch template, as docs/configuration.md describes it, must start.
//
// Regression: config.DefaultPool sets [pool.ec2] launch_template_version to
// "$Default", and the daemon used to pass it to the provider even without a
// launch template, which scaler/ec2 rejects; every AMI-only pool failed to
// start. The daemon now passes a version only with a template.
func TestEC2PoolWithAMIAndNoLaunchTemplateStarts(t *testing.T) {
	isolateAWS(t)
	pool := `max_builders = 1

[pool.ec2]
region = "us-east-1"
ami = "ami-0123456789abcdef0"
instance_types = ["m7i.xlarge"]
subnets = ["` + ec2SubnetA + `"]
discovery = "ec2-private-ip"
# Never contacted: New makes no request.
endpoint = "http://127.0.0.1:9"
`
	cfg := daemontest.ConfigProvider(t, config.ProviderEC2, fmt.Sprintf("cluster = %q", ec2Cluster), pool)
	d, err := daemon.New(context.Background(), cfg, daemon.Options{Clock: clocktest.New(daemontest.T0),
		Readiness: daemontest.NewReachable(), Registry: prometheus.NewRegistry()})
	if err != nil {
		t.Fatalf("daemon.New, pool with ami and no launch template (launch_template_version left at its default %q): %v; want it to start",
			cfg.Pools[0].EC2.LaunchTemplateVersion, err)
	}
	d.Store().Close()
}

// startEC2 starts a daemon for cfg on clock, with reach as its readiness.
// With fake set, the pool's provider is the EC2 provider over the fake
// (through Options.EC2); without, the daemon builds its SDK client from
// [pool.ec2] itself.
func startEC2(t *testing.T, cfg *config.Config, clock *clocktest.Clock, reach *daemontest.Reachable, fake *ec2test.Fake) *ec2Daemon {
	t.Helper()
	reg := prometheus.NewRegistry()
	d := &ec2Daemon{t: t, cfg: cfg, clock: clock, reach: reach, reg: reg}
	opts := []daemontest.Option{daemontest.WithReadiness(reach), func(o *daemon.Options) {
		o.Clock = clock
		o.Registry = reg
	}}
	if fake != nil {
		opts = append(opts, func(o *daemon.Options) {
			o.EC2 = func(region, endpoint string, pools map[string]ec2prov.PoolOptions) scaler.Provider {
				if region != "us-east-1" || endpoint != "" || !slices.Equal(slices.Sorted(maps.Keys(pools)), []string{"x86"}) {
					t.Errorf("EC2 hook called with region %q, endpoint %q, pools %v; want us-east-1, none, [x86]", region, endpoint, pools)
				}
				p, err := ec2prov.New(fake, ec2prov.Options{Cluster: cfg.Daemon.Cluster, Pools: pools, Clock: clock, Registerer: reg})
				if err != nil {
					t.Fatalf("ec2 provider over the fake: %v", err)
				}
				return p
			}
		})
	}
	d.Harness = daemontest.Start(t, cfg, opts...)
	return d
}

// ctx bounds one call to the daemon; the bound is a hang guard.
func (d *ec2Daemon) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound)
	d.t.Cleanup(cancel)
	return ctx
}

// reconcile runs one round (follow-up rounds it kicks run on their own).
func (d *ec2Daemon) reconcile() {
	d.t.Helper()
	if err := d.Daemon.Reconciler().Reconcile(d.ctx()); err != nil {
		d.t.Fatalf("reconcile: %v", err)
	}
}

func (d *ec2Daemon) slot(key scaler.SlotKey) scaler.Slot {
	d.t.Helper()
	s, err := d.Daemon.Store().Slot(context.Background(), key)
	if err != nil {
		d.t.Fatal(err)
	}
	return s
}

// apiSlot is the slot as GET /v1/slots shows it.
func (d *ec2Daemon) apiSlot(key scaler.SlotKey) api.Slot {
	d.t.Helper()
	l, err := d.Client.Slots(d.ctx())
	if err != nil {
		d.t.Fatal(err)
	}
	for _, s := range l.Slots {
		if s.Pool == key.Pool && s.Slot == key.Slot {
			return s
		}
	}
	d.t.Fatalf("GET /v1/slots has no %s: %+v", key, l.Slots)
	return api.Slot{}
}

func (d *ec2Daemon) create(id string) {
	d.t.Helper()
	r, created, err := d.Client.CreateReservation(d.ctx(), api.CreateReservationRequest{ID: id, System: "x86_64-linux", Owner: "test"})
	if err != nil || !created || r.State != "pending" {
		d.t.Fatalf("create %s = %+v, %v, %v; want a new pending reservation", id, r, created, err)
	}
}

func (d *ec2Daemon) reservation(id string) api.Reservation {
	d.t.Helper()
	r, err := d.Client.Reservation(d.ctx(), id, 0)
	if err != nil {
		d.t.Fatal(err)
	}
	return r
}

// waitReady waits until reservation id is ready and returns it. The bound
// (testwait.Bound) is a hang guard: a launch through moto_server on a busy
// machine may take long.
func (d *ec2Daemon) waitReady(id string) api.Reservation {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound)
	defer cancel()
	r, err := d.Client.WaitReady(ctx, id, 5*time.Second)
	if err != nil || r.State != "ready" {
		d.t.Fatalf("reservation %s = %+v, %v; want ready", id, r, err)
	}
	return r
}

func (d *ec2Daemon) events(q api.EventQuery) []api.Event {
	d.t.Helper()
	q.Limit = 1000
	l, err := d.Client.Events(d.ctx(), q)
	if err != nil {
		d.t.Fatal(err)
	}
	return l.Events
}

// metric sums the samples of a counter or gauge whose labels include
// labels.
func (d *ec2Daemon) metric(name string, labels map[string]string) float64 {
	d.t.Helper()
	mfs, err := d.reg.Gather()
	if err != nil {
		d.t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	samples:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue samples
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

func eventKinds(evs []api.Event) string {
	kinds := make([]string, len(evs))
	for i, e := range evs {
		kinds[i] = e.Kind
	}
	return strings.Join(kinds, " ")
}

func eventsOf(evs []api.Event, kind string) []api.Event {
	var out []api.Event
	for _, e := range evs {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// TestEC2SpotInterruptionRequeuesAndReplaces: EC2 reclaims the Spot
// builder holding a ready reservation; the next round sends the
// reservation back to pending and launches a replacement at once, which
// then serves it; the event log says why.
func TestEC2SpotInterruptionRequeuesAndReplaces(t *testing.T) {
	fake := ec2test.New()
	fake.Zones = map[string]string{ec2SubnetA: "us-east-1a", ec2SubnetB: "us-east-1b"}
	clock := clocktest.New(daemontest.T0)
	fake.Now = clock.Now
	d := startEC2(t, ec2Config(t, []string{ec2SubnetA, ec2SubnetB}, "ami-0123456789abcdef0", "", ""),
		clock, daemontest.NewReachable(), fake)

	d.create("build-1")
	r := d.waitReady("build-1")
	first := r.InstanceID
	raw, ok := fake.Instance(first)
	if !ok {
		t.Fatalf("reservation on %s, which the fake never launched", first)
	}
	wantAddr := aws.ToString(raw.PrivateIpAddress) + ":22"
	if r.Slot != "slot1" || r.Address != wantAddr || d.reach.Addr(ec2Slot1) != wantAddr {
		t.Fatalf("reservation = %+v, bound %q; want ready on slot1 at the private IP %s", r, d.reach.Addr(ec2Slot1), wantAddr)
	}
	if raw.InstanceLifecycle != types.InstanceLifecycleTypeSpot {
		t.Fatalf("first builder's lifecycle = %q, want spot", raw.InstanceLifecycle)
	}

	fake.Interrupt(first)
	d.reconcile()
	// The round that saw the interruption launched the replacement.
	if n := fake.CallCount(ec2test.OpRun); n != 2 {
		t.Errorf("RunInstances calls after the interruption's round = %d, want 2 (the replacement launched at once)", n)
	}
	var r2 api.Reservation
	d.WaitFor("build-1 ready on a replacement", func() bool {
		r2 = d.reservation("build-1")
		return r2.State == "ready" && r2.InstanceID != first
	})
	second := r2.InstanceID
	raw2, ok := fake.Instance(second)
	if !ok || raw2.State.Name != types.InstanceStateNameRunning {
		t.Fatalf("replacement %s = %+v (known %v), want running", second, raw2.State, ok)
	}
	if want := aws.ToString(raw2.PrivateIpAddress) + ":22"; r2.Slot != "slot1" || r2.Address != want || d.reach.Addr(ec2Slot1) != want {
		t.Errorf("reservation = %+v, bound %q; want ready on slot1 at %s", r2, d.reach.Addr(ec2Slot1), want)
	}
	if s := d.slot(scaler.SlotKey{Pool: "x86", Slot: "slot2"}); s.State != scaler.Empty {
		t.Errorf("slot2 = %s; one reservation needs one builder", s.State)
	}

	// Why, in the event log.
	resEvs := d.events(api.EventQuery{Reservation: "build-1"})
	if got, want := eventKinds(resEvs), "created assigned requeued assigned"; got != want {
		t.Errorf("build-1 events = %q, want %q", got, want)
	}
	wantReason := "instance " + first + " is terminated: " + ec2prov.ReasonSpotInterruption
	if rq := eventsOf(resEvs, scaler.EvRequeued); len(rq) != 1 || rq[0].Reason != wantReason || rq[0].Slot != "slot1" {
		t.Errorf("requeued events = %+v, want one on slot1 with reason %q", rq, wantReason)
	}
	slotEvs := d.events(api.EventQuery{Pool: "x86", Slot: "slot1"})
	launched := eventsOf(slotEvs, scaler.EvLaunched)
	if len(launched) != 2 || launched[0].InstanceID != first || launched[1].InstanceID != second {
		t.Errorf("launched events = %+v, want %s then %s", launched, first, second)
	}
	if em := eventsOf(slotEvs, scaler.EvEmptied); len(em) != 1 || em[0].InstanceID != first || em[0].Reason != wantReason {
		t.Errorf("emptied events = %+v, want one for %s with reason %q", em, first, wantReason)
	}
	if got, want := eventKinds(slotEvs), "launched booted bound ready assigned requeued emptied launched booted bound ready assigned"; got != want {
		t.Errorf("slot1 events = %q, want %q", got, want)
	}
	if n := d.metric("nix_builder_autoscaler_ec2_interruptions_total", map[string]string{"pool": "x86"}); n != 1 {
		t.Errorf("ec2_interruptions_total{pool=x86} = %v, want 1", n)
	}
}

// TestEC2CapacityFallbackRecordsWhatWasBought: the provider's fallbacks
// through the daemon. The slot and the launched event record the market,
// type and zone the launch landed on.
func TestEC2CapacityFallbackRecordsWhatWasBought(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ec2Keys  string
		noCap    [3]string // market, type, subnet
		attempts int
		market   string
		typ      string
	}{
		{name: "next type", noCap: [3]string{"spot", "m7i.xlarge", ""}, attempts: 3, market: "spot", typ: "m6i.xlarge"},
		{name: "on-demand", ec2Keys: "on_demand_fallback = true", noCap: [3]string{"spot", "", ""}, attempts: 5,
			market: "on-demand", typ: "m7i.xlarge"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := ec2test.New()
			fake.Zones = map[string]string{ec2SubnetA: "us-east-1a", ec2SubnetB: "us-east-1b"}
			fake.NoCapacity(tc.noCap[0], tc.noCap[1], tc.noCap[2])
			clock := clocktest.New(daemontest.T0)
			fake.Now = clock.Now
			d := startEC2(t, ec2Config(t, []string{ec2SubnetA, ec2SubnetB}, "ami-0123456789abcdef0", "", tc.ec2Keys),
				clock, daemontest.NewReachable(), fake)

			d.create("build-1")
			r := d.waitReady("build-1")
			if n := fake.CallCount(ec2test.OpRun); n != tc.attempts {
				t.Errorf("RunInstances calls = %d, want %d", n, tc.attempts)
			}
			raw, ok := fake.Instance(r.InstanceID)
			if !ok || string(raw.InstanceType) != tc.typ {
				t.Fatalf("reservation on %s = %+v; want an instance of type %s", r.InstanceID, raw, tc.typ)
			}
			const zone = "us-east-1a" // the first launch starts at the first subnet
			s := d.apiSlot(ec2Slot1)
			if s.InstanceID != r.InstanceID || s.InstanceType != tc.typ || s.Market != tc.market || s.Zone != zone || s.State != "ready" {
				t.Errorf("GET /v1/slots slot1 = %+v; want ready on %s, %s %s in %s", s, r.InstanceID, tc.market, tc.typ, zone)
			}
			launched := eventsOf(d.events(api.EventQuery{Pool: "x86", Slot: "slot1"}), scaler.EvLaunched)
			want := tc.market + " " + tc.typ + " " + zone + ": "
			if len(launched) != 1 || !strings.HasPrefix(launched[0].Reason, want) {
				t.Errorf("launched events = %+v, want one whose reason starts %q", launched, want)
			}
			if n := d.metric("nix_builder_autoscaler_ec2_capacity_errors_total", map[string]string{"pool": "x86"}); int(n) != tc.attempts-1 {
				t.Errorf("ec2_capacity_errors_total{pool=x86} = %v, want %d", n, tc.attempts-1)
			}
		})
	}
}

// isolateAWS keeps the host's AWS settings out of the daemon's SDK client:
// no shared config or credentials files, no profile, no keys (so NewClient
// signs with its dummy credentials for the endpoint), no instance metadata.
func isolateAWS(t *testing.T) {
	dir := t.TempDir()
	for k, v := range map[string]string{
		"AWS_CONFIG_FILE":             filepath.Join(dir, "config"),
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "credentials"),
		"AWS_PROFILE":                 "",
		"AWS_DEFAULT_PROFILE":         "",
		"AWS_ACCESS_KEY_ID":           "",
		"AWS_SECRET_ACCESS_KEY":       "",
		"AWS_SESSION_TOKEN":           "",
		"AWS_EC2_METADATA_DISABLED":   "true",
		"AWS_ENDPOINT_URL":            "",
		"AWS_ENDPOINT_URL_EC2":        "",
	} {
		t.Setenv(k, v)
	}
}

// motoEC2 is moto_server with its default subnets, and instances that are
// not this daemon's: one without tags, one of another cluster.
type motoEC2 struct {
	*ec2test.Moto
	subnets   []ec2test.Subnet
	untagged  string
	foreign   string
	clusterIs types.Filter
}

func newMotoEC2(t *testing.T) *motoEC2 {
	t.Helper()
	m := &motoEC2{Moto: ec2test.StartMoto(t)}
	isolateAWS(t)
	m.subnets = m.DefaultSubnets(t)
	m.untagged = m.RunInstance(t, m.subnets[0].ID, nil)
	m.foreign = m.RunInstance(t, m.subnets[0].ID, map[string]string{
		ec2prov.TagCluster: "other", ec2prov.TagPool: "x86", ec2prov.TagSlot: "slot1", ec2prov.TagName: "other-x86-slot1"})
	m.clusterIs = types.Filter{Name: aws.String("tag:" + ec2prov.TagCluster), Values: []string{ec2Cluster}}
	return m
}

// config is the pool on moto (endpoint, first two default subnets).
func (m *motoEC2) config(t *testing.T, poolKeys string) *config.Config {
	return ec2Config(t, []string{m.subnets[0].ID, m.subnets[1].ID}, ec2test.MotoAMI, poolKeys,
		fmt.Sprintf("endpoint = %q\nroot_volume_gb = 20", m.Endpoint))
}

// ours lists the instances tagged for this daemon's cluster, in any state.
func (m *motoEC2) ours(t *testing.T) []types.Instance {
	t.Helper()
	return m.Instances(t, m.clusterIs)
}

// checkOthersUntouched: the untagged and the other cluster's instance are
// still running, and the daemon's event log never named them.
func (m *motoEC2) checkOthersUntouched(t *testing.T, d *ec2Daemon) {
	t.Helper()
	for _, id := range []string{m.untagged, m.foreign} {
		if st := ec2test.State(m.Describe(t, id)); st != types.InstanceStateNameRunning {
			t.Errorf("%s (not this cluster's) is %s, want running", id, st)
		}
		for _, e := range d.events(api.EventQuery{}) {
			if e.InstanceID == id || strings.Contains(e.Reason, id) {
				t.Errorf("event about %s (not this cluster's): %+v", id, e)
			}
		}
	}
}

func waitGone(t *testing.T, d *ec2Daemon, m *motoEC2, id string) {
	t.Helper()
	d.WaitFor(id+" terminated in moto", func() bool {
		switch ec2test.State(m.Describe(t, id)) {
		case types.InstanceStateNameTerminated, types.InstanceStateNameShuttingDown:
			return true
		}
		return false
	})
}

// TestEC2MotoLaunchRestartAdoptDrain: through the real SDK against
// moto_server, a reservation launches a tagged instance; a restarted daemon
// keeps it (no second launch); once released and idle it is terminated.
// Instances that are not this cluster's are never touched.
func TestEC2MotoLaunchRestartAdoptDrain(t *testing.T) {
	m := newMotoEC2(t)
	cfg := m.config(t, "")
	// The manual clock starts at the real time: moto's launch times are real.
	clock := clocktest.New(time.Now().UTC().Truncate(time.Second))
	reach := daemontest.NewReachable()
	d := startEC2(t, cfg, clock, reach, nil)

	// (a) Launch: tags in moto, listed, bound, ready.
	d.create("build-1")
	r := d.waitReady("build-1")
	ours := m.ours(t)
	if len(ours) != 1 || aws.ToString(ours[0].InstanceId) != r.InstanceID {
		t.Fatalf("instances of cluster %s in moto = %d, want 1: the reservation's %s", ec2Cluster, len(ours), r.InstanceID)
	}
	id := r.InstanceID
	raw := ours[0]
	s := d.slot(ec2Slot1)
	wantTags := map[string]string{ec2prov.TagCluster: ec2Cluster, ec2prov.TagPool: "x86", ec2prov.TagSlot: "slot1",
		ec2prov.TagLaunchID: s.LaunchID, ec2prov.TagName: ec2Cluster + "-x86-slot1"}
	if got := ec2test.Tags(raw.Tags); s.LaunchID == "" || !maps.Equal(got, wantTags) {
		t.Errorf("tags of %s = %v, want %v", id, got, wantTags)
	}
	if raw.InstanceLifecycle != types.InstanceLifecycleTypeSpot || ec2test.State(raw) != types.InstanceStateNameRunning {
		t.Errorf("%s: lifecycle %q, state %q; want a running spot instance", id, raw.InstanceLifecycle, ec2test.State(raw))
	}
	wantAddr := aws.ToString(raw.PrivateIpAddress) + ":22"
	if r.Slot != "slot1" || aws.ToString(raw.PrivateIpAddress) == "" || r.Address != wantAddr || reach.Addr(ec2Slot1) != wantAddr {
		t.Errorf("reservation = %+v, bound %q; want ready on slot1 at %s", r, reach.Addr(ec2Slot1), wantAddr)
	}
	as := d.apiSlot(ec2Slot1)
	if as.InstanceType != "m7i.xlarge" || as.Market != "spot" || as.Zone != m.subnets[0].Zone {
		t.Errorf("GET /v1/slots slot1 = %+v; want spot m7i.xlarge in %s", as, m.subnets[0].Zone)
	}

	// (b) A restart on the same state keeps the builder: no second launch.
	d.Stop()
	d2 := startEC2(t, cfg, clock, reach, nil)
	d2.reconcile()
	d2.reconcile()
	if s := d2.slot(ec2Slot1); s.State != scaler.Ready || s.InstanceID != id {
		t.Errorf("slot1 after restart = %s on %s, want ready on %s", s.State, s.InstanceID, id)
	}
	if r := d2.reservation("build-1"); r.State != "ready" || r.InstanceID != id {
		t.Errorf("build-1 after restart = %+v, want ready on %s", r, id)
	}
	if n := len(m.ours(t)); n != 1 {
		t.Errorf("instances of cluster %s in moto after restart = %d, want 1", ec2Cluster, n)
	}

	// (c) Released and idle for idle_timeout: drained and terminated.
	if _, err := d2.Client.Release(d2.ctx(), "build-1"); err != nil {
		t.Fatal(err)
	}
	clock.Advance(4 * time.Minute)
	d2.reconcile()
	if s := d2.slot(ec2Slot1); s.State != scaler.Ready {
		t.Fatalf("slot1 = %s before idle_timeout; want ready", s.State)
	}
	clock.Advance(time.Minute)
	d2.reconcile()
	waitGone(t, d2, m, id)
	d2.WaitFor("slot1 empty", func() bool { return d2.slot(ec2Slot1).State == scaler.Empty })
	if _, bound := reach.Bound()[ec2Slot1]; bound {
		t.Errorf("slot1 still bound to %q after it emptied", reach.Addr(ec2Slot1))
	}
	evs := d2.events(api.EventQuery{Pool: "x86", Slot: "slot1"})
	if got, want := eventKinds(evs), "launched booted bound ready assigned released drained terminated emptied"; got != want {
		t.Errorf("slot1 events = %q, want %q", got, want)
	}
	if term := eventsOf(evs, scaler.EvTerminated); len(term) != 1 || term[0].InstanceID != id || term[0].Reason != "drained (idle)" {
		t.Errorf("terminated events = %+v, want one for %s, drained (idle)", term, id)
	}
	if n := len(m.ours(t)); n != 1 {
		t.Errorf("instances of cluster %s in moto = %d, want 1 (nothing relaunched)", ec2Cluster, n)
	}
	m.checkOthersUntouched(t, d2)
}

// TestEC2MotoLeakedInstancesTerminatedAfterGrace: instances tagged for this
// cluster that no slot tracks (one for the busy slot1, one for a pool that
// does not exist) live through OrphanGrace and are terminated after it;
// untagged and other clusters' instances are never touched.
func TestEC2MotoLeakedInstancesTerminatedAfterGrace(t *testing.T) {
	m := newMotoEC2(t)
	clock := clocktest.New(time.Now().UTC().Truncate(time.Second))
	reach := daemontest.NewReachable()
	d := startEC2(t, m.config(t, ""), clock, reach, nil)

	d.create("build-1")
	r := d.waitReady("build-1")
	leaks := []string{
		m.RunInstance(t, m.subnets[1].ID, map[string]string{ec2prov.TagCluster: ec2Cluster, ec2prov.TagPool: "x86", ec2prov.TagSlot: "slot1",
			ec2prov.TagLaunchID: "leaked", ec2prov.TagName: ec2Cluster + "-x86-slot1"}),
		m.RunInstance(t, m.subnets[1].ID, map[string]string{ec2prov.TagCluster: ec2Cluster, ec2prov.TagPool: "gone", ec2prov.TagSlot: "slot1"}),
	}
	var launched time.Time
	for _, id := range leaks {
		if at := aws.ToTime(m.Describe(t, id).LaunchTime); at.After(launched) {
			launched = at
		}
	}
	if launched.IsZero() {
		t.Fatal("moto gave the leaked instances no launch time")
	}

	// Just inside the grace: left alone.
	advanceTo := func(at time.Time) {
		t.Helper()
		if by := at.Sub(clock.Now()); by > 0 {
			clock.Advance(by)
		} else {
			t.Fatalf("the daemon's clock %s is already past %s", clock.Now(), at)
		}
	}
	advanceTo(launched.Add(daemon.OrphanGrace - 5*time.Second))
	d.reconcile()
	d.reconcile()
	for _, id := range leaks {
		if st := ec2test.State(m.Describe(t, id)); st != types.InstanceStateNameRunning {
			t.Errorf("leaked %s is %s %s before the %s grace ended; want running", id, st, clock.Now().Sub(launched), daemon.OrphanGrace)
		}
	}

	// Past it: terminated, and the log says so.
	advanceTo(launched.Add(daemon.OrphanGrace + 5*time.Second))
	d.reconcile()
	for _, id := range leaks {
		waitGone(t, d, m, id)
		var term []api.Event
		for _, e := range d.events(api.EventQuery{}) {
			if e.InstanceID == id && e.Kind == scaler.EvTerminated {
				term = append(term, e)
			}
		}
		if len(term) != 1 || term[0].Reason != "orphan: no slot tracks it" || term[0].Slot != "" {
			t.Errorf("terminated events of %s = %+v, want one orphan termination", id, term)
		}
	}

	// The tracked builder and its reservation are unaffected.
	if s := d.slot(ec2Slot1); s.State != scaler.Ready || s.InstanceID != r.InstanceID {
		t.Errorf("slot1 = %s on %s, want ready on %s", s.State, s.InstanceID, r.InstanceID)
	}
	if got := d.reservation("build-1"); got.State != "ready" || got.InstanceID != r.InstanceID {
		t.Errorf("build-1 = %+v, want ready on %s", got, r.InstanceID)
	}
	if st := ec2test.State(m.Describe(t, r.InstanceID)); st != types.InstanceStateNameRunning {
		t.Errorf("the tracked builder %s is %s, want running", r.InstanceID, st)
	}
	m.checkOthersUntouched(t, d)
}

// TestDrainedBuilderWithLateSessionIsNotTerminated: a builder is drained
// for idleness, and a connection reaches it after the round that decides
// to terminate it observed no session (HAProxy still routed to it: the agent
// says "drain" only at its next check). The reconciler closes the server to
// new connections and counts again before terminating: it finds the
// session and keeps the builder draining; it terminates it once the
// session ended.
func TestDrainedBuilderWithLateSessionIsNotTerminated(t *testing.T) {
	fake := ec2test.New()
	fake.Zones = map[string]string{ec2SubnetA: "us-east-1a"}
	clock := clocktest.New(daemontest.T0)
	fake.Now = clock.Now
	reach := daemontest.NewReachable()
	d := startEC2(t, ec2Config(t, []string{ec2SubnetA}, "ami-0123456789abcdef0", "", ""), clock, reach, fake)

	d.create("build-1")
	id := d.waitReady("build-1").InstanceID
	if _, err := d.Client.Release(d.ctx(), "build-1"); err != nil {
		t.Fatal(err)
	}
	// The session arrives while the round that drained the slot and found
	// it empty is about to terminate it.
	reach.OnQuiesce(func(key scaler.SlotKey) { reach.SetSessions(key, 1) })
	clock.Advance(5 * time.Minute)
	d.reconcile()
	d.reconcile()
	if s := d.slot(ec2Slot1); s.State != scaler.Draining || s.InstanceID != id {
		t.Fatalf("slot1 = %s (%s) with a session open; want draining, %s", s.State, s.InstanceID, id)
	}
	if n := fake.CallCount(ec2test.OpTerminate); n != 0 {
		t.Fatalf("TerminateInstances called %d times while a session was open", n)
	}
	if q := reach.Quiesced(); len(q) == 0 || q[0] != ec2Slot1 {
		t.Fatalf("Quiesce calls = %v; want slot1 closed to new connections before terminating", q)
	}

	// The session ends: terminated.
	reach.OnQuiesce(nil)
	reach.SetSessions(ec2Slot1, 0)
	d.reconcile()
	d.WaitFor("slot1 terminating or empty", func() bool {
		st := d.slot(ec2Slot1).State
		return st == scaler.Terminating || st == scaler.Empty
	})
	if n := fake.CallCount(ec2test.OpTerminate); n != 1 {
		t.Errorf("TerminateInstances calls after the session ended = %d, want 1", n)
	}
	evs := d.events(api.EventQuery{Pool: "x86", Slot: "slot1"})
	if term := eventsOf(evs, scaler.EvTerminated); len(term) != 1 || term[0].Reason != "drained (idle)" {
		t.Errorf("terminated events = %+v, want one, drained (idle)", term)
	}
}

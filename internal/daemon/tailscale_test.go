package daemon_test

// The daemon with an EC2 pool whose builders are found on the tailnet
// (booting → binding): the ec2test fake launches the instances, and a fake
// tailscaled (discoverytest) answers the LocalAPI on a unix socket with a
// status document of the real shape, whose nodes each test chooses. The
// pool uses [pool.ec2] discovery = "tailscale" (the default) and
// [tailscale] hostname = "nix-builder-{{.InstanceID}}".
//
// As in ec2_test.go, daemontest.Reachable stands in for HAProxy (a bound
// slot is healthy at once) and time is the harness's manual clock; rounds
// run when kicked and when the test asks for one.

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery/discoverytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// tsBootTimeout is the pool's boot_timeout: below the reservations' 10m
// lease, so a pending reservation outlives it without heartbeats.
const tsBootTimeout = 4 * time.Minute

// tsLookups is the discovery metric the daemon registers.
const tsLookups = "nix_builder_autoscaler_discovery_lookups_total"

// tsDaemon is an ec2Daemon whose builders are found through a fake
// tailscaled.
type tsDaemon struct {
	*ec2Daemon
	fake *ec2test.Fake
	ts   *discoverytest.LocalAPI
	logs *tsLogBuffer
}

// tsConfig is a pool "x86" on EC2 (up to two builders) with discovery left
// at its default, and a [tailscale] table pointing at socket.
func tsConfig(t *testing.T, socket string) *config.Config {
	t.Helper()
	pool := fmt.Sprintf(`max_builders = 2
idle_timeout = "5m"
boot_timeout = %q

[pool.ec2]
region = "us-east-1"
ami = "ami-0123456789abcdef0"
instance_types = ["m7i.xlarge"]
subnets = [%q]

[tailscale]
socket = %q
hostname = "nix-builder-{{.InstanceID}}"
`, tsBootTimeout.String(), ec2SubnetA, socket)
	cfg := daemontest.ConfigProvider(t, config.ProviderEC2, fmt.Sprintf("cluster = %q", ec2Cluster), pool)
	if got := cfg.Pools[0].EC2.Discovery; got != "tailscale" {
		t.Fatalf("[pool.ec2] discovery defaults to %q, want tailscale", got)
	}
	if cfg.Tailscale.Socket != socket || cfg.Pools[0].BootTimeout.D() != tsBootTimeout {
		t.Fatalf("config: tailscale.socket %q, boot_timeout %s; want %q, %s",
			cfg.Tailscale.Socket, cfg.Pools[0].BootTimeout.D(), socket, tsBootTimeout)
	}
	return cfg
}

// startTailscale starts the daemon over a new EC2 fake and a fake
// tailscaled whose tailnet holds peers.
func startTailscale(t *testing.T, peers ...discoverytest.Peer) *tsDaemon {
	t.Helper()
	fake := ec2test.New()
	fake.Zones = map[string]string{ec2SubnetA: "us-east-1a"}
	clock := clocktest.New(daemontest.T0)
	fake.Now = clock.Now
	ts := discoverytest.Start(t, peers...)
	cfg := tsConfig(t, ts.Socket)

	logs := &tsLogBuffer{}
	// Registered before the harness's cleanup, so it runs after the daemon
	// stopped.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs)
		}
	})
	reg := prometheus.NewRegistry()
	reach := daemontest.NewReachable()
	d := &tsDaemon{ec2Daemon: &ec2Daemon{t: t, cfg: cfg, clock: clock, reach: reach, reg: reg}, fake: fake, ts: ts, logs: logs}
	d.Harness = daemontest.Start(t, cfg, daemontest.WithReadiness(reach), func(o *daemon.Options) {
		o.Clock = clock
		o.Registry = reg
		o.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		o.EC2 = func(region, endpoint string, pools map[string]ec2prov.PoolOptions) scaler.Provider {
			p, err := ec2prov.New(fake, ec2prov.Options{Cluster: cfg.Daemon.Cluster, Pools: pools, Clock: clock, Registerer: reg})
			if err != nil {
				t.Fatalf("ec2 provider over the fake: %v", err)
			}
			return p
		}
	})
	return d
}

func tsHostname(instanceID string) string { return "nix-builder-" + instanceID }

// waitBooting waits (bounded) until a slot is booting on an instance other
// than not, and returns it.
func (d *tsDaemon) waitBooting(not string) scaler.Slot {
	d.t.Helper()
	var found scaler.Slot
	d.WaitFor("a slot booting on a new instance", func() bool {
		slots, err := d.Daemon.Store().Slots(context.Background())
		if err != nil {
			d.t.Fatal(err)
		}
		for _, s := range slots {
			if s.State == scaler.Booting && s.InstanceID != "" && s.InstanceID != not {
				found = s
				return true
			}
		}
		return false
	})
	return found
}

// reconcileReading runs a round and checks that it read the tailnet (one
// status request or more: rounds it kicked may follow).
func (d *tsDaemon) reconcileReading() {
	d.t.Helper()
	before := d.ts.Requests()
	d.reconcile()
	if d.ts.Requests() == before {
		d.t.Errorf("a round with a booting builder made no LocalAPI request")
	}
}

// checkStillBooting: the slot is booting on id, unbound, and reservation
// res is pending.
func (d *tsDaemon) checkStillBooting(key scaler.SlotKey, id, res, when string) {
	d.t.Helper()
	if s := d.slot(key); s.State != scaler.Booting || s.InstanceID != id || s.Address != "" {
		d.t.Errorf("%s: %s = %s on %s at %q; want booting on %s with no address", when, key, s.State, s.InstanceID, s.Address, id)
	}
	if a := d.reach.Addr(key); a != "" {
		d.t.Errorf("%s: %s bound to %q in the load balancer", when, key, a)
	}
	if r := d.reservation(res); r.State != "pending" {
		d.t.Errorf("%s: %s = %+v, want pending", when, res, r)
	}
}

func (d *tsDaemon) lookups(result string) float64 {
	return d.metric(tsLookups, map[string]string{"source": "tailscale", "result": result})
}

// TestTailscaleBootingToBinding: a reservation launches an instance, whose
// slot stays booting while the tailnet has no node with its host name, and
// while that node is offline; once the node is online the slot binds to
// its Tailscale IPv4 address on port 22, becomes ready, and the
// reservation is ready there.
func TestTailscaleBootingToBinding(t *testing.T) {
	// Another builder is on the tailnet all along; it is never taken.
	other := discoverytest.NewPeer("nOTHER", "nix-builder-i-0fffffffffffffff0", "100.101.0.9", true)
	d := startTailscale(t, other)
	d.create("build-1")
	s := d.waitBooting("")
	id := s.InstanceID
	if s.Name != "slot1" {
		t.Fatalf("booting slot = %s, want slot1", s.Name)
	}
	raw, ok := d.fake.Instance(id)
	if !ok || raw.State.Name != types.InstanceStateNameRunning {
		t.Fatalf("instance %s in the fake = %+v (known %v), want running", id, raw.State, ok)
	}
	host := tsHostname(id)

	// Not on the tailnet yet.
	d.reconcileReading()
	d.clock.Advance(time.Minute)
	d.reconcileReading()
	d.checkStillBooting(ec2Slot1, id, "build-1", "no node "+host)
	if n := d.lookups("absent"); n < 1 {
		t.Errorf("lookups{result=absent} = %v, want some", n)
	}

	// On the tailnet, offline.
	d.ts.SetPeers(other, discoverytest.NewPeer("nB1", host, "100.101.0.1", false))
	d.clock.Advance(time.Minute)
	d.reconcileReading()
	d.reconcileReading()
	d.checkStillBooting(ec2Slot1, id, "build-1", "node "+host+" offline")
	if n := d.lookups("offline"); n < 2 {
		t.Errorf("lookups{result=offline} = %v, want 2 or more", n)
	}

	// Online: bound, ready, the reservation served there.
	d.ts.SetPeers(other, discoverytest.NewPeer("nB1", host, "100.101.0.1", true))
	d.reconcileReading()
	r := d.waitReady("build-1")
	const want = "100.101.0.1:22"
	if r.InstanceID != id || r.Slot != "slot1" || r.Address != want {
		t.Errorf("build-1 = %+v; want ready on %s (slot1) at %s", r, id, want)
	}
	if s := d.slot(ec2Slot1); s.State != scaler.Ready || s.Address != want || s.InstanceID != id {
		t.Errorf("slot1 = %s on %s at %q; want ready on %s at %s", s.State, s.InstanceID, s.Address, id, want)
	}
	if a := d.reach.Addr(ec2Slot1); a != want {
		t.Errorf("slot1 bound to %q in the load balancer, want %s", a, want)
	}
	if got := d.reach.Bound(); !maps.Equal(got, map[scaler.SlotKey]string{ec2Slot1: want}) {
		t.Errorf("bound slots = %v, want only slot1 at %s", got, want)
	}
	if n := d.fake.CallCount(ec2test.OpRun); n != 1 {
		t.Errorf("RunInstances calls = %d, want 1", n)
	}
	evs := d.events(api.EventQuery{Pool: "x86", Slot: "slot1"})
	if got, want := eventKinds(evs), "launched booted bound ready assigned"; got != want {
		t.Errorf("slot1 events = %q, want %q", got, want)
	}
	if n := d.lookups("found"); n < 1 {
		t.Errorf("lookups{result=found} = %v, want some", n)
	}
	if !d.logs.has("INFO", "builder found on the tailnet", "node=nB1", "instance="+id) {
		t.Errorf("no INFO line for the found builder")
	}
}

// TestTailscaleHostnameCollision: two online nodes have the builder's host
// name, so the daemon binds neither (and says why); once one goes offline
// the slot binds to the other.
func TestTailscaleHostnameCollision(t *testing.T) {
	d := startTailscale(t)
	d.create("build-1")
	id := d.waitBooting("").InstanceID
	host := tsHostname(id)

	d.ts.SetPeers(
		discoverytest.NewPeer("nONE", host, "100.101.0.1", true),
		discoverytest.NewPeer("nTWO", host, "100.101.0.2", true))
	for range 3 {
		d.reconcileReading()
		d.clock.Advance(30 * time.Second)
	}
	d.checkStillBooting(ec2Slot1, id, "build-1", "two online nodes "+host)
	if n := d.lookups("ambiguous"); n < 3 {
		t.Errorf("lookups{result=ambiguous} = %v, want 3 or more", n)
	}
	if !d.logs.has("WARN", "several online tailnet nodes", "nONE", "nTWO", "instance="+id) {
		t.Errorf("no WARN line naming both nodes of %s", host)
	}
	if evs := d.events(api.EventQuery{Pool: "x86", Slot: "slot1"}); len(eventsOf(evs, scaler.EvBound)) != 0 {
		t.Errorf("slot1 bound while its host name is ambiguous: %s", eventKinds(evs))
	}

	// The first node goes offline (say, the stale one): the other is taken.
	d.ts.SetPeers(
		discoverytest.NewPeer("nONE", host, "100.101.0.1", false),
		discoverytest.NewPeer("nTWO", host, "100.101.0.2", true))
	d.reconcileReading()
	r := d.waitReady("build-1")
	const want = "100.101.0.2:22"
	if r.InstanceID != id || r.Address != want || d.reach.Addr(ec2Slot1) != want {
		t.Errorf("build-1 = %+v, bound %q; want ready on %s at %s", r, d.reach.Addr(ec2Slot1), id, want)
	}
	if !d.logs.has("INFO", "builder found on the tailnet", "node=nTWO") {
		t.Errorf("no INFO line for node nTWO")
	}
}

// TestTailscaleBuilderNeverAppears: the builder never joins the tailnet.
// Just before boot_timeout its slot is still booting; at boot_timeout the
// instance is terminated and a replacement launched for the reservation,
// which is still pending; the event log says "boot timeout". The
// replacement, once on the tailnet, serves the reservation.
func TestTailscaleBuilderNeverAppears(t *testing.T) {
	other := discoverytest.NewPeer("nOTHER", "nix-builder-i-0fffffffffffffff0", "100.101.0.9", true)
	d := startTailscale(t, other)
	d.create("build-1")
	first := d.waitBooting("")
	key := first.Key()

	d.clock.Advance(tsBootTimeout - time.Second)
	d.reconcileReading()
	d.checkStillBooting(key, first.InstanceID, "build-1", "1s before boot_timeout")
	if raw, _ := d.fake.Instance(first.InstanceID); raw.State.Name != types.InstanceStateNameRunning {
		t.Errorf("%s is %s 1s before boot_timeout, want running", first.InstanceID, raw.State.Name)
	}

	d.clock.Advance(time.Second)
	d.reconcile()
	d.WaitFor(first.InstanceID+" terminated in the fake", func() bool {
		raw, _ := d.fake.Instance(first.InstanceID)
		return raw.State.Name == types.InstanceStateNameTerminated
	})
	second := d.waitBooting(first.InstanceID)
	if n := d.fake.CallCount(ec2test.OpRun); n != 2 {
		t.Errorf("RunInstances calls = %d, want 2 (one replacement)", n)
	}
	if r := d.reservation("build-1"); r.State != "pending" {
		t.Errorf("build-1 = %+v after the boot timeout, want pending", r)
	}
	d.WaitFor(key.String()+" emptied", func() bool {
		s := d.slot(key)
		return s.State == scaler.Empty || s.InstanceID == second.InstanceID
	})

	var term []api.Event
	for _, e := range d.events(api.EventQuery{}) {
		if e.Kind == scaler.EvTerminated && e.InstanceID == first.InstanceID {
			term = append(term, e)
		}
	}
	wantReason := "boot timeout (" + tsBootTimeout.String() + ")"
	if len(term) != 1 || term[0].Reason != wantReason || term[0].Slot != key.Slot {
		t.Errorf("terminated events of %s = %+v, want one on %s with reason %q", first.InstanceID, term, key.Slot, wantReason)
	}
	if got := eventKinds(d.events(api.EventQuery{Reservation: "build-1"})); got != "created" {
		t.Errorf("build-1 events = %q, want only created (it was never assigned)", got)
	}

	// The replacement joins: it serves the reservation.
	d.ts.SetPeers(other, discoverytest.NewPeer("nB2", tsHostname(second.InstanceID), "100.101.0.2", true))
	d.reconcileReading()
	r := d.waitReady("build-1")
	if r.InstanceID != second.InstanceID || r.Slot != second.Name || r.Address != "100.101.0.2:22" {
		t.Errorf("build-1 = %+v; want ready on %s (%s) at 100.101.0.2:22", r, second.InstanceID, second.Name)
	}
	if n := d.fake.CallCount(ec2test.OpRun); n != 2 {
		t.Errorf("RunInstances calls = %d, want 2", n)
	}
}

// TestTailscaleLocalAPIDown: tailscaled stops while a builder boots. No
// slot is terminated for it before boot_timeout, the reservation stays
// pending, and the daemon keeps running and says why; when tailscaled is
// back the builder is bound.
func TestTailscaleLocalAPIDown(t *testing.T) {
	d := startTailscale(t)
	d.create("build-1")
	s := d.waitBooting("")
	id, key := s.InstanceID, s.Key()
	socket := d.ts.Socket
	d.ts.Stop()

	step := (tsBootTimeout - time.Second) / 4
	for i := range 4 {
		d.clock.Advance(step)
		d.reconcile()
		d.checkStillBooting(key, id, "build-1", fmt.Sprintf("LocalAPI down for %s", step*time.Duration(i+1)))
	}
	if raw, _ := d.fake.Instance(id); raw.State.Name != types.InstanceStateNameRunning {
		t.Errorf("%s is %s, want running", id, raw.State.Name)
	}
	if n := d.fake.CallCount(ec2test.OpTerminate); n != 0 {
		t.Errorf("TerminateInstances calls = %d while the LocalAPI is down, want 0", n)
	}
	if n := d.fake.CallCount(ec2test.OpRun); n != 1 {
		t.Errorf("RunInstances calls = %d, want 1", n)
	}
	if evs := eventsOf(d.events(api.EventQuery{}), scaler.EvTerminated); len(evs) != 0 {
		t.Errorf("terminated events while the LocalAPI is down: %+v", evs)
	}
	if st := d.Daemon.Reconciler().Status(); st.Err != nil {
		t.Errorf("last round failed: %v", st.Err)
	}
	ctx := d.ctx()
	if err := d.Client.Health(ctx); err != nil {
		t.Errorf("daemon health with the LocalAPI down: %v", err)
	}
	if n := d.lookups("error"); n < 4 {
		t.Errorf("lookups{result=error} = %v, want 4 or more", n)
	}
	// Logged once a minute: the first failure may be a round cut off by
	// the stop (EOF) rather than the missing socket.
	if !d.logs.has("ERROR", "cannot read the tailnet", socket) {
		t.Errorf("no ERROR line saying the tailnet cannot be read at %s", socket)
	}

	// tailscaled is back, with the builder on the tailnet.
	d.ts = discoverytest.StartAt(t, socket, discoverytest.Status(discoverytest.NewPeer("nB1", tsHostname(id), "100.101.0.1", true)))
	d.reconcileReading()
	r := d.waitReady("build-1")
	if r.InstanceID != id || r.Address != "100.101.0.1:22" {
		t.Errorf("build-1 = %+v; want ready on %s at 100.101.0.1:22", r, id)
	}
	if !d.logs.has("INFO", "tailscale LocalAPI answers again") {
		t.Errorf("no INFO line saying the LocalAPI answers again")
	}
}

// tsLogBuffer collects the daemon's log.
type tsLogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *tsLogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *tsLogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// has reports whether a line at level contains every one of subs.
func (l *tsLogBuffer) has(level string, subs ...string) bool {
	for line := range strings.Lines(l.String()) {
		if strings.Contains(line, "level="+level) &&
			!slices.ContainsFunc(subs, func(s string) bool { return !strings.Contains(line, s) }) {
			return true
		}
	}
	return false
}

// TestTailscaleEC2PoolsInTwoRegions: a daemon with EC2 pools in two
// regions, both found on the tailnet, must start, with one EC2 provider
// (and one discovery wrapper) per region.
//
// Regression: daemon.ec2Providers wraps each region's provider with
// discovery.Wrap, with the daemon's one registry; Wrap used to register its
// collectors with MustRegister, so the second region panicked with
// "duplicate metrics collector registration attempted". It now shares them
// (internal/metrics.RegisterShared).
func TestTailscaleEC2PoolsInTwoRegions(t *testing.T) {
	ts := discoverytest.Start(t)
	pool := fmt.Sprintf(`max_builders = 1

[pool.ec2]
region = "us-east-1"
ami = "ami-0123456789abcdef0"
instance_types = ["m7i.xlarge"]
subnets = [%[1]q]

[[pool]]
name = "arm"
systems = ["aarch64-linux"]
provider = "ec2"
max_builders = 1

[pool.ec2]
region = "eu-west-1"
ami = "ami-0123456789abcdef1"
instance_types = ["m7g.xlarge"]
subnets = [%[2]q]

[tailscale]
socket = %[3]q
`, ec2SubnetA, ec2SubnetB, ts.Socket)
	cfg := daemontest.ConfigProvider(t, config.ProviderEC2, fmt.Sprintf("cluster = %q", ec2Cluster), pool)
	clock := clocktest.New(daemontest.T0)
	var regions []string
	o := daemon.Options{Clock: clock, Readiness: daemontest.NewReachable(), Registry: prometheus.NewRegistry(),
		Logger: slog.New(slog.DiscardHandler),
		EC2: func(region, _ string, pools map[string]ec2prov.PoolOptions) scaler.Provider {
			regions = append(regions, region)
			fake := ec2test.New()
			fake.Now = clock.Now
			p, err := ec2prov.New(fake, ec2prov.Options{Cluster: ec2Cluster, Pools: pools, Clock: clock})
			if err != nil {
				t.Fatalf("ec2 provider over the fake: %v", err)
			}
			return p
		}}
	var d *daemon.Daemon
	var err error
	func() {
		defer func() {
			if p := recover(); p != nil {
				t.Errorf("daemon.New panicked with EC2 pools in two regions using Tailscale discovery: %v", p)
			}
		}()
		d, err = daemon.New(context.Background(), cfg, o)
	}()
	if d == nil {
		if err != nil {
			t.Errorf("daemon.New: %v", err)
		}
		return
	}
	defer d.Store().Close()
	if err != nil {
		t.Fatalf("daemon.New: %v", err)
	}
	if want := []string{"us-east-1", "eu-west-1"}; !slices.Equal(regions, want) {
		t.Errorf("EC2 providers built for regions %v, want %v", regions, want)
	}
	if d.Provider("x86") == d.Provider("arm") {
		t.Errorf("pools in two regions share one provider")
	}
}

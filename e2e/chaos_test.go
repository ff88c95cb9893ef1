package e2e

// The chaos test: the real daemon binary with an EC2 pool on moto_server
// (through ec2Proxy), a real HAProxy on the generated configuration, builders
// played by builderFarm on a fake tailnet, and clients that reserve, connect
// through HAProxy and release, over and over, while faults are injected:
// the daemon killed with SIGKILL (at random moments, and exactly while moto
// has carried out a RunInstances or TerminateInstances whose answer the
// daemon never gets), HAProxy restarted, the SPOA and agent-check listeners
// refusing connections, EC2 out of capacity and throttling, instances
// reclaimed as Spot interruptions would, and Spot interruption warnings on
// the daemon's interruption queue.
//
// The three promises are checked throughout:
//   - never kill a busy builder: every TerminateInstances is checked, before
//     moto carries it out, against the sessions open on that instance and
//     the reservations the clients hold there;
//   - never lose an acknowledged reservation: after every kill the state
//     file (integrity-checked) holds every reservation whose creation the
//     API acknowledged, and every acknowledged release;
//   - never leak an instance: after every restart and one reconcile round,
//     every instance tagged for the cluster is tracked by a slot (by
//     instance id, or by launch id while its launch is in flight) or is
//     terminated; at the end everything scales to zero and every instance
//     is terminated.
//
// and no reservation is assigned to a slot that is not ready (or draining
// after an interruption warning, until its replacement is ready).
//
// The short form runs in `go test ./...`; bench/chaos.sh runs the long form
// (-chaos.duration, -chaos.soak) and writes the figures docs/reliability.md
// reports. The soak phase keeps every fault but the kills, so the daemon's
// goroutines and RSS can be watched over one long-lived process.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsec2 "github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/aws-sdk-go-v2/service/sqs"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

var (
	chaosDuration = flag.Duration("chaos.duration", 40*time.Second, "chaos test: how long faults, kills included, are injected")
	chaosSoak     = flag.Duration("chaos.soak", 20*time.Second, "chaos test: how long the soak phase (every fault but kills) lasts")
	chaosSeed     = flag.Uint64("chaos.seed", 0, "chaos test: random seed (0: from the clock; the seed is logged)")
	chaosWorkers  = flag.Int("chaos.workers", 4, "chaos test: concurrent clients")
	chaosReport   = flag.String("chaos.report", "", "chaos test: write the figures as JSON to this file")
)

const chaosCluster = "chaos"

// Fault kinds, in the report.
const (
	faultKill           = "kill"           // SIGKILL at a random moment
	faultKillLaunch     = "kill-launch"    // SIGKILL while moto holds a RunInstances the daemon never hears of
	faultKillTerminate  = "kill-terminate" // same for TerminateInstances
	faultHAProxyRestart = "haproxy-restart"
	faultListeners      = "listeners-refuse" // SPOA and/or agent-check refuse connections for a while
	faultCapacity       = "capacity-outage"  // every RunInstances: InsufficientInstanceCapacity for a while
	faultThrottle       = "throttle-burst"   // most EC2 calls: RequestLimitExceeded for a while
	faultReclaim        = "reclaim"          // an instance terminated behind the daemon's back
	faultHostile        = "hostile-traffic"  // malformed SPOP frames, idle and slow clients on every listener
)

var chaosFaults = []string{faultKill, faultKillLaunch, faultKillTerminate, faultHAProxyRestart,
	faultListeners, faultCapacity, faultThrottle, faultReclaim, faultHostile, faultWarning}

// Client-side reservation states.
const (
	resAcked     = iota // the API acknowledged its creation
	resReleasing        // the client started releasing it
	resReleased         // the API acknowledged the release
)

type chaosRes struct {
	state    int
	instance string // the instance the client last saw it ready on
	stale    bool   // that instance was reclaimed: the client asks again
}

type chaosSession struct {
	instance string
	closing  bool
}

// chaosReportData is what the run measured; bench/chaos.sh keeps it.
type chaosReportData struct {
	Seed              uint64         `json:"seed"`
	Duration          string         `json:"duration"`
	Soak              string         `json:"soak"`
	Workers           int            `json:"workers"`
	Cycles            int            `json:"cycles"`           // reservations created, served and released
	Sessions          int            `json:"sessions"`         // client connections through HAProxy that reached a builder
	Faults            map[string]int `json:"faults"`           // fault windows and kills by kind
	InjectedErrors    map[string]int `json:"injected_errors"`  // EC2 error answers by code
	EC2Calls          map[string]int `json:"ec2_calls"`        // requests by action
	Instances         int            `json:"instances"`        // instances moto launched
	Terminations      int            `json:"terminations"`     // TerminateInstances calls checked
	Checks            int            `json:"invariant_checks"` // state-file, restart and terminate checks
	Violations        []string       `json:"violations"`
	SoakSamples       int            `json:"soak_samples"`
	GoroutinesFirst   float64        `json:"soak_goroutines_first"`
	GoroutinesLast    float64        `json:"soak_goroutines_last"`
	GoroutinesMax     float64        `json:"soak_goroutines_max"`
	RSSFirstMiB       float64        `json:"soak_rss_first_mib"`
	RSSLastMiB        float64        `json:"soak_rss_last_mib"`
	RSSMaxMiB         float64        `json:"soak_rss_max_mib"`
	ElapsedSeconds    float64        `json:"elapsed_seconds"`
	DaemonIncarnation int            `json:"daemon_starts"`
	NoticeEvents      int            `json:"notice_events"` // interruption warnings the daemon recorded
}

type chaos struct {
	t        *testing.T
	dir      string
	cfgPath  string
	sock     string
	metrics  string
	frontend string
	moto     *ec2test.Moto
	proxy    *ec2Proxy
	farm     *builderFarm
	hp       *haproxytest.Instance
	agent    *flakyPort
	spoa     *flakyPort
	// The daemon's own agent-check and SPOE ports, behind the flaky ones.
	daemonAgent, daemonSPOA string
	d                       *daemonProc
	rng                     *rand.Rand

	// calls counts client calls that can be acknowledged (create,
	// release) from just before they are sent until their answer is
	// recorded: after a kill the state file is read once it is zero, so no
	// acknowledgement is in the air.
	calls atomic.Int64
	// finishCtx bounds what clients do after the chaos (releases); over
	// when the test ends.
	finishCtx context.Context
	// over is set when the test function returns: clients still running
	// then (after a failure) must not report to it.
	over atomic.Bool

	mu        sync.Mutex
	res       map[string]*chaosRes
	sessions  map[string]*chaosSession
	reclaimed map[string]bool
	// warned are the builders an interruption warning was sent for; sqs
	// and queue are the interruption queue's client and URL.
	warned     map[string]bool
	sqs        *sqs.Client
	queue      string
	violations []string
	report     chaosReportData
}

func (c *chaos) violate(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	c.mu.Lock()
	c.violations = append(c.violations, msg)
	c.mu.Unlock()
	if !c.over.Load() {
		c.t.Errorf("INVARIANT VIOLATED: %s", msg)
	}
}

func (c *chaos) count(f func(r *chaosReportData)) {
	c.mu.Lock()
	f(&c.report)
	c.mu.Unlock()
}

func TestChaos(t *testing.T) {
	seed := *chaosSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("chaos seed %d (rerun with -chaos.seed=%d), %s of faults with kills, %s soak, %d clients",
		seed, seed, *chaosDuration, *chaosSoak, *chaosWorkers)
	c := startChaos(t, seed)
	defer c.over.Store(true)
	start := time.Now()

	workCtx, stopWork := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for w := range *chaosWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.worker(workCtx, w, rand.New(rand.NewPCG(seed, uint64(w)+1)))
		}()
	}

	c.inject(start.Add(*chaosDuration), start.Add(*chaosDuration+*chaosSoak))

	stopWork()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		t.Fatal("clients did not finish within 5 minutes of the end of the chaos")
	}
	c.finish()
	c.report.ElapsedSeconds = time.Since(start).Seconds()
	c.writeReport()
	// The invariants must have had something to bite on.
	if c.report.Cycles == 0 || c.report.Sessions == 0 || c.report.Terminations == 0 {
		t.Errorf("cycles %d, sessions %d, checked terminations %d: the run exercised too little",
			c.report.Cycles, c.report.Sessions, c.report.Terminations)
	}
	for _, f := range chaosFaults {
		if c.report.Faults[f] == 0 {
			// Timing decides whether a targeted kill finds its moment in a
			// short run; that says nothing about the daemon.
			t.Logf("fault %s did not happen in this run", f)
		}
	}
}

// startChaos starts moto's proxy, the farm, the flaky ports, HAProxy and the
// daemon.
func startChaos(t *testing.T, seed uint64) *chaos {
	dir := shortDir(t)
	// moto first: it must not inherit the empty AWS settings below.
	m := ec2test.StartMoto(t)
	// The daemon signs with dummy credentials when an endpoint is set;
	// nothing of this machine's AWS set-up may reach it.
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           "",
		"AWS_SECRET_ACCESS_KEY":       "",
		"AWS_SESSION_TOKEN":           "",
		"AWS_PROFILE":                 "",
		"AWS_CONFIG_FILE":             filepath.Join(dir, "aws-config"),
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "aws-credentials"),
		"AWS_EC2_METADATA_DISABLED":   "true",
		"AWS_ENDPOINT_URL":            "",
		"AWS_ENDPOINT_URL_EC2":        "",
	} {
		t.Setenv(k, v)
	}
	subnets := m.DefaultSubnets(t)
	port := func() int { return lowPort(t) }
	finishCtx, cancelFinish := context.WithCancel(context.Background())
	t.Cleanup(cancelFinish)
	c := &chaos{finishCtx: finishCtx, t: t, dir: dir, moto: m, rng: rand.New(rand.NewPCG(seed, 0xc4a05)),
		res: map[string]*chaosRes{}, sessions: map[string]*chaosSession{}, reclaimed: map[string]bool{}, warned: map[string]bool{},
		report: chaosReportData{Seed: seed, Duration: chaosDuration.String(), Soak: chaosSoak.String(), Workers: *chaosWorkers,
			Faults: map[string]int{}}}
	c.sock = filepath.Join(dir, "d.sock")
	c.metrics = fmt.Sprintf("127.0.0.1:%d", port())
	c.frontend = fmt.Sprintf("127.0.0.1:%d", port())
	c.farm = newBuilderFarm(t, port(), seed)
	c.proxy = newEC2Proxy(t, m.Endpoint, seed)
	c.proxy.setRates(0.03, 0.10)
	c.proxy.onLaunched = func(ids []string) {
		c.count(func(r *chaosReportData) { r.Instances += len(ids) })
		c.farm.launched(ids)
	}
	c.proxy.beforeTerminate = c.checkTerminate
	c.proxy.afterTerminate = func(ids []string) {
		for _, id := range ids {
			c.farm.stop(id)
		}
	}

	queue := c.startQueue(m.Endpoint)
	hdir := haproxytest.Dir(t)
	agentPort, spoaPort := port(), port()
	text := func(agent, spoa string) string {
		return fmt.Sprintf(`[daemon]
socket = %[1]q
state_dir = "%[2]s/state"
metrics_listen = %[3]q
reconcile_interval = "1s"
cluster = %[4]q

[haproxy]
runtime_socket = "%[5]s/admin.sock"
agent_listen = %[6]q
spoa_listen = %[7]q
stats_listen = "127.0.0.1:%[8]d"
state_file = "%[5]s/state"
log = "stdout"
placeholder = "127.0.0.254:9"
hold = "3s"
check_interval = "200ms"

[tailscale]
socket = %[9]q

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
provider = "ec2"
frontend = %[10]q
max_builders = 3
idle_timeout = "1s"
boot_timeout = "20s"
bind_timeout = "20s"
drain_timeout = "10m"

[pool.ec2]
region = "us-east-1"
endpoint = %[11]q
ami = %[12]q
instance_types = ["m7i.xlarge", "m6i.xlarge"]
subnets = [%[13]q, %[14]q]
on_demand_fallback = true
unavailable_for = "2s"
discovery = "tailscale"
ssh_port = %[15]d
interruption_queue = %[16]q
`, c.sock, dir, c.metrics, chaosCluster, hdir, agent, spoa, port(), c.farm.ts.Socket, c.frontend,
			c.proxy.URL(), ec2test.MotoAMI, subnets[0].ID, subnets[1].ID, c.farm.port, queue)
	}
	// The daemon listens on its own ports; HAProxy reaches them through
	// the flaky ports.
	daemonAgent, daemonSPOA := fmt.Sprintf("127.0.0.1:%d", port()), fmt.Sprintf("127.0.0.1:%d", port())
	c.daemonAgent, c.daemonSPOA = daemonAgent, daemonSPOA
	c.agent = newFlakyPort(t, fmt.Sprintf("127.0.0.1:%d", agentPort), daemonAgent)
	c.spoa = newFlakyPort(t, fmt.Sprintf("127.0.0.1:%d", spoaPort), daemonSPOA)
	c.cfgPath = filepath.Join(dir, "config.toml")
	if err := os.WriteFile(c.cfgPath, []byte(text(daemonAgent, daemonSPOA)), 0o600); err != nil {
		t.Fatal(err)
	}
	hcfg, err := config.Parse([]byte(text(c.agent.addr, c.spoa.addr)))
	if err != nil {
		t.Fatalf("chaos config: %v", err)
	}
	c.hp = startHAProxy(t, hdir, hcfg, nil)
	c.d = startDaemon(t, c.cfgPath, dir)
	c.report.DaemonIncarnation = 1
	return c
}

// lowPort returns a loopback port, free a moment ago, below Linux's
// ephemeral range (32768 and up by default): ports this test closes and
// binds again (daemon restarts, HAProxy restarts) must not be taken by an
// outgoing connection meanwhile.
func lowPort(t testing.TB) int {
	t.Helper()
	for range 1000 {
		p := 20000 + rand.IntN(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err == nil {
			l.Close()
			return p
		}
	}
	t.Fatal("no free loopback port in 20000..31999")
	return 0
}

// retry calls f until it succeeds, the daemon says no (a 4xx answer: a
// bug, returned), or ctx ends. Failures to reach the daemon are expected
// while it is dead.
func retry(ctx context.Context, f func(ctx context.Context) error) error {
	for i := 0; ; i++ {
		cctx, cancel := context.WithTimeout(ctx, 45*time.Second)
		err := f(cctx)
		cancel()
		if err == nil {
			return nil
		}
		var ae *api.APIError
		if errors.As(err, &ae) && ae.Status < 500 {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		}
		if i >= 5000 {
			return fmt.Errorf("gave up after %d attempts: %w", i+1, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// worker reserves, waits, connects through HAProxy and releases, like a
// Buildbot nix-build step, until ctx ends.
func (c *chaos) worker(ctx context.Context, w int, rng *rand.Rand) {
	cl := api.NewUnixClient(c.sock)
	// The release of a reservation the worker holds must happen even
	// after ctx ends.
	finish := c.finishCtx
	for n := 1; ctx.Err() == nil; n++ {
		waitActive(ctx)
		id := fmt.Sprintf("w%d-%d", w, n)
		err := retry(ctx, func(ctx context.Context) error {
			c.calls.Add(1)
			defer c.calls.Add(-1)
			_, _, err := cl.CreateReservation(ctx, api.CreateReservationRequest{ID: id, System: "x86_64-linux", Owner: "chaos", Lease: "30m"})
			if err == nil {
				c.mu.Lock()
				c.res[id] = &chaosRes{state: resAcked}
				c.mu.Unlock()
			}
			return err
		})
		if err != nil {
			if ctx.Err() == nil {
				c.violate("create %s: %v", id, err)
			}
			// It may have been created all the same: release it.
			c.release(finish, cl, id)
			return
		}

		if c.awaitReady(ctx, cl, id) {
			ms := func(lo, n int) time.Duration { return time.Duration(lo+rng.IntN(n)) * time.Millisecond }
			switch rng.IntN(4) {
			case 0: // no connection
				time.Sleep(ms(0, 1500))
			case 1:
				// A connection that outlives its reservation, past
				// idle_timeout (1s): only the session keeps the builder.
				c.session(cl, id, ms(1500, 2500), true)
			default:
				c.session(cl, id, ms(0, 1500), false)
			}
		}
		c.release(finish, cl, id)
		time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
	}
}

// Demand comes in waves, so that builders go idle, drain and terminate
// between them and the next wave launches new ones: clients start cycles
// only in the first waveActive of every wavePeriod.
const (
	wavePeriod = 10 * time.Second
	waveActive = 6 * time.Second
)

func waitActive(ctx context.Context) {
	if into := time.Duration(time.Now().UnixNano()) % wavePeriod; into >= waveActive {
		select {
		case <-ctx.Done():
		case <-time.After(wavePeriod - into):
		}
	}
}

// awaitReady waits until reservation id is ready and records its instance.
func (c *chaos) awaitReady(ctx context.Context, cl *api.Client, id string) bool {
	var r api.Reservation
	err := retry(ctx, func(ctx context.Context) error {
		var err error
		r, err = cl.WaitReady(ctx, id, 10*time.Second)
		return err
	})
	if err != nil {
		if ctx.Err() == nil {
			c.violate("wait for reservation %s: %v", id, err)
		}
		return false
	}
	if r.State != "ready" {
		c.violate("reservation %s ended %s (%s) while its client held it", id, r.State, r.Reason)
		return false
	}
	c.mu.Lock()
	c.res[id].instance, c.res[id].stale = r.InstanceID, false
	c.mu.Unlock()
	return true
}

// relearn follows a reservation whose builder was reclaimed until the
// daemon has it ready on another builder, which its client then holds.
func (c *chaos) relearn(id string) {
	cl := api.NewUnixClient(c.sock)
	ctx, cancel := context.WithTimeout(c.finishCtx, 2*time.Minute)
	defer cancel()
	for ctx.Err() == nil {
		var r api.Reservation
		if err := retry(ctx, func(ctx context.Context) error {
			var err error
			r, err = cl.WaitReady(ctx, id, 5*time.Second)
			return err
		}); err != nil {
			return
		}
		c.mu.Lock()
		res := c.res[id]
		done := res.state != resAcked || r.State != "ready"
		if !done && !c.reclaimed[r.InstanceID] && !c.warned[r.InstanceID] {
			res.instance, res.stale, done = r.InstanceID, false, true
		}
		c.mu.Unlock()
		if done {
			return
		}
		time.Sleep(100 * time.Millisecond) // the daemon has not seen the reclaim yet
	}
}

// session connects through HAProxy's frontend, identifies itself to the
// builder it reaches and holds the connection for hold. With releaseFirst
// the reservation is released while the connection is still open (only
// the session then keeps the builder).
func (c *chaos) session(cl *api.Client, id string, hold time.Duration, releaseFirst bool) {
	conn, err := net.DialTimeout("tcp", c.frontend, 5*time.Second)
	if err != nil {
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 256)
	n, err := io.ReadAtLeast(conn, buf, 1)
	line := string(buf[:n])
	_, inst, found := strings.Cut(strings.TrimSpace(line), " chaos-")
	if err != nil || !found {
		return // rejected (no builder UP in time), or HAProxy restarted
	}
	sid := id + "/s"
	c.mu.Lock()
	c.sessions[sid] = &chaosSession{instance: inst}
	c.report.Sessions++
	c.mu.Unlock()
	if _, err := fmt.Fprintf(conn, "%s%s\r\n", sessionPrefix, sid); err != nil {
		c.closeSession(sid)
		return
	}
	if releaseFirst {
		c.release(c.finishCtx, cl, id)
	}
	time.Sleep(hold)
	c.closeSession(sid)
	conn.Close()
}

func (c *chaos) closeSession(sid string) {
	c.mu.Lock()
	c.sessions[sid].closing = true
	c.mu.Unlock()
}

// release releases id until the daemon acknowledges it; idempotent.
func (c *chaos) release(ctx context.Context, cl *api.Client, id string) {
	c.mu.Lock()
	r := c.res[id]
	if r != nil {
		if r.state == resReleased {
			c.mu.Unlock()
			return
		}
		r.state = resReleasing
	}
	c.mu.Unlock()
	err := retry(ctx, func(ctx context.Context) error {
		c.calls.Add(1)
		defer c.calls.Add(-1)
		_, err := cl.Release(ctx, id)
		if err == nil && r != nil {
			c.mu.Lock()
			r.state = resReleased
			c.report.Cycles++
			c.mu.Unlock()
		}
		return err
	})
	if err != nil && ctx.Err() == nil {
		c.violate("release %s: %v", id, err)
	}
}

// checkTerminate runs before moto terminates ids: none may hold an open
// client session or a reservation its client holds (unless it was
// reclaimed, i.e. already gone).
func (c *chaos) checkTerminate(ids []string) {
	for _, id := range ids {
		open := c.farm.sessions(id)
		c.mu.Lock()
		c.report.Terminations++
		c.report.Checks++
		if c.reclaimed[id] {
			c.mu.Unlock()
			continue
		}
		var busy []string
		for _, sid := range open {
			if s := c.sessions[sid]; s != nil && !s.closing {
				busy = append(busy, "session "+sid)
			}
		}
		for rid, r := range c.res {
			if r.state == resAcked && r.instance == id && !r.stale {
				busy = append(busy, "reservation "+rid)
			}
		}
		c.mu.Unlock()
		if len(busy) > 0 {
			slices.Sort(busy)
			c.violate("TerminateInstances %s while it serves %s", id, strings.Join(busy, ", "))
		}
	}
}

// inject runs faults, one after another in a shuffled order that uses
// every kind, until soakEnd; kills only until chaosEnd.
func (c *chaos) inject(chaosEnd, soakEnd time.Time) {
	var bag []string
	next := func(soak bool) string {
		for {
			if len(bag) == 0 {
				bag = slices.Clone(chaosFaults)
				c.rng.Shuffle(len(bag), func(i, j int) { bag[i], bag[j] = bag[j], bag[i] })
			}
			f := bag[0]
			bag = bag[1:]
			if !soak || !strings.HasPrefix(f, "kill") {
				return f
			}
		}
	}
	start, lastProgress := time.Now(), time.Now()
	for time.Now().Before(soakEnd) {
		soak := !time.Now().Before(chaosEnd)
		if time.Since(lastProgress) >= time.Minute {
			lastProgress = time.Now()
			c.mu.Lock()
			c.t.Logf("chaos %s: %d cycles, %d faults, %d daemon starts, %d violations, soak %v",
				time.Since(start).Round(time.Second), c.report.Cycles, sum(c.report.Faults), c.report.DaemonIncarnation, len(c.violations), soak)
			c.mu.Unlock()
		}
		want := next(soak)
		f := c.fault(want)
		c.count(func(r *chaosReportData) { r.Faults[f]++ })
		if f != want {
			// Its moment did not come (no launch, no termination, no
			// running builder): try that kind again later.
			bag = append(bag, want)
		}
		pause := time.Duration(500+c.rng.IntN(2000)) * time.Millisecond
		if soak {
			c.sample()
		}
		time.Sleep(pause)
	}
	c.sample()
}

// fault injects f and returns what it did: a targeted kill whose moment
// did not come within 15 s became a kill at a random moment.
func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func (c *chaos) fault(f string) string {
	switch f {
	case faultKill:
		c.killAndRestart(nil)
	case faultKillLaunch, faultKillTerminate:
		action := actRun
		if f == faultKillTerminate {
			action = actTerminate
		}
		tr := c.proxy.setTrap(action)
		select {
		case <-tr.fired:
		case <-time.After(15 * time.Second):
			f = faultKill
		}
		c.killAndRestart(tr)
	case faultHAProxyRestart:
		c.hp.Restart()
	case faultListeners:
		ports := [][]*flakyPort{{c.agent}, {c.spoa}, {c.agent, c.spoa}}[c.rng.IntN(3)]
		for _, p := range ports {
			p.refuse()
		}
		time.Sleep(time.Duration(500+c.rng.IntN(2500)) * time.Millisecond)
		for _, p := range ports {
			p.reopen()
		}
	case faultCapacity:
		c.proxy.outageFor(time.Duration(1000+c.rng.IntN(3000)) * time.Millisecond)
	case faultThrottle:
		c.proxy.throttleFor(time.Duration(1000+c.rng.IntN(2000)) * time.Millisecond)
	case faultHostile:
		c.hostileTraffic()
	case faultWarning:
		f = c.interruptionWarning()
	case faultReclaim:
		running := c.farm.running()
		if len(running) == 0 {
			return "reclaim-nothing"
		}
		id := running[c.rng.IntN(len(running))]
		c.mu.Lock()
		c.reclaimed[id] = true
		var stale []string
		for rid, r := range c.res {
			if r.instance == id && r.state == resAcked {
				r.stale = true
				stale = append(stale, rid)
			}
		}
		c.mu.Unlock()
		for _, rid := range stale {
			go c.relearn(rid)
		}
		if _, err := c.moto.Client.TerminateInstances(context.Background(), &awsec2.TerminateInstancesInput{InstanceIds: []string{id}}); err != nil {
			c.t.Fatalf("reclaim %s in moto: %v", id, err)
		}
		c.farm.stop(id)
	}
	return f
}

// killAndRestart kills the daemon (SIGKILL), checks its state file, starts
// it again and checks that it tracks every instance after one round. tr, if
// set, is a trap holding an answer, dropped once the daemon is dead.
func (c *chaos) killAndRestart(tr *trap) {
	c.d.kill()
	if tr != nil {
		c.proxy.disarm(tr)
	}
	// Let what the dead daemon started settle: EC2 calls moto is still
	// carrying out, and client calls whose answers are being recorded. The
	// state file is read only then: an acknowledgement still in the air
	// would look lost.
	testwait.Until(c.t, "EC2 calls and client calls of the killed daemon to settle", func() bool {
		return c.proxy.inflight.Load() == 0 && c.calls.Load() == 0
	})
	cutOff := c.checkStateFile(false)
	time.Sleep(time.Duration(c.rng.IntN(500)) * time.Millisecond)
	c.d = startDaemon(c.t, c.cfgPath, c.dir)
	c.count(func(r *chaosReportData) { r.DaemonIncarnation++ })
	c.checkTracked(cutOff)
}

// checkStateFile opens the dead daemon's state file: it must pass SQLite's
// integrity check, hold every reservation the API acknowledged (and every
// acknowledged release), and assign reservations only to ready slots. With
// final, every reservation must be released. It returns the launch ids of
// the launches the kill cut off (launching slots without an instance).
func (c *chaos) checkStateFile(final bool) (cutOff map[string]bool) {
	cutOff = map[string]bool{}
	ctx := context.Background()
	db, err := store.Open(ctx, filepath.Join(c.dir, "state", "state.db"))
	if err != nil {
		c.violate("open the state file after kill -9: %v", err)
		return cutOff
	}
	defer db.Close()
	c.count(func(r *chaosReportData) { r.Checks++ })
	if err := db.IntegrityCheck(ctx); err != nil {
		c.violate("state file after kill -9: %v", err)
	}
	slots, err := db.Slots(ctx)
	if err != nil {
		c.violate("read slots: %v", err)
		return cutOff
	}
	bySlot := map[scaler.SlotKey]scaler.Slot{}
	for _, s := range slots {
		bySlot[s.Key()] = s
		if s.State == scaler.Launching && s.InstanceID == "" {
			cutOff[s.LaunchID] = true
		}
	}
	live, err := db.LiveReservations(ctx)
	if err != nil {
		c.violate("read reservations: %v", err)
		return cutOff
	}
	for _, r := range live {
		if r.State != scaler.Assigned {
			continue
		}
		// A warned builder drains at once and keeps its reservations
		// until its replacement is ready.
		s := bySlot[scaler.SlotKey{Pool: r.Pool, Slot: r.Slot}]
		if s.State != scaler.Ready && (s.State != scaler.Draining || s.DrainReason != scaler.DrainInterrupted) {
			c.violate("reservation %s is assigned to slot %s/%s, which is %s, not ready", r.ID, r.Pool, r.Slot, s.State)
		}
	}
	// The clients' view, taken after the kill: every acknowledgement it
	// holds came from a commit before the kill.
	c.mu.Lock()
	want := map[string]int{}
	for id, r := range c.res {
		want[id] = r.state
	}
	c.mu.Unlock()
	for id, st := range want {
		r, err := db.Reservation(ctx, id)
		if errors.Is(err, scaler.ErrNotFound) {
			c.violate("acknowledged reservation %s is not in the state file", id)
			continue
		}
		if err != nil {
			c.violate("read reservation %s: %v", id, err)
			continue
		}
		ended := r.State != scaler.Pending && r.State != scaler.Assigned
		switch {
		case st == resReleased && r.State != scaler.Released:
			c.violate("reservation %s: release acknowledged, state file says %s", id, r.State)
		case st == resAcked && ended:
			c.violate("reservation %s held by its client is %s in the state file (%s)", id, r.State, r.Reason)
		case final && r.State != scaler.Released:
			c.violate("reservation %s is %s at the end, want released", id, r.State)
		}
	}
	return cutOff
}

// checkTracked runs one reconcile round and then requires every instance
// tagged for the cluster that is not terminated to be tracked by a slot: by
// its instance id, or by its launch id while the new daemon launches it.
// An instance of a launch the kill cut off (cutOff) must have been adopted
// by that one round.
func (c *chaos) checkTracked(cutOff map[string]bool) {
	ctx := context.Background()
	cl := api.NewUnixClient(c.sock)
	if err := retry(ctx, func(ctx context.Context) error { _, err := cl.Reconcile(ctx); return err }); err != nil {
		c.violate("reconcile after restart: %v", err)
		return
	}
	c.count(func(r *chaosReportData) { r.Checks++ })
	// Moto first: an instance launched after this read cannot be missed,
	// and one launched before it has its launch id in its slot since
	// before the launch.
	alive := c.clusterInstances(false)
	var slots api.SlotList
	if err := retry(ctx, func(ctx context.Context) error { var err error; slots, err = cl.Slots(ctx); return err }); err != nil {
		c.violate("slots after restart: %v", err)
		return
	}
	tracked := map[string]bool{}
	for _, s := range slots.Slots {
		if s.InstanceID != "" {
			tracked[s.InstanceID] = true
		} else if s.LaunchID != "" {
			// Launching: its instance is known by launch id only.
			tracked["launch:"+s.LaunchID] = true
		}
	}
	for _, in := range alive {
		id := aws.ToString(in.InstanceId)
		launch := ec2test.Tags(in.Tags)[ec2prov.TagLaunchID]
		if tracked[id] || tracked["launch:"+launch] && !cutOff[launch] {
			continue
		}
		// Terminated since the read above?
		if st := ec2test.State(c.moto.Describe(c.t, id)); st == types.InstanceStateNameTerminated || st == types.InstanceStateNameShuttingDown {
			continue
		}
		c.violate("instance %s (%s) is neither tracked by a slot nor terminated one reconcile after a restart", id, ec2test.State(in))
	}
}

// clusterInstances lists the instances tagged for the cluster; with all
// false, only those not terminated or shutting down.
func (c *chaos) clusterInstances(all bool) []types.Instance {
	ins := c.moto.Instances(c.t, types.Filter{Name: aws.String("tag:" + ec2prov.TagCluster), Values: []string{chaosCluster}})
	if all {
		return ins
	}
	var out []types.Instance
	for _, in := range ins {
		if st := ec2test.State(in); st != types.InstanceStateNameTerminated && st != types.InstanceStateNameShuttingDown {
			out = append(out, in)
		}
	}
	return out
}

// sample reads the daemon's goroutines and RSS (soak phase).
func (c *chaos) sample() {
	hc := http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + c.metrics + "/metrics")
	if err != nil {
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	var g, rss float64
	for _, l := range strings.Split(string(body), "\n") {
		name, val, ok := strings.Cut(l, " ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			continue
		}
		switch name {
		case "go_goroutines":
			g = v
		case "process_resident_memory_bytes":
			rss = v / (1 << 20)
		}
	}
	if g == 0 || rss == 0 {
		return
	}
	c.count(func(r *chaosReportData) {
		if r.SoakSamples == 0 {
			r.GoroutinesFirst, r.RSSFirstMiB = g, rss
		}
		r.SoakSamples++
		r.GoroutinesLast, r.RSSLastMiB = g, rss
		r.GoroutinesMax, r.RSSMaxMiB = max(r.GoroutinesMax, g), max(r.RSSMaxMiB, rss)
	})
}

// finish stops the faults, waits for the fleet to scale to zero, stops the
// daemon and checks that nothing leaked and nothing was lost.
func (c *chaos) finish() {
	c.proxy.setRates(0, 0)
	for _, p := range []*flakyPort{c.agent, c.spoa} {
		p.reopen()
	}
	cl := api.NewUnixClient(c.sock)
	idle := func() bool {
		slots, err := cl.Slots(context.Background())
		if err != nil {
			return false
		}
		for _, s := range slots.Slots {
			if s.State != string(scaler.Empty) {
				return false
			}
		}
		return len(c.clusterInstances(false)) == 0
	}
	// Bounded (a hang guard, as in testwait): what is not idle then is
	// reported below, leaked instances and busy slots by name.
	testwait.Poll(max(testwait.Bound, 3*time.Minute), idle)
	for _, in := range c.clusterInstances(false) {
		c.violate("instance %s is %s after the fleet went idle: leaked", aws.ToString(in.InstanceId), ec2test.State(in))
	}
	c.countNotices(cl)
	if slots, err := cl.Slots(context.Background()); err == nil {
		for _, s := range slots.Slots {
			if s.State != string(scaler.Empty) {
				c.violate("slot %s is %s (%s) after the fleet went idle", s.Slot, s.State, s.InstanceID)
			}
		}
	}
	if up := c.farm.running(); len(up) > 0 {
		c.violate("hosts still up for instances %v after scale to zero", up)
	}
	c.d.stop(c.t)
	c.checkStateFile(true)
	c.count(func(r *chaosReportData) { r.Instances = len(c.clusterInstances(true)) })
}

func (c *chaos) writeReport() {
	injected, calls := c.proxy.counts()
	c.mu.Lock()
	c.report.InjectedErrors, c.report.EC2Calls = injected, calls
	c.report.Violations = slices.Clone(c.violations)
	if c.report.Violations == nil {
		c.report.Violations = []string{}
	}
	out, _ := json.MarshalIndent(c.report, "", "  ")
	c.mu.Unlock()
	c.t.Logf("chaos figures:\n%s", out)
	if *chaosReport != "" {
		if err := os.WriteFile(*chaosReport, append(out, '\n'), 0o644); err != nil {
			c.t.Error(err)
		}
	}
}

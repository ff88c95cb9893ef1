// Package spoa is the SPOE agent HAProxy calls on every new builder
// connection (docs/design.md §3.3). It records demand, picks the slot the
// connection should go to, and when a pool has no room it asks the scaler
// for a builder and holds the connection until one is ready or the hold
// limit passes. The message, its arguments and the variables it sets are
// package wire's, which the HAProxy configuration generator writes.
//
// github.com/negasus/haproxy-spoe-go v1.0.7 encodes only some values safely:
// a negative integer panics its encoder (killing the process), and net.IP or
// float64 values make it silently drop the ACK. This agent only ever sets
// string variables, and recovers panics in its handler. Its decoder trusts
// the peer just as much, so it only reads frames the guard (guard.go) has
// bounded and checked.
package spoa

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/negasus/haproxy-spoe-go/action"
	"github.com/negasus/haproxy-spoe-go/agent"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/spoa/wire"
)

// Options configures an Agent.
type Options struct {
	// MaxJobs is each pool's max_jobs: the most connections a builder takes.
	MaxJobs map[string]int
	// Hold bounds how long a connection waits for a builder when its pool
	// has no room; it must stay under SPOE's timeout processing.
	Hold time.Duration
	// Kick asks the scaler for a round (a held connection is new demand).
	Kick   func()
	Logger *slog.Logger
	// Registerer takes the agent's metrics (nil: not registered).
	Registerer prometheus.Registerer
	// Clock times decisions and holds (nil: clock.Real).
	Clock clock.Clock
	// Guard bounds each HAProxy connection (guard.go); zero fields take
	// the defaults.
	Guard GuardOptions
}

// slotView is what the agent knows of one slot between two reconcile rounds.
type slotView struct {
	name         string
	usable       bool // ready and weight > 0
	sessions     int
	reservations int
}

// Agent is the SPOE agent. Its view of the fleet is refreshed by Update after
// each reconcile round; between rounds it counts the connections it sent
// itself, so a burst is spread over the builders.
type Agent struct {
	o     Options
	m     *metrics
	guard *guard

	mu      sync.Mutex
	pools   map[string][]slotView
	picks   map[scaler.SlotKey]int
	held    map[string]int
	changed chan struct{}
}

// New returns an agent; Serve runs it.
func New(o Options) *Agent {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Kick == nil {
		o.Kick = func() {}
	}
	if o.Clock == nil {
		o.Clock = clock.Real{}
	}
	a := &Agent{o: o, pools: map[string][]slotView{},
		picks: map[scaler.SlotKey]int{}, held: map[string]int{}, changed: make(chan struct{})}
	a.guard = newGuard(o.Guard, a.refused)
	a.m = newMetrics(o.Registerer, a.guard)
	return a
}

// refused counts and logs a connection the guard closed.
func (a *Agent) refused(remote net.Addr, err *protocolError) {
	a.m.guardClosed.WithLabelValues(err.reason.String()).Inc()
	a.o.Logger.Warn("spoa: closed a malformed or stalled SPOE connection", "remote", remote.String(),
		"reason", err.reason.String(), "detail", err.detail)
}

// Update replaces the agent's routing table with the fleet as the
// reconciler's latest view shows it, and wakes held connections.
func (a *Agent) Update(v *scaler.View) {
	pools := map[string][]slotView{}
	for _, s := range v.Slots {
		sv := slotView{name: s.Name, reservations: v.Assigned(s.Key())}
		srv, ok := v.Servers[s.Key()]
		// Without the load balancer's word a slot is not known to be up.
		sv.usable = s.State == scaler.Ready && s.Weight > 0 && v.ServersKnown && ok && srv.Up && srv.Addr == s.Address
		sv.sessions = srv.Sessions
		pools[s.Pool] = append(pools[s.Pool], sv)
	}
	a.mu.Lock()
	a.pools = pools
	a.picks = map[scaler.SlotKey]int{}
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// Held returns, per pool, the connections waiting for a builder: demand that
// came without a reservation.
func (a *Agent) Held() map[string]int {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]int, len(a.held))
	for p, n := range a.held {
		if n > 0 {
			out[p] = n
		}
	}
	return out
}

// Serve answers HAProxy on ln until ctx ends; then it closes the listener
// and every connection HAProxy opened, so HAProxy sees the agent gone.
func (a *Agent) Serve(ctx context.Context, ln net.Listener) error {
	tl := &trackingListener{Listener: ln, guard: a.guard, conns: map[net.Conn]struct{}{}}
	stop := context.AfterFunc(ctx, tl.closeAll)
	defer stop()
	err := agent.New(a.handle, spoeLogger{a.o.Logger}).Serve(tl)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// trackingListener remembers accepted connections so that they can be
// closed with the listener (the SPOE library does not track them), and
// hands the library each one behind the guard.
type trackingListener struct {
	net.Listener
	guard  *guard
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	tc := &trackedConn{Conn: c, l: l}
	l.conns[tc] = struct{}{}
	return l.guard.wrap(tc, c), nil
}

func (l *trackingListener) closeAll() {
	l.mu.Lock()
	l.closed = true
	conns := l.conns
	l.conns = map[net.Conn]struct{}{}
	l.mu.Unlock()
	l.Listener.Close()
	for c := range conns {
		c.Close()
	}
}

type trackedConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// handle answers one NOTIFY. It never panics: a panic would kill the daemon.
func (a *Agent) handle(req *request.Request) {
	defer func() {
		if r := recover(); r != nil {
			a.m.decisions.WithLabelValues("", "panic").Inc()
			a.o.Logger.Error("spoa: handler panic; HAProxy falls back to leastconn for this connection", "panic", r)
		}
	}()
	msg, err := req.Messages.GetByName(wire.Message)
	if err != nil {
		return // not ours; HAProxy goes on without variables
	}
	pool, _ := argString(msg.KV.Get(wire.ArgPool))
	if _, ok := a.o.MaxJobs[pool]; !ok {
		a.m.decisions.WithLabelValues(pool, "unknown_pool").Inc()
		a.o.Logger.Warn("spoa: message for an unknown pool; regenerate the HAProxy config", "pool", pool)
		return
	}
	if q, ok := argInt(msg.KV.Get(wire.ArgQueue)); ok {
		a.m.queue.WithLabelValues(pool).Set(float64(q))
	}
	if c, ok := argInt(msg.KV.Get(wire.ArgBeConn)); ok {
		a.m.beConn.WithLabelValues(pool).Set(float64(c))
		a.forgetClosed(pool, int(c))
	}
	if n, ok := argInt(msg.KV.Get(wire.ArgNbSrv)); ok {
		a.m.nbSrv.WithLabelValues(pool).Set(float64(n))
	}
	a.m.connections.WithLabelValues(pool).Inc()
	start := a.o.Clock.Now()
	slot, held := a.Decide(pool)
	a.m.decisionSeconds.Observe(clock.Since(a.o.Clock, start).Seconds())
	if slot == "" {
		src, _ := argString(msg.KV.Get(wire.ArgSrc))
		sport, _ := argInt(msg.KV.Get(wire.ArgSport))
		a.o.Logger.Warn("spoa: no builder became ready within the hold; connection rejected",
			"pool", pool, "client", fmt.Sprintf("%s:%d", src, sport), "hold", a.o.Hold)
		req.Actions.SetVar(action.ScopeSession, wire.VarVerdict, wire.VerdictReject)
		return
	}
	if held {
		a.o.Logger.Info("spoa: held connection routed", "pool", pool, "slot", slot, "waited", clock.Since(a.o.Clock, start).Round(time.Millisecond))
	}
	req.Actions.SetVar(action.ScopeSession, wire.VarSlot, slot)
}

// forgetClosed drops the pool's picks when HAProxy's count of the backend's
// connections (be_conn, sent with each NOTIFY) is below what the agent
// assumes (sessions at the last round plus picks since): connections it
// routed have closed, and counting them would make slots look full.
func (a *Agent) forgetClosed(pool string, beConn int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	assumed := 0
	for _, v := range a.pools[pool] {
		assumed += v.sessions + a.picks[scaler.SlotKey{Pool: pool, Slot: v.name}]
	}
	if beConn >= assumed {
		return
	}
	for _, v := range a.pools[pool] {
		delete(a.picks, scaler.SlotKey{Pool: pool, Slot: v.name})
	}
}

// Decide picks the slot for a new connection to pool, holding it while the
// pool has no room (up to the hold). It returns "" when none came in time.
func (a *Agent) Decide(pool string) (slot string, held bool) {
	a.mu.Lock()
	slot, changed := a.choose(pool), a.changed
	if slot != "" {
		a.mu.Unlock()
		a.m.decisions.WithLabelValues(pool, "routed").Inc()
		return slot, false
	}
	a.held[pool]++
	a.mu.Unlock()
	a.m.held.WithLabelValues(pool).Inc()
	defer func() {
		a.mu.Lock()
		a.held[pool]--
		a.mu.Unlock()
		a.m.held.WithLabelValues(pool).Dec()
	}()
	a.o.Kick()
	timer := a.o.Clock.NewTimer(a.o.Hold)
	defer timer.Stop()
	for {
		select {
		case <-changed:
		case <-timer.C():
			a.m.decisions.WithLabelValues(pool, "rejected").Inc()
			return "", true
		}
		a.mu.Lock()
		slot, changed = a.choose(pool), a.changed
		a.mu.Unlock()
		if slot != "" {
			a.m.decisions.WithLabelValues(pool, "held_routed").Inc()
			return slot, true
		}
	}
}

// choose picks a usable slot with room, counting the pick. Slots holding
// live reservations come first, the one with the fewest sessions per
// reservation first, so a build's connections land where its capacity was
// counted; then the others by least connections. a.mu must be held.
func (a *Agent) choose(pool string) string {
	maxJobs := a.o.MaxJobs[pool]
	type cand struct {
		v    slotView
		load int
	}
	var cands []cand
	for _, v := range a.pools[pool] {
		load := v.sessions + a.picks[scaler.SlotKey{Pool: pool, Slot: v.name}]
		if v.usable && load < maxJobs {
			cands = append(cands, cand{v, load})
		}
	}
	if len(cands) == 0 {
		return ""
	}
	sort.SliceStable(cands, func(i, j int) bool {
		ci, cj := cands[i], cands[j]
		if (ci.v.reservations > 0) != (cj.v.reservations > 0) {
			return ci.v.reservations > 0
		}
		if ci.v.reservations > 0 {
			// load/reservations, compared without division
			if l, r := ci.load*cj.v.reservations, cj.load*ci.v.reservations; l != r {
				return l < r
			}
		}
		return ci.load < cj.load
	})
	best := cands[0].v.name
	a.picks[scaler.SlotKey{Pool: pool, Slot: best}]++
	return best
}

func argString(v any, ok bool) (string, bool) {
	if !ok {
		return "", false
	}
	switch x := v.(type) {
	case string:
		return x, true
	case []byte:
		return string(x), true
	case net.IP:
		return x.String(), true
	}
	return fmt.Sprint(v), true
}

func argInt(v any, ok bool) (int64, bool) {
	if !ok {
		return 0, false
	}
	switch x := v.(type) {
	case int32:
		return int64(x), true
	case uint32:
		return int64(x), true
	case int64:
		return x, true
	case uint64:
		return int64(x), true
	case int:
		return int64(x), true
	}
	return 0, false
}

// spoeLogger adapts slog to the SPOE library's logger.
type spoeLogger struct{ l *slog.Logger }

func (s spoeLogger) Errorf(format string, args ...any) {
	err := fmt.Errorf(format, args...)
	if errors.Is(err, net.ErrClosed) {
		return
	}
	s.l.Warn("spoa: " + err.Error())
}

type metrics struct {
	connections     *prometheus.CounterVec
	decisions       *prometheus.CounterVec
	held            *prometheus.GaugeVec
	queue           *prometheus.GaugeVec
	beConn          *prometheus.GaugeVec
	nbSrv           *prometheus.GaugeVec
	decisionSeconds prometheus.Histogram
	guardClosed     *prometheus.CounterVec
	guardInFlight   prometheus.GaugeFunc
}

func newMetrics(reg prometheus.Registerer, g *guard) *metrics {
	const ns = scaler.MetricsNamespace
	m := &metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "spoa_connections_total",
			Help: "Builder connections HAProxy asked the SPOE agent about."}, []string{"pool"}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "spoa_decisions_total",
			Help: "SPOE answers by result: routed, held_routed, rejected, unknown_pool, panic."}, []string{"pool", "result"}),
		held: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "spoa_held_connections",
			Help: "Connections held waiting for a builder."}, []string{"pool"}),
		queue: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "haproxy_backend_queue",
			Help: "Connections queued in the pool's backend, as HAProxy reported with the last connection."}, []string{"pool"}),
		beConn: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "haproxy_backend_connections",
			Help: "Connections on the pool's backend, as HAProxy reported with the last connection."}, []string{"pool"}),
		nbSrv: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "haproxy_backend_usable_servers",
			Help: "Usable servers in the pool's backend, as HAProxy reported with the last connection."}, []string{"pool"}),
		decisionSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "spoa_decision_seconds",
			Help:    "Time to answer a connection, holds included.",
			Buckets: []float64{0.0001, 0.0005, 0.001, 0.005, 0.05, 1, 10, 60, 300}}),
		guardClosed: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "spoa_guard_closed_connections_total",
			Help: "SPOE connections the agent closed for malformed frames, protocol violations or timeouts, by reason."}, []string{"reason"}),
		guardInFlight: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: "spoa_frames_in_flight",
			Help: "NOTIFY frames handed to the SPOE library and not yet answered, over all connections."},
			func() float64 { return float64(len(g.slots)) }),
	}
	if reg != nil {
		reg.MustRegister(m.connections, m.decisions, m.held, m.queue, m.beConn, m.nbSrv, m.decisionSeconds,
			m.guardClosed, m.guardInFlight)
	}
	return m
}

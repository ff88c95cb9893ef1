package scaler

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func pool(mod ...func(*PoolPolicy)) PoolPolicy {
	pp := PoolPolicy{
		Name: "x86", MaxBuilders: 3, ReservationsPerBuilder: 1,
		IdleTimeout: 5 * time.Minute, DrainTimeout: time.Hour,
		LaunchTimeout: 5 * time.Minute, BootTimeout: 10 * time.Minute, BindTimeout: 5 * time.Minute,
	}
	for _, m := range mod {
		m(&pp)
	}
	return pp
}

func policy(pp ...PoolPolicy) Policy {
	if len(pp) == 0 {
		pp = []PoolPolicy{pool()}
	}
	return Policy{Pools: pp, PendingTimeout: time.Hour, OrphanGrace: 2 * time.Minute}
}

// slot builds a slot of pool x86; instance ids are "i-<name>".
func slot(name string, st SlotState, mod ...func(*Slot)) Slot {
	s := Slot{Pool: "x86", Name: name, State: st, StateSince: t0.Add(-time.Minute), LastActive: t0.Add(-time.Minute), Weight: DefaultWeight}
	if st != Empty {
		s.InstanceID = "i-" + name
		s.LaunchID = "l-" + name
	}
	if st == Binding || st == Ready || st == Draining {
		s.Address = "10.0.0." + strings.TrimPrefix(name, "slot") + ":22"
	}
	for _, m := range mod {
		m(&s)
	}
	return s
}

func inst(name string, st InstanceState, mod ...func(*Instance)) Instance {
	in := Instance{ID: "i-" + name, Pool: "x86", Slot: name, LaunchID: "l-" + name, State: st, LaunchedAt: t0.Add(-time.Hour)}
	if st == InstanceRunning {
		in.Address = "10.0.0." + strings.TrimPrefix(name, "slot") + ":22"
	}
	for _, m := range mod {
		m(&in)
	}
	return in
}

func pending(id string, age time.Duration) Reservation {
	return Reservation{ID: id, Pool: "x86", State: Pending, CreatedAt: t0.Add(-age), ExpiresAt: t0.Add(10 * time.Minute)}
}

// forecast is an open forecast of n builds in pool x86 from source "p",
// made a minute ago with a 30 m TTL.
func forecast(id string, n int, mod ...func(*Forecast)) Forecast {
	f := Forecast{ID: id, Source: "p", Pool: "x86", Builds: n, CreatedAt: t0.Add(-time.Minute), ExpiresAt: t0.Add(29 * time.Minute)}
	for _, m := range mod {
		m(&f)
	}
	return f
}

// forecasting is the test pool with forecasts allowed up to n builders.
func forecasting(n int) Policy {
	return policy(pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = n }))
}

func assigned(id, slot string) Reservation {
	r := pending(id, time.Minute)
	r.State, r.Slot = Assigned, slot
	return r
}

// world builds an observation where every non-empty slot has a running
// instance and an up server at its address, unless overridden.
type world struct {
	slots     []Slot
	res       []Reservation
	instances []Instance
	servers   map[SlotKey]ServerStatus
	unknown   bool // load balancer unreachable
	noList    bool // provider list failed
	intents   []Intent
	forecasts []Forecast
	held      int // connections the load balancer holds, pool x86
	queued    int // connections the load balancer queues, pool x86
	boots     map[string]BootTime
}

func (w world) observed() Observed {
	obs := Observed{Slots: w.slots, Reservations: w.res, InstancesKnown: map[string]bool{"x86": !w.noList, "arm": !w.noList},
		ServersKnown: !w.unknown, Servers: map[SlotKey]ServerStatus{}, Intents: w.intents, Forecasts: w.forecasts, Boots: w.boots}
	haveInst := map[string]bool{}
	for _, in := range w.instances {
		haveInst[in.ID] = true
	}
	obs.Instances = append(obs.Instances, w.instances...)
	for _, s := range w.slots {
		if s.InstanceID != "" && !haveInst[s.InstanceID] {
			obs.Instances = append(obs.Instances, inst(s.Name, InstanceRunning, func(in *Instance) { in.Pool = s.Pool }))
		}
		if s.Address != "" {
			up := s.State == Ready || s.State == Draining
			obs.Servers[s.Key()] = ServerStatus{Addr: s.Address, Up: up, Healthy: up}
		}
	}
	for k, v := range w.servers {
		obs.Servers[k] = v
	}
	if w.held > 0 {
		obs.Held = map[string]int{"x86": w.held}
	}
	if w.queued > 0 {
		obs.Queued = map[string]int{"x86": w.queued}
	}
	return obs
}

func key(slot string) SlotKey { return SlotKey{"x86", slot} }

func render(as []Action) string {
	var b strings.Builder
	for _, a := range as {
		fmt.Fprintln(&b, a.String())
	}
	return b.String()
}

func TestPlan(t *testing.T) {
	tests := []struct {
		name string
		pol  Policy
		w    world
		want []string
	}{
		// Assignment.
		{
			name: "assign to ready slot with free capacity",
			w:    world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", time.Second)}},
			want: []string{`assign pool="x86" slot="slot1" reservation="r1" instance="i-slot1"`},
		},
		{
			name: "full slot gets no more reservations; a builder is launched instead",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{assigned("r1", "slot1"), pending("r2", time.Second)}},
			want: []string{
				`touch pool="x86" slot="slot1"`,
				`launch pool="x86" slot="slot2" reason="2 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "packs reservations onto the fuller builder",
			pol:  policy(pool(func(p *PoolPolicy) { p.ReservationsPerBuilder = 3 })),
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Ready), slot("slot3", Empty)},
				res: []Reservation{assigned("r1", "slot2"), pending("r2", time.Second)}},
			want: []string{
				`touch pool="x86" slot="slot2"`,
				`assign pool="x86" slot="slot2" reservation="r2" instance="i-slot2"`,
			},
		},
		{
			name: "weight 0 slot gets no reservations",
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.Weight = 0 }), slot("slot2", Ready), slot("slot3", Empty)},
				res: []Reservation{pending("r1", time.Second)}},
			want: []string{`assign pool="x86" slot="slot2" reservation="r1" instance="i-slot2"`},
		},
		{
			name: "draining slot gets no reservations",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "operator" }), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{pending("r1", time.Second)}, servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Sessions: 2}}},
			want: []string{`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`},
		},
		// Launching.
		{
			name: "pending demand with no capacity launches",
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0), pending("r2", 0)}},
			want: []string{
				`launch pool="x86" slot="slot1" reason="2 need a builder, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="2 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "starting builders count as capacity",
			w: world{slots: []Slot{slot("slot1", Booting, func(s *Slot) { s.StateSince = t0 }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceRunning, func(in *Instance) { in.Address = "" })},
				res:       []Reservation{pending("r1", 0)}},
			want: nil,
		},
		{
			name: "max_builders caps launches",
			pol:  policy(pool(func(p *PoolPolicy) { p.MaxBuilders = 2 })),
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty)}, res: []Reservation{pending("r1", 0), pending("r2", 0), pending("r3", 0)}},
			want: []string{
				`launch pool="x86" slot="slot1" reason="3 need a builder, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="3 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "reservations_per_builder shares a builder",
			pol:  policy(pool(func(p *PoolPolicy) { p.ReservationsPerBuilder = 2 })),
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0), pending("r2", 0), pending("r3", 0)}},
			want: []string{
				`launch pool="x86" slot="slot1" reason="3 need a builder, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="3 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "connections held by the load balancer are demand too",
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}},
			want: []string{`launch pool="x86" slot="slot1" reason="1 need a builder, 1 builders wanted, 0 active"`},
		},
		// Forecasts.
		{
			name: "an open forecast launches builders before its builds arrive",
			pol:  forecasting(3),
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}, forecasts: []Forecast{forecast("f1", 2)}},
			want: []string{
				`launch pool="x86" slot="slot1" reason="0 need a builder, 2 forecast, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="0 need a builder, 2 forecast, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "forecast builders are capped at forecast_max_builders, reservations are not",
			pol:  forecasting(1),
			w: world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{pending("r1", 0)}, forecasts: []Forecast{forecast("f1", 5)}},
			want: []string{
				`launch pool="x86" slot="slot1" reason="1 need a builder, 5 forecast, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 5 forecast, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "forecasts are ignored with forecast_max_builders = 0",
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}, forecasts: []Forecast{forecast("f1", 2)}},
		},
		{
			name: "a forecast past its TTL is no demand",
			pol:  forecasting(3),
			w: world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)},
				forecasts: []Forecast{forecast("f1", 2, func(f *Forecast) { f.ExpiresAt = t0 })}},
		},
		{
			name: "a withdrawn forecast is no demand",
			pol:  forecasting(3),
			w: world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)},
				forecasts: []Forecast{forecast("f1", 2, func(f *Forecast) { f.WithdrawnAt = t0.Add(-time.Second) })}},
		},
		{
			name: "reservations that arrived consume their forecast",
			pol:  forecasting(3),
			w: world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{pending("r1", 0), pending("r2", 0)}, forecasts: []Forecast{forecast("f1", 2, func(f *Forecast) { f.Arrived = 2 })}},
			want: []string{
				`launch pool="x86" slot="slot1" reason="2 need a builder, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="2 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "builders a forecast launched are not drained as idle while it is open",
			pol:  forecasting(3),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)},
				forecasts: []Forecast{forecast("f1", 1)}},
		},
		{
			name: "after a forecast ends, its builders' idle time starts then, not at their boot",
			pol:  forecasting(3),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)},
				forecasts: []Forecast{forecast("f1", 1, func(f *Forecast) { f.WithdrawnAt = t0.Add(-time.Minute) })}},
		},
		{
			name: "a forecast that ended longer than idle_timeout ago keeps no builder",
			pol:  forecasting(3),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)},
				forecasts: []Forecast{forecast("f1", 1, func(f *Forecast) { f.WithdrawnAt = t0.Add(-6 * time.Minute) })}},
			want: []string{`drain pool="x86" slot="slot1" instance="i-slot1" reason="idle"`},
		},
		{
			name: "connections queued on a full builder are demand: a second builder",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{assigned("r1", "slot1")}, queued: 1},
			want: []string{
				`touch pool="x86" slot="slot1"`,
				`launch pool="x86" slot="slot2" reason="2 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "held and queued connections are each counted once",
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}, held: 1, queued: 1},
			want: []string{
				`launch pool="x86" slot="slot1" reason="2 need a builder, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="2 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "queued connections launch no builder beyond max_builders",
			pol:  policy(pool(func(p *PoolPolicy) { p.MaxBuilders = 2 })),
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Ready), slot("slot3", Empty)},
				res: []Reservation{assigned("r1", "slot1")}, queued: 5},
			want: []string{`touch pool="x86" slot="slot1"`},
		},
		{
			name: "min_builders launches without demand",
			pol:  policy(pool(func(p *PoolPolicy) { p.MinBuilders = 1 })),
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}},
			want: []string{`launch pool="x86" slot="slot1" reason="0 need a builder, 1 builders wanted, 0 active"`},
		},
		{
			name: "warm_pool keeps a spare above demand",
			pol:  policy(pool(func(p *PoolPolicy) { p.WarmPool = 1 })),
			w:    world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0)}},
			want: []string{
				`assign pool="x86" slot="slot1" reservation="r1" instance="i-slot1"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "warm_for: warm pool kept within the window of recent activity",
			pol:  policy(pool(func(p *PoolPolicy) { p.WarmPool = 1; p.WarmFor = 30 * time.Minute })),
			w: world{slots: []Slot{slot("slot1", Empty, func(s *Slot) { s.LastActive = t0.Add(-10 * time.Minute) }),
				slot("slot2", Empty), slot("slot3", Empty)}},
			want: []string{`launch pool="x86" slot="slot1" reason="0 need a builder, 1 builders wanted, 0 active"`},
		},
		{
			name: "warm_for: no warm builder for a pool quiet longer than the window",
			pol:  policy(pool(func(p *PoolPolicy) { p.WarmPool = 1; p.WarmFor = 30 * time.Minute })),
			w: world{slots: []Slot{slot("slot1", Empty, func(s *Slot) { s.LastActive = t0.Add(-31 * time.Minute) }),
				slot("slot2", Empty, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot3", Empty, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) })}},
			want: nil,
		},
		{
			name: "warm_for: the idle warm builder of a quiet pool drains",
			pol:  policy(pool(func(p *PoolPolicy) { p.WarmPool = 1; p.WarmFor = 30 * time.Minute })),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-31 * time.Minute) }),
				slot("slot2", Empty, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot3", Empty, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) })}},
			want: []string{`drain pool="x86" slot="slot1" instance="i-slot1" reason="idle"`},
		},
		{
			name: "warm_for 0 keeps the warm pool however quiet",
			pol:  policy(pool(func(p *PoolPolicy) { p.WarmPool = 1 })),
			w: world{slots: []Slot{slot("slot1", Empty, func(s *Slot) { s.LastActive = t0.Add(-2 * time.Hour) }),
				slot("slot2", Empty, func(s *Slot) { s.LastActive = t0.Add(-2 * time.Hour) }), slot("slot3", Empty, func(s *Slot) { s.LastActive = t0.Add(-2 * time.Hour) })}},
			want: []string{`launch pool="x86" slot="slot1" reason="0 need a builder, 1 builders wanted, 0 active"`},
		},
		{
			name: "warm_for: a new reservation is activity: one builder for it and one warm",
			pol:  policy(pool(func(p *PoolPolicy) { p.WarmPool = 1; p.WarmFor = 30 * time.Minute })),
			w: world{slots: []Slot{slot("slot1", Empty, func(s *Slot) { s.LastActive = t0.Add(-2 * time.Hour) }),
				slot("slot2", Empty, func(s *Slot) { s.LastActive = t0.Add(-2 * time.Hour) }), slot("slot3", Empty, func(s *Slot) { s.LastActive = t0.Add(-2 * time.Hour) })},
				res: []Reservation{pending("r1", 0)}},
			want: []string{
				`launch pool="x86" slot="slot1" reason="1 need a builder, 2 builders wanted, 0 active"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 2 builders wanted, 1 active"`,
			},
		},
		{
			name: "launch backoff holds launches after failures",
			w:    world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0)}},
			pol:  policy(),
			want: nil,
		},
		// Idle drain.
		{
			name: "idle builder drains after idle_timeout",
			w:    world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-5 * time.Minute) }), slot("slot2", Empty), slot("slot3", Empty)}},
			want: []string{`drain pool="x86" slot="slot1" instance="i-slot1" reason="idle"`},
		},
		{
			name: "idle builder before idle_timeout stays",
			w:    world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-4 * time.Minute) }), slot("slot2", Empty), slot("slot3", Empty)}},
			want: nil,
		},
		{
			name: "billing minimum: an idle builder younger than it stays, however long idle",
			pol:  policy(pool(func(p *PoolPolicy) { p.IdleTimeout = 10 * time.Second; p.BillingMinimum = time.Minute })),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-40 * time.Second) }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceRunning, func(in *Instance) { in.LaunchedAt = t0.Add(-59 * time.Second) })}},
			want: nil,
		},
		{
			name: "billing minimum: an idle builder drains once it is that old",
			pol:  policy(pool(func(p *PoolPolicy) { p.IdleTimeout = 10 * time.Second; p.BillingMinimum = time.Minute })),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-40 * time.Second) }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceRunning, func(in *Instance) { in.LaunchedAt = t0.Add(-time.Minute) })}},
			want: []string{`drain pool="x86" slot="slot1" instance="i-slot1" reason="idle"`},
		},
		{
			name: "auto idle_timeout: an idle builder drains once idle as long as a measured boot costs",
			pol:  policy(pool(func(p *PoolPolicy) { p.IdleAuto = true; p.BillingMinimum = time.Minute })),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-80 * time.Second) }), slot("slot2", Empty), slot("slot3", Empty)},
				boots: map[string]BootTime{"x86": {Ready: 50 * time.Second, Billed: 30 * time.Second, Samples: 3}}},
			want: []string{`drain pool="x86" slot="slot1" instance="i-slot1" reason="idle"`},
		},
		{
			name: "auto idle_timeout: an idle builder stays until idle as long as a measured boot costs",
			pol:  policy(pool(func(p *PoolPolicy) { p.IdleAuto = true; p.BillingMinimum = time.Minute })),
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-79 * time.Second) }), slot("slot2", Empty), slot("slot3", Empty)},
				boots: map[string]BootTime{"x86": {Ready: 50 * time.Second, Billed: 30 * time.Second, Samples: 3}}},
			want: nil,
		},
		{
			name: "auto idle_timeout: no boot measured yet: an idle builder stays 2m",
			pol:  policy(pool(func(p *PoolPolicy) { p.IdleAuto = true; p.IdleTimeout = time.Second })),
			w:    world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-119 * time.Second) }), slot("slot2", Empty), slot("slot3", Empty)}},
			want: nil,
		},
		{
			name: "idle drain never goes below min_builders + warm_pool",
			pol:  policy(pool(func(p *PoolPolicy) { p.MinBuilders = 1; p.WarmPool = 1 })),
			w: world{slots: []Slot{
				slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }),
				slot("slot2", Ready, func(s *Slot) { s.LastActive = t0.Add(-2 * time.Hour) }),
				slot("slot3", Ready, func(s *Slot) { s.LastActive = t0.Add(-3 * time.Hour) }),
			}},
			want: []string{`drain pool="x86" slot="slot3" instance="i-slot3" reason="idle"`},
		},
		{
			name: "never drains a builder with a live reservation",
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{assigned("r1", "slot1")}},
			want: []string{`touch pool="x86" slot="slot1"`},
		},
		{
			name: "never drains a builder with open sessions",
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Sessions: 1}}},
			want: []string{`touch pool="x86" slot="slot1"`},
		},
		{
			name: "never drains while the load balancer is unreachable",
			w:    world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)}, unknown: true},
			want: nil,
		},
		// Lifecycle transitions and timeouts.
		{
			name: "launching instance running advances to booting and binds",
			w: world{slots: []Slot{slot("slot1", Launching), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{pending("r1", 0)}},
			want: []string{
				`advance pool="x86" slot="slot1" instance="i-slot1" to="booting" reason="instance running"`,
				`bind pool="x86" slot="slot1" instance="i-slot1" addr="10.0.0.1:22"`,
			},
		},
		{
			name: "binding slot becomes ready when the server is up and takes the reservation at once",
			w: world{slots: []Slot{slot("slot1", Binding), slot("slot2", Empty), slot("slot3", Empty)},
				res:     []Reservation{pending("r1", 0)},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Healthy: true}}},
			want: []string{
				`advance pool="x86" slot="slot1" instance="i-slot1" to="ready" reason="server healthy"`,
				`assign pool="x86" slot="slot1" reservation="r1" instance="i-slot1"`,
			},
		},
		{
			name: "address lost by the load balancer is bound again",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "192.0.2.1:22"}}},
			want: []string{`bind pool="x86" slot="slot1" instance="i-slot1" addr="10.0.0.1:22"`},
		},
		{
			name: "launch timeout terminates and replaces",
			w: world{slots: []Slot{slot("slot1", Launching, func(s *Slot) { s.StateSince = t0.Add(-5 * time.Minute) }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstancePending)}, res: []Reservation{pending("r1", 0)}},
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="launch_timeout" reason="launch timeout (5m0s)"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "boot timeout terminates and replaces",
			w: world{slots: []Slot{slot("slot1", Booting, func(s *Slot) { s.StateSince = t0.Add(-10 * time.Minute) }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceRunning, func(in *Instance) { in.Address = "" })}, res: []Reservation{pending("r1", 0)}},
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="boot_timeout" reason="boot timeout (10m0s)"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "bind timeout terminates and replaces",
			w: world{slots: []Slot{slot("slot1", Binding, func(s *Slot) { s.StateSince = t0.Add(-5 * time.Minute) }), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{pending("r1", 0)}, servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: false}}},
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="bind_timeout" reason="bind timeout (5m0s)"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "launch cut off by a crash, no instance has its launch id: freed after the list-lag grace, not launch_timeout",
			w: world{slots: []Slot{slot("slot1", Launching, func(s *Slot) { s.InstanceID = ""; s.StateSince = t0.Add(-LostLaunchAfter) }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{}, res: []Reservation{pending("r1", time.Minute)}},
			want: []string{
				`terminate pool="x86" slot="slot1" cause="other" reason="launch lost: no instance has launch id l-slot1 (the daemon stopped during the launch)"`,
				`launch pool="x86" slot="slot1" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "launch without an instance yet, within the list-lag grace: wait",
			w: world{slots: []Slot{slot("slot1", Launching, func(s *Slot) { s.InstanceID = ""; s.StateSince = t0.Add(-LostLaunchAfter + time.Second) }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{}, res: []Reservation{pending("r1", time.Minute)}},
			want: nil,
		},
		{
			name: "instance found by launch id after a crash is adopted",
			w: world{slots: []Slot{slot("slot1", Launching, func(s *Slot) { s.InstanceID = ""; s.StateSince = t0 }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceRunning)}, res: []Reservation{pending("r1", 0)}},
			want: []string{
				`adopt pool="x86" slot="slot1" instance="i-slot1" reason="found by launch id"`,
				`advance pool="x86" slot="slot1" instance="i-slot1" to="booting" reason="instance running"`,
				`bind pool="x86" slot="slot1" instance="i-slot1" addr="10.0.0.1:22"`,
			},
		},
		// Draining.
		{
			name: "draining slot terminates when empty",
			w:    world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "idle" }), slot("slot2", Empty), slot("slot3", Empty)}},
			want: []string{`terminate pool="x86" slot="slot1" instance="i-slot1" cause="drained" reason="drained (idle)" if_idle="true"`},
		},
		{
			name: "demand returns: an idle-drained builder with no session is taken back instead of launching one",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = DrainIdle }),
				slot("slot2", Draining, func(s *Slot) { s.DrainReason = DrainIdle }), slot("slot3", Empty)},
				res: []Reservation{pending("r1", 0)}},
			want: []string{
				`undrain pool="x86" slot="slot1" instance="i-slot1" reason="demand returned"`,
				`terminate pool="x86" slot="slot2" instance="i-slot2" cause="drained" reason="drained (idle)" if_idle="true"`,
			},
		},
		{
			name: "launch backoff does not hold back taking an idle-drained builder back",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = DrainIdle }), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{pending("r1", 0), pending("r2", 0)}},
			want: []string{`undrain pool="x86" slot="slot1" instance="i-slot1" reason="demand returned"`},
		},
		{
			name: "demand returns: operator and max-lifetime drains are not taken back",
			pol:  policy(pool(func(p *PoolPolicy) { p.MaxBuilders = 4 })),
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "operator" }),
				slot("slot2", Draining, func(s *Slot) { s.DrainReason = "max lifetime (24h0m0s)" }), slot("slot3", Empty), slot("slot4", Empty)},
				res: []Reservation{pending("r1", 0)}},
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="drained" reason="drained (operator)" if_idle="true"`,
				`terminate pool="x86" slot="slot2" instance="i-slot2" cause="drained" reason="drained (max lifetime (24h0m0s))" if_idle="true"`,
				`launch pool="x86" slot="slot3" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "demand returns: an idle-drained builder whose server fails its check is not taken back",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = DrainIdle }), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{pending("r1", 0)}, servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22"}}},
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="drained" reason="drained (idle)" if_idle="true"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "demand returns: an idle-drained builder past max_lifetime is not taken back",
			pol:  policy(pool(func(p *PoolPolicy) { p.MaxLifetime = 24 * time.Hour })),
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = DrainIdle }), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceRunning, func(in *Instance) { in.LaunchedAt = t0.Add(-25 * time.Hour) })},
				res:       []Reservation{pending("r1", 0)}},
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="drained" reason="drained (idle)" if_idle="true"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "draining slot with sessions waits",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "operator" }), slot("slot2", Empty), slot("slot3", Empty)},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Sessions: 1}}},
			want: nil,
		},
		{
			name: "draining slot with a live reservation waits",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "operator" }), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{assigned("r1", "slot1")}},
			want: nil,
		},
		{
			name: "draining slot terminates at drain_timeout and its reservation is requeued",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "operator"; s.StateSince = t0.Add(-time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)},
				res:     []Reservation{assigned("r1", "slot1")},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Sessions: 1}}},
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="drain_timeout" reason="drain timeout (1h0m0s)"`,
				`requeue pool="x86" slot="slot1" reservation="r1" reason="drain timeout (1h0m0s)"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "draining slot is not terminated while the load balancer is unreachable",
			w:    world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.StateSince = t0.Add(-2 * time.Hour) }), slot("slot2", Empty), slot("slot3", Empty)}, unknown: true},
			want: nil,
		},
		{
			name: "terminating slot empties when the instance is gone",
			w: world{slots: []Slot{slot("slot1", Terminating), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceTerminated)}},
			want: []string{`advance pool="x86" slot="slot1" instance="i-slot1" to="empty" reason="terminated"`},
		},
		{
			name: "terminating slot whose instance still runs is terminated again",
			w:    world{slots: []Slot{slot("slot1", Terminating, func(s *Slot) { s.DrainReason = "idle" }), slot("slot2", Empty), slot("slot3", Empty)}},
			want: []string{`retry-terminate pool="x86" slot="slot1" instance="i-slot1" reason="idle"`},
		},
		// Instances lost outside the daemon.
		{
			name: "ready builder reclaimed: slot empties, reservation requeued, replacement launched",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceTerminated, func(in *Instance) { in.StateReason = "Server.SpotInstanceTermination" })},
				res:       []Reservation{assigned("r1", "slot1")}},
			want: []string{
				`requeue pool="x86" slot="slot1" reservation="r1" reason="instance i-slot1 is terminated: Server.SpotInstanceTermination"`,
				`advance pool="x86" slot="slot1" instance="i-slot1" to="empty" reason="instance i-slot1 is terminated: Server.SpotInstanceTermination"`,
				`launch pool="x86" slot="slot1" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "builder stopped outside the daemon: slot empties and the instance is terminated",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceStopped, func(in *Instance) { in.StateReason = "Client.UserInitiatedShutdown" })}},
			want: []string{
				`advance pool="x86" slot="slot1" instance="i-slot1" to="empty" reason="instance i-slot1 is stopped: Client.UserInitiatedShutdown"`,
				`terminate pool="x86" instance="i-slot1" cause="orphan" reason="orphan: stopped outside the daemon"`,
			},
		},
		{
			name: "nothing concluded from a failed provider list",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceTerminated)}, res: []Reservation{assigned("r1", "slot1")}, noList: true},
			want: []string{`touch pool="x86" slot="slot1"`},
		},
		{
			name: "orphan instance terminated after the grace period",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{assigned("r1", "slot1")},
				instances: []Instance{
					inst("slot1", InstanceRunning, func(in *Instance) { in.ID = "i-stray" }),
					inst("slot1", InstanceRunning, func(in *Instance) { in.ID = "i-young"; in.LaunchedAt = t0.Add(-time.Minute) }),
					inst("slot9", InstanceRunning, func(in *Instance) { in.ID = "i-noslot" }),
				}},
			want: []string{
				`touch pool="x86" slot="slot1"`,
				`terminate pool="x86" instance="i-noslot" cause="orphan" reason="orphan: no slot tracks it"`,
				`terminate pool="x86" instance="i-stray" cause="orphan" reason="orphan: no slot tracks it"`,
			},
		},
		{
			name: "untracked healthy instance is adopted into its free tagged slot",
			w: world{slots: []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot2", InstanceRunning), inst("slot3", InstanceStopped)}},
			want: []string{
				`adopt pool="x86" slot="slot2" instance="i-slot2" to="booting" reason="untracked instance tagged for this free slot"`,
				`terminate pool="x86" instance="i-slot3" cause="orphan" reason="orphan: stopped outside the daemon"`,
			},
		},
		{
			name: "builder past max_lifetime drains; demand brings a fresh one",
			pol:  policy(pool(func(p *PoolPolicy) { p.MaxLifetime = 24 * time.Hour })),
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				instances: []Instance{inst("slot1", InstanceRunning, func(in *Instance) { in.LaunchedAt = t0.Add(-25 * time.Hour) })},
				res:       []Reservation{pending("r1", 0)}},
			want: []string{
				`drain pool="x86" slot="slot1" instance="i-slot1" reason="max lifetime (24h0m0s)"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		// Intents: applied first, so the round plans with them.
		{
			name: "operator drain of a ready slot: it takes no reservation, and a builder is launched instead",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0)},
				intents: []Intent{{ID: "in1", Kind: IntentDrain, Pool: "x86", Slot: "slot1", Actor: "operator"}},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Healthy: true, Sessions: 1}}},
			want: []string{
				`drain pool="x86" slot="slot1" instance="i-slot1" reason="operator" intent="in1"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "operator drain of a draining slot takes over its reason",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "idle" })},
				intents: []Intent{{ID: "in1", Kind: IntentDrain, Pool: "x86", Slot: "slot1"}},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Healthy: true, Sessions: 1}}},
			want: []string{`drain pool="x86" slot="slot1" instance="i-slot1" reason="operator" intent="in1"`},
		},
		{
			name: "refused intents: drain of an empty slot, undrain of a ready one is already true, unknown slot",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty)}, intents: []Intent{
				{ID: "in1", Kind: IntentDrain, Pool: "x86", Slot: "slot2"},
				{ID: "in2", Kind: IntentUndrain, Pool: "x86", Slot: "slot1"},
				{ID: "in3", Kind: IntentWeight, Pool: "x86", Slot: "slot9", Weight: 5},
			}},
			want: []string{
				`forget pool="x86" slot="slot2" reason="slot x86/slot2 is empty; only a ready slot can be drained" intent="in1"`,
				`forget pool="x86" slot="slot1" intent="in2"`,
				`forget pool="x86" slot="slot9" reason="no slot x86/slot9" intent="in3"`,
			},
		},
		{
			name: "undrain takes a reservation the same round; weight 0 takes none",
			w: world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = "operator" }), slot("slot2", Ready)},
				res: []Reservation{pending("r1", 0)},
				intents: []Intent{
					{ID: "in1", Kind: IntentWeight, Pool: "x86", Slot: "slot2", Weight: 0},
					{ID: "in2", Kind: IntentUndrain, Pool: "x86", Slot: "slot1"},
				}},
			want: []string{
				`weight pool="x86" slot="slot2" instance="i-slot2" reason="weight 0" intent="in1" weight="0"`,
				`undrain pool="x86" slot="slot1" instance="i-slot1" reason="operator" intent="in2"`,
				`assign pool="x86" slot="slot1" reservation="r1" instance="i-slot1"`,
			},
		},
		{
			name: "a release counts idle time from its own time, once",
			w: world{slots: []Slot{slot("slot1", Ready, func(s *Slot) { s.LastActive = t0.Add(-time.Hour) })}, intents: []Intent{
				{ID: "in1", Kind: IntentReleased, Pool: "x86", Slot: "slot1", At: t0.Add(-time.Minute)},
				{ID: "in2", Kind: IntentReleased, Pool: "x86", Slot: "slot1", At: t0.Add(-2 * time.Minute)},
			}},
			want: []string{
				`touch pool="x86" slot="slot1" intent="in1"`,
				`forget pool="x86" slot="slot1" intent="in2"`,
			},
		},
		// Ready means UP in the load balancer.
		{
			name: "a ready slot whose server is not up yet gets no reservation",
			w: world{slots: []Slot{slot("slot1", Ready)}, res: []Reservation{pending("r1", 0)},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Healthy: true}}},
			want: nil,
		},
		{
			name: "binding slot whose check passed becomes ready, and is assigned only once UP (next round)",
			w: world{slots: []Slot{slot("slot1", Binding)}, res: []Reservation{pending("r1", 0)},
				servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Healthy: true}}},
			want: []string{`advance pool="x86" slot="slot1" instance="i-slot1" to="ready" reason="server healthy"`},
		},
		// Reservation deadlines.
		{
			name: "expired lease frees capacity for a pending reservation",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)},
				res: []Reservation{
					func() Reservation { r := assigned("r1", "slot1"); r.ExpiresAt = t0; return r }(),
					pending("r2", time.Second),
				}},
			want: []string{
				`expire pool="x86" slot="slot1" reservation="r1" reason="lease expired without heartbeat"`,
				`assign pool="x86" slot="slot1" reservation="r2" instance="i-slot1"`,
			},
		},
		{
			name: "pending past pending_timeout fails, naming the full pool",
			pol:  policy(pool(func(p *PoolPolicy) { p.MaxBuilders = 1 })),
			w:    world{slots: []Slot{slot("slot1", Ready)}, res: []Reservation{assigned("r1", "slot1"), pending("r2", time.Hour)}},
			want: []string{
				`fail pool="x86" reservation="r2" reason="no builder after 1h0m0s: pool x86 at max_builders (1)"`,
				`touch pool="x86" slot="slot1"`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pol := tt.pol
			if pol.Pools == nil {
				pol = policy()
			}
			obs := tt.w.observed()
			if strings.HasPrefix(tt.name, "connections held") {
				obs.Held = map[string]int{"x86": 1}
			}
			if strings.HasPrefix(tt.name, "launch backoff") {
				obs.LaunchBackoff = map[string]time.Time{"x86": t0.Add(time.Second)}
			}
			got := render(Plan(t0, pol, obs))
			want := ""
			for _, w := range tt.want {
				want += w + "\n"
			}
			if got != want {
				t.Errorf("Plan() =\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

func TestPlanIsPure(t *testing.T) {
	w := world{slots: []Slot{slot("slot1", Binding), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0), pending("r2", 0)},
		servers: map[SlotKey]ServerStatus{key("slot1"): {Addr: "10.0.0.1:22", Up: true, Healthy: true}}}
	obs := w.observed()
	before := fmt.Sprintf("%+v", obs)
	a := render(Plan(t0, policy(), obs))
	b := render(Plan(t0, policy(), obs))
	if a != b {
		t.Fatalf("Plan not deterministic:\n%s\nvs\n%s", a, b)
	}
	if after := fmt.Sprintf("%+v", obs); after != before {
		t.Fatalf("Plan mutated its input")
	}
}

func TestTarget(t *testing.T) {
	tests := []struct {
		pp             PoolPolicy
		live, forecast int
		want           int
	}{
		{pool(), 0, 0, 0},
		{pool(), 2, 0, 2},
		{pool(), 10, 0, 3},
		{pool(func(p *PoolPolicy) { p.MinBuilders = 1 }), 0, 0, 1},
		{pool(func(p *PoolPolicy) { p.MinBuilders = 1; p.WarmPool = 1 }), 0, 0, 2},
		{pool(func(p *PoolPolicy) { p.WarmPool = 1 }), 2, 0, 3},
		{pool(func(p *PoolPolicy) { p.ReservationsPerBuilder = 4 }), 5, 0, 2},
		// Forecast builds add builders, at most forecast_max_builders.
		{pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = 2 }), 0, 1, 1},
		{pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = 2 }), 0, 5, 2},
		{pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = 2 }), 1, 5, 3},
		{pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = 2; p.ReservationsPerBuilder = 4 }), 3, 1, 1},
		{pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = 2; p.ReservationsPerBuilder = 4 }), 3, 2, 2},
		{pool(), 0, 5, 0},
	}
	for _, tt := range tests {
		if got := Target(tt.pp, tt.live, tt.forecast); got != tt.want {
			t.Errorf("Target(min=%d warm=%d rpb=%d fmax=%d, live=%d, forecast=%d) = %d, want %d", tt.pp.MinBuilders, tt.pp.WarmPool,
				tt.pp.ReservationsPerBuilder, tt.pp.ForecastMaxBuilders, tt.live, tt.forecast, got, tt.want)
		}
	}
}

func TestRetryOnConflict(t *testing.T) {
	other := fmt.Errorf("disk full")
	tests := []struct {
		name      string
		errs      []error // what successive attempts return
		wantCalls int
		wantErr   error
	}{
		{"success at once", []error{nil}, 1, nil},
		{"conflict then success", []error{ErrConflict, fmt.Errorf("wrapped: %w", ErrConflict), nil}, 3, nil},
		{"other error stops", []error{ErrConflict, other}, 2, other},
		{"gives up at the limit", []error{ErrConflict, ErrConflict, ErrConflict, ErrConflict}, 3, ErrConflict},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			err := RetryOnConflict(3, func() error {
				calls++
				return tt.errs[calls-1]
			})
			if calls != tt.wantCalls || !errors.Is(err, tt.wantErr) && err != tt.wantErr {
				t.Fatalf("calls %d err %v; want %d, %v", calls, err, tt.wantCalls, tt.wantErr)
			}
		})
	}
}

func TestIdlePolicy(t *testing.T) {
	ec2 := func(p *PoolPolicy) { p.IdleAuto = true; p.BillingMinimum = time.Minute }
	local := func(p *PoolPolicy) { p.IdleAuto = true }
	boot := func(ready, billed time.Duration) BootTime { return BootTime{Ready: ready, Billed: billed, Samples: 9} }
	tests := []struct {
		pp      PoolPolicy
		boot    BootTime
		want    time.Duration
		wantWhy string
	}{
		{pool(), boot(time.Minute, time.Minute), 5 * time.Minute, "idle_timeout 5m"},
		{pool(ec2), BootTime{}, 2 * time.Minute, "idle_timeout auto = 2m (no boot measured yet)"},
		{pool(ec2, func(p *PoolPolicy) { p.BillingMinimum = time.Hour }), BootTime{}, time.Hour, "idle_timeout auto = 1h (no boot measured yet)"},
		{pool(ec2), boot(31*time.Second, 20*time.Second), time.Minute,
			"idle_timeout auto = 1m from measured boot 31s (20s of it billed; median of 9), raised to the billing minimum 1m"},
		{pool(ec2), boot(80*time.Second, 65*time.Second), 145 * time.Second,
			"idle_timeout auto = 2m25s from measured boot 1m20s (1m5s of it billed; median of 9)"},
		{pool(ec2), boot(8*time.Minute, 7*time.Minute), 10 * time.Minute,
			"idle_timeout auto = 10m from measured boot 8m (7m of it billed; median of 9), capped at 10m"},
		{pool(local), boot(2*time.Second, time.Second), 10 * time.Second,
			"idle_timeout auto = 10s from measured boot 2s (1s of it billed; median of 9), raised to 10s"},
		{pool(local), boot(30*time.Second, 20*time.Second), 50 * time.Second,
			"idle_timeout auto = 50s from measured boot 30s (20s of it billed; median of 9)"},
	}
	for _, tt := range tests {
		got, why := tt.pp.IdlePolicy(tt.boot)
		if got != tt.want || why != tt.wantWhy {
			t.Errorf("IdlePolicy(auto %v, billing minimum %s, %+v) = %s, %q; want %s, %q",
				tt.pp.IdleAuto, tt.pp.BillingMinimum, tt.boot, got, why, tt.want, tt.wantWhy)
		}
	}
}

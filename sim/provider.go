package sim

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Dist is a shifted exponential delay: Min plus an exponential draw whose
// mean makes the whole delay average Mean (Mean <= Min: always Min).
type Dist struct {
	Min  time.Duration `json:"min"`
	Mean time.Duration `json:"mean"`
}

func (d Dist) draw(rng *rand.Rand) time.Duration {
	if d.Mean <= d.Min {
		return d.Min
	}
	x := rng.ExpFloat64() * float64(d.Mean-d.Min)
	return d.Min + time.Duration(x).Round(time.Second)
}

// Env is the simulated cloud: how long builders take to come up, how often
// they are interrupted or cannot be had, and what they cost.
type Env struct {
	// LaunchToRunning is the time from the launch call to the instance
	// running (EC2 "pending"); RunningToReachable is the time from running
	// to its sshd answering (the load balancer's health check passing).
	LaunchToRunning    Dist `json:"launch_to_running"`
	RunningToReachable Dist `json:"running_to_reachable"`
	// InterruptionsPerHour is each Spot instance's chance per running hour
	// of being reclaimed (0: never).
	InterruptionsPerHour float64 `json:"interruptions_per_hour"`
	// CapacityErrorRate is the fraction of launch calls that fail for want
	// of capacity (InsufficientInstanceCapacity).
	CapacityErrorRate float64 `json:"capacity_error_rate"`
	// Market is "spot" or "on-demand"; PricePerHour is per market, in the
	// currency of the operator's choice (USD by default).
	Market       string             `json:"market"`
	PricePerHour map[string]float64 `json:"price_per_hour"`
	// MinBilled is the minimum billed time per instance (EC2: 60 s).
	MinBilled time.Duration `json:"min_billed_ns"`
	// InterruptionWarning is how long before an interruption the provider
	// warns of it (EC2: 2 min, which the daemon reads from the
	// interruption queue or DescribeSpotInstanceRequests); 0: no warning,
	// the builder is found gone after the fact.
	InterruptionWarning time.Duration `json:"interruption_warning_ns"`
}

// DefaultEnv follows published EC2 figures for a tuned Linux AMI: about 10 s
// to running and 30 s to SSH; a spot interruption rate of under 5 % a month
// (~0.0001/h, rounded up here to 0.002/h to exercise the path); c7a.xlarge
// prices in us-east-1.
var DefaultEnv = Env{
	LaunchToRunning:      Dist{Min: 6 * time.Second, Mean: 10 * time.Second},
	RunningToReachable:   Dist{Min: 15 * time.Second, Mean: 20 * time.Second},
	InterruptionsPerHour: 0.002,
	CapacityErrorRate:    0.01,
	Market:               "spot",
	PricePerHour:         map[string]float64{"spot": 0.0806, "on-demand": 0.2053},
	MinBilled:            60 * time.Second,
	InterruptionWarning:  2 * time.Minute,
}

// Price is the hourly price of the environment's market.
func (e Env) Price() float64 { return e.PricePerHour[e.Market] }

// Bill returns the billed time of an instance that ran from start to end.
func (e Env) Bill(start, end time.Time) time.Duration {
	if end.Before(start) {
		return 0
	}
	return max(end.Sub(start), e.MinBilled)
}

type simInstance struct {
	in          scaler.Instance
	runningAt   time.Time
	reachableAt time.Time
	interruptAt time.Time // zero: never
	endedAt     time.Time
}

// provider is a simulated scaler.Provider on the simulation's clock.
type provider struct {
	env   Env
	rng   *rand.Rand
	now   func() time.Time
	pool  string
	seq   int
	insts map[string]*simInstance
	order []string

	launches, capacityErrors, interruptions int
	billed                                  time.Duration
}

var errCapacity = errors.New("InsufficientInstanceCapacity: simulated")

func (p *provider) Launch(_ context.Context, req scaler.LaunchRequest) (scaler.Instance, error) {
	now := p.now()
	if p.rng.Float64() < p.env.CapacityErrorRate {
		p.capacityErrors++
		return scaler.Instance{}, errCapacity
	}
	p.seq++
	p.launches++
	id := fmt.Sprintf("i-%s-%06d", p.pool, p.seq)
	si := &simInstance{in: scaler.Instance{ID: id, Pool: req.Pool, Slot: req.Slot, LaunchID: req.LaunchID,
		State: scaler.InstancePending, LaunchedAt: now, Type: "sim", Market: p.env.Market, Zone: "sim-1a"}}
	si.runningAt = now.Add(p.env.LaunchToRunning.draw(p.rng))
	si.reachableAt = si.runningAt.Add(p.env.RunningToReachable.draw(p.rng))
	if p.env.Market == "spot" && p.env.InterruptionsPerHour > 0 {
		hours := p.rng.ExpFloat64() / p.env.InterruptionsPerHour
		if hours < 24*365 {
			si.interruptAt = si.runningAt.Add(time.Duration(math.Round(hours * float64(time.Hour))).Round(time.Second))
		}
	}
	p.insts[id] = si
	p.order = append(p.order, id)
	return si.in, nil
}

func (p *provider) end(si *simInstance, at time.Time, state scaler.InstanceState, reason string) {
	if !si.endedAt.IsZero() {
		return
	}
	si.endedAt = at
	si.in.State, si.in.StateReason = state, reason
	if !at.Before(si.runningAt) {
		p.billed += p.env.Bill(si.runningAt, at)
	}
}

func (p *provider) Terminate(_ context.Context, id string) error {
	if si, ok := p.insts[id]; ok {
		p.end(si, p.now(), scaler.InstanceTerminated, "Client.UserInitiatedShutdown")
	}
	return nil
}

// advance moves instances through their states up to now; it reports
// whether anything visible changed.
func (p *provider) advance(now time.Time) bool {
	changed := false
	for _, id := range p.order {
		si := p.insts[id]
		if !si.endedAt.IsZero() {
			continue
		}
		if si.in.State == scaler.InstancePending && !now.Before(si.runningAt) {
			si.in.State = scaler.InstanceRunning
			si.in.Address = id + ":22"
			changed = true
		}
		if !si.interruptAt.IsZero() && !now.Before(si.interruptAt) {
			p.interruptions++
			p.end(si, now, scaler.InstanceTerminated, "Server.SpotInstanceTermination")
			changed = true
		}
	}
	return changed
}

// Notices warns of the interruptions due within the environment's
// warning (scaler.NoticeReader), as EC2's two-minute warning does.
func (p *provider) Notices(context.Context, []scaler.Instance) (map[string]scaler.Notice, error) {
	if p.env.InterruptionWarning <= 0 {
		return nil, nil
	}
	now := p.now()
	var out map[string]scaler.Notice
	for _, id := range p.order {
		si := p.insts[id]
		if si.interruptAt.IsZero() || !si.endedAt.IsZero() || now.Before(si.interruptAt.Add(-p.env.InterruptionWarning)) {
			continue
		}
		if out == nil {
			out = map[string]scaler.Notice{}
		}
		out[id] = scaler.Notice{Instance: id, Kind: scaler.NoticeInterruption, Deadline: si.interruptAt}
	}
	return out, nil
}

// ended reports whether instance id no longer runs (or is unknown).
func (p *provider) ended(id string) bool {
	si, ok := p.insts[id]
	return !ok || !si.endedAt.IsZero()
}

// finish terminates everything still running at the end of the run.
func (p *provider) finish(now time.Time) {
	for _, id := range p.order {
		p.end(p.insts[id], now, scaler.InstanceTerminated, "end of simulation")
	}
}

// List reports live instances, and ended ones for a minute (as EC2 keeps
// terminated instances visible for a while).
func (p *provider) List(context.Context) ([]scaler.Instance, error) {
	now := p.now()
	var out []scaler.Instance
	for _, id := range p.order {
		si := p.insts[id]
		if !si.endedAt.IsZero() && now.Sub(si.endedAt) > time.Minute {
			continue
		}
		out = append(out, si.in)
	}
	return out, nil
}

// compact forgets instances that ended long ago (keeps List cheap).
func (p *provider) compact(now time.Time) {
	keep := p.order[:0]
	for _, id := range p.order {
		si := p.insts[id]
		if !si.endedAt.IsZero() && now.Sub(si.endedAt) > 2*time.Minute {
			delete(p.insts, id)
			continue
		}
		keep = append(keep, id)
	}
	p.order = keep
}

// readiness is the simulated load balancer: a bound slot's server is
// healthy once its instance's sshd is reachable; its sessions are the
// builds running on it.
type readiness struct {
	prov     map[string]*provider
	addr     map[scaler.SlotKey]string
	sessions map[scaler.SlotKey]int
	now      func() time.Time
}

func (r *readiness) Bind(_ context.Context, k scaler.SlotKey, addr string) error {
	if addr == "" {
		delete(r.addr, k)
		return nil
	}
	r.addr[k] = addr
	return nil
}

func (r *readiness) Servers(context.Context) (map[scaler.SlotKey]scaler.ServerStatus, error) {
	now := r.now()
	out := map[scaler.SlotKey]scaler.ServerStatus{}
	keys := make([]scaler.SlotKey, 0, len(r.addr))
	for k := range r.addr {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
	for _, k := range keys {
		addr := r.addr[k]
		st := scaler.ServerStatus{Addr: addr, Sessions: r.sessions[k]}
		if p := r.prov[k.Pool]; p != nil {
			for _, si := range p.insts {
				if si.in.Address == addr && si.endedAt.IsZero() && !now.Before(si.reachableAt) {
					st.Healthy, st.Up = true, true
				}
			}
		}
		out[k] = st
	}
	return out, nil
}

// MarshalJSON writes the delays as Go duration strings ("6s").
func (d Dist) MarshalJSON() ([]byte, error) {
	return []byte(fmt.Sprintf(`{"min":%q,"mean":%q}`, d.Min, d.Mean)), nil
}

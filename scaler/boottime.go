package scaler

import (
	"slices"
	"sync"
	"time"
)

// BootSamples is how many of a pool's most recent boots its BootTime is
// the median of.
const BootSamples = 9

// bootMeter measures builders' boots from the transitions the reconciler
// applies: launched (the instance's launch time), running (the round that
// advanced its slot to booting) and ready. It keeps them in memory: after a
// restart a pool has no measurement until a builder launched since has
// become ready. Builders adopted rather than launched are not measured.
type bootMeter struct {
	mu       sync.Mutex
	launched map[string]time.Time // by instance id
	running  map[string]time.Time // by instance id
	samples  map[string][]bootSample
}

type bootSample struct{ ready, billed time.Duration }

// bootForget is how long a boot that never becomes ready is remembered.
const bootForget = 24 * time.Hour

func (m *bootMeter) launch(id string, at time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.launched == nil {
		m.launched, m.running, m.samples = map[string]time.Time{}, map[string]time.Time{}, map[string][]bootSample{}
	}
	for i, t := range m.launched {
		if at.Sub(t) > bootForget {
			delete(m.launched, i)
			delete(m.running, i)
		}
	}
	m.launched[id] = at
}

func (m *bootMeter) run(id string, at time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.launched[id]; ok {
		m.running[id] = at
	}
}

func (m *bootMeter) ready(pool, id string, at time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, okL := m.launched[id]
	r, okR := m.running[id]
	delete(m.launched, id)
	delete(m.running, id)
	if !okL || !okR || at.Before(r) || r.Before(l) {
		return
	}
	s := append(m.samples[pool], bootSample{ready: at.Sub(l), billed: at.Sub(r)})
	if len(s) > BootSamples {
		s = s[len(s)-BootSamples:]
	}
	m.samples[pool] = s
}

// times returns each measured pool's BootTime.
func (m *bootMeter) times() map[string]BootTime {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]BootTime, len(m.samples))
	for pool, s := range m.samples {
		ready, billed := make([]time.Duration, len(s)), make([]time.Duration, len(s))
		for i, x := range s {
			ready[i], billed[i] = x.ready, x.billed
		}
		out[pool] = BootTime{Ready: median(ready), Billed: median(billed), Samples: len(s)}
	}
	return out
}

// median of a non-empty list (the lower middle of an even one); it sorts ds.
func median(ds []time.Duration) time.Duration {
	slices.Sort(ds)
	return ds[(len(ds)-1)/2]
}

// BootTimes returns what each pool's recent boots took, as measured since
// the reconciler started (pools with no measured boot are absent).
func (r *Reconciler) BootTimes() map[string]BootTime { return r.boots.times() }

// logIdlePolicy logs each pool's idle timeout when it is first known and
// whenever it changes (with idle_timeout auto, as boots are measured).
func (r *Reconciler) logIdlePolicy(boots map[string]BootTime) {
	if r.idle == nil {
		r.idle = map[string]time.Duration{}
	}
	for _, pp := range r.o.Policy.Pools {
		d, why := pp.IdlePolicy(boots[pp.Name])
		if last, ok := r.idle[pp.Name]; ok && last == d {
			continue
		}
		r.idle[pp.Name] = d
		r.o.Logger.Info("idle policy", "pool", pp.Name, "idle_timeout", d, "why", why,
			"billing_minimum", pp.BillingMinimum)
	}
}

package daemontest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Reachable is a scaler.Readiness that stands in for HAProxy where the
// builders cannot be reached: EC2 instances (against the ec2test fake or
// moto_server) have made-up private addresses that nothing on the test
// machine may connect to, so no real health check can run. Reachable
// connects to nothing: every bound slot is reported at once as pointing at
// its address, healthy and up, with no sessions unless a test sets some.
//
// Pass it with WithReadiness (or set daemon.Options.Readiness); without
// one, a daemon without HAProxy probes builder addresses itself.
type Reachable struct {
	mu        sync.Mutex
	addrs     map[scaler.SlotKey]string
	sessions  map[scaler.SlotKey]int
	binds     int
	quiesced  []scaler.SlotKey
	onQuiesce func(scaler.SlotKey)
}

var (
	_ scaler.Readiness = (*Reachable)(nil)
	_ scaler.Quiescer  = (*Reachable)(nil)
)

// NewReachable returns a Reachable with no slot bound.
func NewReachable() *Reachable {
	return &Reachable{addrs: map[scaler.SlotKey]string{}, sessions: map[scaler.SlotKey]int{}}
}

// Bind records the slot's address; an empty address unbinds the slot (and
// forgets its sessions).
func (r *Reachable) Bind(_ context.Context, key scaler.SlotKey, addr string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.binds++
	if addr == "" {
		delete(r.addrs, key)
		delete(r.sessions, key)
		return nil
	}
	r.addrs[key] = addr
	return nil
}

// Servers reports every bound slot: its address, healthy, up, and the
// sessions SetSessions gave it (0 by default).
func (r *Reachable) Servers(context.Context) (map[scaler.SlotKey]scaler.ServerStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[scaler.SlotKey]scaler.ServerStatus, len(r.addrs))
	for k, addr := range r.addrs {
		out[k] = scaler.ServerStatus{Addr: addr, Healthy: true, Up: true, Sessions: r.sessions[k]}
	}
	return out, nil
}

// SetSessions sets the open connections reported for a slot (while it is
// bound).
func (r *Reachable) SetSessions(key scaler.SlotKey, n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sessions[key] = n
}

// Quiesce records the call and reports the slot's sessions. There is no
// connection to close; OnQuiesce lets a test make a session arrive just
// before the count, after the round observed the slot idle.
func (r *Reachable) Quiesce(_ context.Context, key scaler.SlotKey) (int, error) {
	r.mu.Lock()
	r.quiesced = append(r.quiesced, key)
	f := r.onQuiesce
	r.mu.Unlock()
	if f != nil {
		f(key)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sessions[key], nil
}

// OnQuiesce runs f at the start of every Quiesce (nil: nothing).
func (r *Reachable) OnQuiesce(f func(scaler.SlotKey)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.onQuiesce = f
}

// Quiesced returns the slots Quiesce was called for, in order.
func (r *Reachable) Quiesced() []scaler.SlotKey {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.quiesced)
}

// Addr is the address a slot is bound to ("" if none).
func (r *Reachable) Addr(key scaler.SlotKey) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addrs[key]
}

// Bound returns every bound slot and its address.
func (r *Reachable) Bound() map[scaler.SlotKey]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.addrs)
}

// Binds counts the Bind calls so far, unbinds included.
func (r *Reachable) Binds() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.binds
}

// WithReadiness makes the daemon use readiness instead of its default
// (HAProxy, or probing builders directly).
func WithReadiness(readiness scaler.Readiness) Option {
	return func(o *daemon.Options) { o.Readiness = readiness }
}

// ConfigProvider is ConfigWithDaemon for a pool "x86" of provider: daemon
// is more TOML keys for [daemon], pool more TOML for the pool (its keys,
// then tables such as [pool.ec2]).
func ConfigProvider(tb testing.TB, provider, daemon, pool string) *config.Config {
	tb.Helper()
	dir := ShortDir(tb)
	text := fmt.Sprintf(`
[daemon]
socket = "%[1]s/d.sock"
state_dir = "%[1]s/state"
metrics_listen = ""
reconcile_interval = "10s"
%[2]s

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
provider = %[3]q
%[4]s
`, dir, daemon, provider, pool)
	cfg, err := config.Parse([]byte(text))
	if err != nil {
		tb.Fatalf("config: %v", err)
	}
	return cfg
}

package spoa

import (
	"net"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/negasus/haproxy-spoe-go/action"
	"github.com/negasus/haproxy-spoe-go/request"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/spoa/wire"
)

func readySlot(name string, weight int) scaler.Slot {
	return scaler.Slot{Pool: "x86", Name: name, State: scaler.Ready, Weight: weight, Address: "10.0.0.1:22"}
}

func observed(slots []scaler.Slot, sessions map[string]int, res ...scaler.Reservation) scaler.Observed {
	obs := scaler.Observed{Slots: slots, Reservations: res, ServersKnown: true, Servers: map[scaler.SlotKey]scaler.ServerStatus{}}
	for _, s := range slots {
		obs.Servers[s.Key()] = scaler.ServerStatus{Addr: s.Address, Up: s.State == scaler.Ready, Sessions: sessions[s.Name]}
	}
	return obs
}

// viewOf publishes an observation as the reconciler would: as a view.
func viewOf(obs scaler.Observed) *scaler.View {
	return scaler.NewView(1, time.Time{}, 0, obs.Slots, obs.Reservations, obs.Servers, obs.ServersKnown)
}

func assignedTo(slot string) scaler.Reservation {
	return scaler.Reservation{ID: "r-" + slot, Pool: "x86", State: scaler.Assigned, Slot: slot}
}

func newAgent(hold time.Duration, kick func()) *Agent {
	return New(Options{MaxJobs: map[string]int{"x86": 2}, Hold: hold, Kick: kick})
}

func TestChoose(t *testing.T) {
	tests := []struct {
		name     string
		slots    []scaler.Slot
		sessions map[string]int
		res      []scaler.Reservation
		want     []string // successive decisions
	}{
		{
			name:     "least connections among slots without reservations",
			slots:    []scaler.Slot{readySlot("slot1", 100), readySlot("slot2", 100)},
			sessions: map[string]int{"slot1": 1},
			want:     []string{"slot2", "slot1", "slot2"},
		},
		{
			name:     "slots holding reservations first, fewest sessions per reservation",
			slots:    []scaler.Slot{readySlot("slot1", 100), readySlot("slot2", 100), readySlot("slot3", 100)},
			res:      []scaler.Reservation{assignedTo("slot2"), assignedTo("slot3")},
			sessions: map[string]int{"slot3": 1},
			want:     []string{"slot2", "slot2", "slot3", "slot1", "slot1"},
		},
		{
			name:  "weight 0 and non-ready slots are never chosen",
			slots: []scaler.Slot{readySlot("slot1", 0), {Pool: "x86", Name: "slot2", State: scaler.Draining, Weight: 100}, readySlot("slot3", 100)},
			want:  []string{"slot3", "slot3", ""},
		},
		{
			name:     "full slots (max_jobs) are not chosen",
			slots:    []scaler.Slot{readySlot("slot1", 100)},
			sessions: map[string]int{"slot1": 2},
			want:     []string{""},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newAgent(0, nil)
			a.Update(viewOf(observed(tt.slots, tt.sessions, tt.res...)))
			for i, want := range tt.want {
				a.mu.Lock()
				got := a.choose("x86")
				a.mu.Unlock()
				if got != want {
					t.Fatalf("decision %d = %q, want %q", i, got, want)
				}
			}
		})
	}
}

func TestUnknownServerStateIsNotUsable(t *testing.T) {
	a := newAgent(0, nil)
	obs := observed([]scaler.Slot{readySlot("slot1", 100)}, nil)
	obs.ServersKnown = false
	a.Update(viewOf(obs))
	if slot, _ := a.Decide("x86"); slot != "" {
		t.Fatalf("Decide = %q while HAProxy's view is unknown; want none", slot)
	}
}

// TestHoldUntilReady runs in a synctest bubble: synctest.Wait returns once
// the held Decide has done all it can with what the test gave it (it is
// blocked again, or has returned), so each step is checked in an order the
// test controls, whatever the machine's load. The hold (a minute of the
// bubble's fake clock) never passes: the test never waits on the clock.
func TestHoldUntilReady(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var kicks atomic.Int32
		a := newAgent(time.Minute, func() { kicks.Add(1) })
		a.Update(viewOf(observed(nil, nil)))
		got := make(chan string, 1)
		// Should a check fail while Decide still holds, the bubble's fake
		// clock runs out the hold (at once) so that it returns.
		defer time.Sleep(time.Hour)
		go func() {
			slot, held := a.Decide("x86")
			if !held {
				slot = "not held"
			}
			got <- slot
		}()
		synctest.Wait()
		// The held connection asked the scaler for a builder.
		if n := kicks.Load(); n != 1 {
			t.Fatalf("Kick called %d times by the held connection, want 1", n)
		}
		if n := a.Held()["x86"]; n != 1 {
			t.Fatalf("Held = %d, want 1", n)
		}
		// A round that sees a builder not yet up changes nothing for it.
		a.Update(viewOf(observed([]scaler.Slot{{Pool: "x86", Name: "slot1", State: scaler.Binding, Weight: 100}}, nil)))
		synctest.Wait()
		select {
		case s := <-got:
			t.Fatalf("Decide returned %q before any slot was ready", s)
		default:
		}
		if n := a.Held()["x86"]; n != 1 {
			t.Fatalf("Held after a round without a ready slot = %d, want 1", n)
		}
		a.Update(viewOf(observed([]scaler.Slot{readySlot("slot1", 100)}, nil)))
		synctest.Wait()
		select {
		case s := <-got:
			if s != "slot1" {
				t.Fatalf("held connection got %q, want slot1", s)
			}
		default:
			t.Fatal("held connection not released when slot1 became ready")
		}
		if n := a.Held()["x86"]; n != 0 {
			t.Fatalf("Held after the release = %d, want 0", n)
		}
		if n := kicks.Load(); n != 1 {
			t.Errorf("Kick called %d times, want 1", n)
		}
	})
}

func TestHoldLimitRejects(t *testing.T) {
	a := newAgent(20*time.Millisecond, nil)
	slot, held := a.Decide("x86")
	if slot != "" || !held {
		t.Fatalf("Decide = %q, held %v; want rejection after the hold", slot, held)
	}
	if n := a.Held()["x86"]; n != 0 {
		t.Fatalf("Held after rejection = %d, want 0", n)
	}
}

func notify(args map[string]any) *request.Request {
	req, m := newRequest(wire.Message)
	for k, v := range args {
		m.KV.Add(k, v)
	}
	return req
}

func setVars(req *request.Request) map[string]any {
	out := map[string]any{}
	for _, act := range req.Actions {
		if act.Type == action.TypeSetVar && act.Scope == action.ScopeSession {
			out[act.Name] = act.Value
		}
	}
	return out
}

func TestHandle(t *testing.T) {
	a := newAgent(10*time.Millisecond, nil)
	a.Update(viewOf(observed([]scaler.Slot{readySlot("slot1", 100)}, nil)))
	args := map[string]any{wire.ArgPool: "x86", wire.ArgSrc: net.ParseIP("127.0.0.1"), wire.ArgSport: int32(40000), wire.ArgQueue: int32(0), wire.ArgBeConn: int32(1), wire.ArgNbSrv: int32(1)}

	req := notify(args)
	a.handle(req)
	if got := setVars(req); len(got) != 1 || got[wire.VarSlot] != "slot1" {
		t.Fatalf("vars = %v, want slot=slot1", got)
	}
	// Only strings are ever sent (v1.0.7 cannot encode net.IP or floats,
	// and panics on negative integers).
	for _, act := range req.Actions {
		if _, ok := act.Value.(string); !ok {
			t.Fatalf("action %s sets a %T", act.Name, act.Value)
		}
	}

	a.Update(viewOf(observed(nil, nil)))
	req = notify(args)
	a.handle(req)
	if got := setVars(req); got[wire.VarVerdict] != wire.VerdictReject || got[wire.VarSlot] != nil {
		t.Fatalf("vars with no builder = %v, want verdict=reject", got)
	}

	args[wire.ArgPool] = "nope"
	req = notify(args)
	a.handle(req)
	if got := setVars(req); len(got) != 0 {
		t.Fatalf("vars for an unknown pool = %v, want none (HAProxy balances itself)", got)
	}
}

func TestHandleRecoversPanics(t *testing.T) {
	a := newAgent(0, func() { panic("boom") })
	req := notify(map[string]any{wire.ArgPool: "x86"})
	a.handle(req) // Kick panics inside Decide; handle must survive it
	if n := a.Held()["x86"]; n != 0 {
		t.Fatalf("Held after a panic = %d, want 0", n)
	}
}

// TestClosedConnectionsFreeRoom: the agent counts connections it routed
// since the last round; when HAProxy's be_conn says they closed, they no
// longer make slots look full (the next connection is routed, not held).
func TestClosedConnectionsFreeRoom(t *testing.T) {
	a := newAgent(20*time.Millisecond, nil) // max_jobs 2
	a.Update(viewOf(observed([]scaler.Slot{readySlot("slot1", 100)}, nil)))
	args := map[string]any{wire.ArgPool: "x86", wire.ArgBeConn: int32(0)}
	for i := 0; i < 2; i++ {
		req := notify(args)
		a.handle(req)
		if got := setVars(req)[wire.VarSlot]; got != "slot1" {
			t.Fatalf("connection %d: vars %v, want slot1", i, setVars(req))
		}
		args[wire.ArgBeConn] = int32(i + 1)
	}
	// Both connections closed: HAProxy reports 0 on the backend.
	args[wire.ArgBeConn] = int32(0)
	req := notify(args)
	a.handle(req)
	if got := setVars(req); got[wire.VarSlot] != "slot1" {
		t.Fatalf("after both closed: vars %v, want slot1 (not held or rejected)", got)
	}
}

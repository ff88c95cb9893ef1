package scaler_test

import (
	"context"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/memstore"
)

// noticingProvider is a runningProvider that also gives notices.
type noticingProvider struct {
	runningProvider
	notices map[string]scaler.Notice
	asked   [][]scaler.Instance
}

func (p *noticingProvider) Notices(_ context.Context, ins []scaler.Instance) (map[string]scaler.Notice, error) {
	p.asked = append(p.asked, ins)
	return p.notices, nil
}

// eventStore keeps the events committed to a memstore, which drops them.
type eventStore struct {
	*memstore.Store
	events []scaler.Event
}

func (s *eventStore) Commit(ctx context.Context, c scaler.Change) error {
	if err := s.Store.Commit(ctx, c); err != nil {
		return err
	}
	s.events = append(s.events, c.Events...)
	return nil
}

// noticeCounter counts Noticed calls.
type noticeCounter struct {
	scaler.NopRecorder
	n map[scaler.NoticeKind]int
}

func (c *noticeCounter) Noticed(_ string, kind scaler.NoticeKind) { c.n[kind]++ }

// TestNoticeObservedRecordedOnce: the reconciler hands the provider's
// notices to the plan (the warned builder drains), and records each
// notice once, as an event and a metric, however many rounds see it; a
// stronger notice for the same builder is recorded again.
func TestNoticeObservedRecordedOnce(t *testing.T) {
	ctx := context.Background()
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	pools := []scaler.PoolPolicy{{Name: "x86", MaxBuilders: 1, ReservationsPerBuilder: 1, IdleTimeout: time.Hour,
		DrainTimeout: time.Hour, LaunchTimeout: time.Hour, BootTimeout: time.Hour, BindTimeout: time.Hour}}
	st := &eventStore{Store: memstore.New(pools, func() scaler.Slot {
		return scaler.Slot{State: scaler.Empty, StateSince: t0, LastActive: t0, Weight: scaler.DefaultWeight}
	})}
	s, err := st.Slot(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	s.State, s.InstanceID, s.Address, s.StateSince = scaler.Ready, "i-1", "127.0.0.1:22", t0
	res := scaler.Reservation{ID: "r1", Pool: "x86", State: scaler.Assigned, Slot: "slot1", CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}
	if err := st.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}, Reservations: []scaler.Reservation{res}}); err != nil {
		t.Fatal(err)
	}
	prov := &noticingProvider{runningProvider: runningProvider{ins: []scaler.Instance{{ID: "i-1", Pool: "x86", Slot: "slot1",
		State: scaler.InstanceRunning, Address: "127.0.0.1:22", LaunchedAt: t0.Add(-time.Hour)}}},
		notices: map[string]scaler.Notice{"i-1": {Instance: "i-1", Kind: scaler.NoticeRebalance}}}
	counter := &noticeCounter{n: map[scaler.NoticeKind]int{}}
	rec := scaler.New(scaler.Options{Store: st, Providers: map[string]scaler.Provider{"x86": prov}, Clock: clocktest.New(t0),
		Readiness: upServers{key: "127.0.0.1:22"}, Policy: scaler.Policy{Pools: pools}, Recorder: counter})
	round := func() {
		t.Helper()
		if _, err := rec.ReconcileOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	round()
	round()
	if s, _ = st.Slot(ctx, key); s.State != scaler.Ready {
		t.Errorf("after a rebalance recommendation with no room for a replacement: slot %s, want ready", s.State)
	}
	prov.notices["i-1"] = scaler.Notice{Instance: "i-1", Kind: scaler.NoticeInterruption, Deadline: t0.Add(2 * time.Minute)}
	round()
	round()
	if s, _ = st.Slot(ctx, key); s.State != scaler.Draining || s.DrainReason != scaler.DrainInterrupted {
		t.Errorf("after an interruption warning: slot %s (%q), want draining (%q)", s.State, s.DrainReason, scaler.DrainInterrupted)
	}
	var notices []string
	for _, ev := range st.events {
		if ev.Kind == scaler.EvNotice {
			notices = append(notices, ev.Reason)
		}
	}
	want := []string{"rebalance recommendation", "interruption warning, reclaimed at 2026-12-01T12:02:00Z"}
	if len(notices) != len(want) || notices[0] != want[0] || notices[1] != want[1] {
		t.Errorf("notice events = %q, want %q", notices, want)
	}
	if counter.n[scaler.NoticeRebalance] != 1 || counter.n[scaler.NoticeInterruption] != 1 {
		t.Errorf("notices counted = %v, want one of each", counter.n)
	}
	if len(prov.asked) != 4 || len(prov.asked[0]) != 1 || prov.asked[0][0].ID != "i-1" {
		t.Errorf("Notices asked %d times (first with %v), want once a round with the listed instances", len(prov.asked), prov.asked)
	}
}

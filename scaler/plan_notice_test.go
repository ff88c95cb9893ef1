package scaler

import (
	"testing"
	"time"
)

func warn(name string) map[string]Notice {
	return map[string]Notice{"i-" + name: {Instance: "i-" + name, Kind: NoticeInterruption, Deadline: t0.Add(2 * time.Minute)}}
}

func rebalance(name string) map[string]Notice {
	return map[string]Notice{"i-" + name: {Instance: "i-" + name, Kind: NoticeRebalance}}
}

func interruptedSlot(name string) Slot {
	return slot(name, Draining, func(s *Slot) { s.DrainReason = DrainInterrupted })
}

// TestPlanNotices: what Plan does with the providers' interruption
// warnings and rebalance recommendations.
func TestPlanNotices(t *testing.T) {
	sessions := func(name string, n int) map[SlotKey]ServerStatus {
		return map[SlotKey]ServerStatus{key(name): {Addr: "10.0.0." + name[4:] + ":22", Up: true, Healthy: true, Sessions: n}}
	}
	tests := []struct {
		name    string
		w       world
		notices map[string]Notice
		want    []string
	}{
		{
			name:    "a warning drains the busy builder at once and launches its replacement in the same round",
			w:       world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{assigned("r1", "slot1")}, servers: sessions("slot1", 1)},
			notices: warn("slot1"),
			want: []string{
				`touch pool="x86" slot="slot1"`,
				`drain pool="x86" slot="slot1" instance="i-slot1" reason="interruption warning"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name:    "an interrupted builder's open sessions are demand even without a reservation",
			w:       world{slots: []Slot{interruptedSlot("slot1"), slot("slot2", Empty), slot("slot3", Empty)}, servers: sessions("slot1", 1)},
			notices: warn("slot1"),
			want:    []string{`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`},
		},
		{
			name: "an interrupted builder with a session open is not terminated",
			w: world{slots: []Slot{interruptedSlot("slot1"), slot("slot2", Booting), slot("slot3", Empty)}, res: []Reservation{assigned("r1", "slot1")},
				instances: []Instance{inst("slot2", InstanceRunning, func(in *Instance) { in.Address = "" })}, servers: sessions("slot1", 1)},
			notices: warn("slot1"),
		},
		{
			name: "reservations move off the interrupted builder once its replacement is ready",
			w: world{slots: []Slot{interruptedSlot("slot1"), slot("slot2", Ready), slot("slot3", Empty)}, res: []Reservation{assigned("r1", "slot1")},
				servers: sessions("slot1", 1)},
			notices: warn("slot1"),
			want: []string{
				`requeue pool="x86" slot="slot1" reservation="r1" reason="builder interrupted: moved to a builder that stays"`,
				`assign pool="x86" slot="slot2" reservation="r1" instance="i-slot2"`,
			},
		},
		{
			name:    "an interrupted builder with nothing open is terminated as drained",
			w:       world{slots: []Slot{interruptedSlot("slot1"), slot("slot2", Empty), slot("slot3", Empty)}},
			notices: warn("slot1"),
			want:    []string{`terminate pool="x86" slot="slot1" instance="i-slot1" cause="drained" reason="drained (interruption warning)" if_idle="true"`},
		},
		{
			name:    "a builder still starting when warned is replaced",
			w:       world{slots: []Slot{slot("slot1", Launching), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0)}},
			notices: warn("slot1"),
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="interrupted" reason="interruption warning while launching"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name:    "an idle-drained builder with a notice is not taken back",
			w:       world{slots: []Slot{slot("slot1", Draining, func(s *Slot) { s.DrainReason = DrainIdle }), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0)}},
			notices: rebalance("slot1"),
			want: []string{
				`terminate pool="x86" slot="slot1" instance="i-slot1" cause="drained" reason="drained (idle)" if_idle="true"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name:    "a rebalance recommendation launches a replacement and keeps the builder serving",
			w:       world{slots: []Slot{slot("slot1", Ready), slot("slot2", Empty), slot("slot3", Empty)}, res: []Reservation{assigned("r1", "slot1")}, servers: sessions("slot1", 1)},
			notices: rebalance("slot1"),
			want: []string{
				`touch pool="x86" slot="slot1"`,
				`launch pool="x86" slot="slot2" reason="1 need a builder, 1 builders wanted, 0 active"`,
			},
		},
		{
			name: "a rebalanced builder is drained once its replacement is ready",
			w: world{slots: []Slot{slot("slot1", Ready), slot("slot2", Ready), slot("slot3", Empty)}, res: []Reservation{assigned("r1", "slot1")},
				servers: sessions("slot1", 1)},
			notices: rebalance("slot1"),
			want: []string{
				`touch pool="x86" slot="slot1"`,
				`drain pool="x86" slot="slot1" instance="i-slot1" reason="rebalance recommendation"`,
			},
		},
		{
			name:    "a builder with a rebalance recommendation gets new work only when no other has room",
			w:       world{slots: []Slot{slot("slot1", Ready), slot("slot2", Ready), slot("slot3", Empty)}, res: []Reservation{pending("r1", 0)}},
			notices: rebalance("slot1"),
			want: []string{
				`assign pool="x86" slot="slot2" reservation="r1" instance="i-slot2"`,
				`drain pool="x86" slot="slot1" instance="i-slot1" reason="rebalance recommendation"`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			obs := tt.w.observed()
			obs.Notices = tt.notices
			got := render(Plan(t0, policy(), obs))
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

package agentcheck

import (
	"strings"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

func TestReply(t *testing.T) {
	slot := func(st scaler.SlotState, weight int) scaler.Slot {
		return scaler.Slot{Pool: "x86", Name: "slot1", State: st, InstanceID: "i-0abc", InstanceType: "c7i.large", Market: "spot", Weight: weight}
	}
	tests := []struct {
		name    string
		slot    scaler.Slot
		maxJobs int
		want    string
	}{
		{"empty", slot(scaler.Empty, 100), 4, "maint"},
		{"launching", slot(scaler.Launching, 100), 4, "maint"},
		{"booting", slot(scaler.Booting, 100), 4, "down #booting i-0abc"},
		{"binding", slot(scaler.Binding, 100), 4, "ready down #binding i-0abc"},
		{"booting without instance id", scaler.Slot{State: scaler.Booting}, 4, "down #booting"},
		{"ready", slot(scaler.Ready, 100), 4, "up ready 100% maxconn:4 #i-0abc c7i.large spot"},
		{"ready weight 50", slot(scaler.Ready, 50), 2, "up ready 50% maxconn:2 #i-0abc c7i.large spot"},
		{"ready weight 200", slot(scaler.Ready, 200), 4, "up ready 200% maxconn:4 #i-0abc c7i.large spot"},
		{"ready weight 0", slot(scaler.Ready, 0), 4, "up ready 0% maxconn:4 #i-0abc c7i.large spot"},
		{"ready weight max", slot(scaler.Ready, scaler.MaxWeight), 4, "up ready 256% maxconn:4 #i-0abc c7i.large spot"},
		{"ready weight above max", slot(scaler.Ready, 1000), 4, "up ready 256% maxconn:4 #i-0abc c7i.large spot"},
		{"ready weight negative", slot(scaler.Ready, -5), 4, "up ready 0% maxconn:4 #i-0abc c7i.large spot"},
		{"ready without max_jobs", slot(scaler.Ready, 100), 0, "up ready 100% #i-0abc c7i.large spot"},
		{"ready without description", scaler.Slot{State: scaler.Ready, Weight: 100}, 4, "up ready 100% maxconn:4"},
		{"ready, hostile description", scaler.Slot{State: scaler.Ready, Weight: 100, InstanceID: "i-1\nmaint", InstanceType: "a b#c,d\r", Market: "on-demand"},
			4, "up ready 100% maxconn:4 #i-1maint abcd on-demand"},
		{"draining", slot(scaler.Draining, 100), 4, "drain"},
		{"terminating", slot(scaler.Terminating, 100), 4, "maint"},
		{"unknown state", slot("exploded", 100), 4, "maint"},
		{"zero slot", scaler.Slot{}, 4, "maint"},
	}
	covered := map[scaler.SlotState]bool{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Reply(tt.slot, tt.maxJobs)
			if got != tt.want {
				t.Errorf("Reply(%+v, %d) = %q, want %q", tt.slot, tt.maxJobs, got, tt.want)
			}
			if strings.ContainsAny(got, "\r\n") {
				t.Errorf("Reply = %q holds a line end", got)
			}
		})
		covered[tt.slot.State] = true
	}
	for _, st := range scaler.SlotStates {
		if !covered[st] {
			t.Errorf("state %s has no test case", st)
		}
	}
}

func TestReplyLongDescription(t *testing.T) {
	s := scaler.Slot{State: scaler.Ready, Weight: 100, InstanceID: strings.Repeat("i", 500), InstanceType: strings.Repeat("t", 500)}
	got := Reply(s, 4)
	want := "up ready 100% maxconn:4 #" + strings.Repeat("i", maxField) + " " + strings.Repeat("t", maxField)
	if got != want {
		t.Errorf("Reply = %q, want %q", got, want)
	}
}

package scaler

import (
	"context"
	"time"
)

// recordNotices writes an EvNotice event and counts a metric for each
// notice about a slot's builder not recorded yet. It lives outside Plan:
// a notice is level-based input to the plan, but its record is an edge
// (first seen), which only the reconciler's memory can tell. After a
// restart a notice still in force is recorded once more.
func (r *Reconciler) recordNotices(ctx context.Context, now time.Time, obs Observed) error {
	seen := make(map[string]NoticeKind, len(obs.Notices))
	var evs []Event
	var pools []string
	for _, s := range obs.Slots {
		n, ok := obs.Notices[s.InstanceID]
		if s.InstanceID == "" || !ok {
			continue
		}
		seen[s.InstanceID] = n.Kind
		if r.noticed[s.InstanceID] == n.Kind {
			continue
		}
		reason := "rebalance recommendation"
		if n.Kind == NoticeInterruption {
			reason = "interruption warning"
			if !n.Deadline.IsZero() {
				reason += ", reclaimed at " + n.Deadline.UTC().Format(time.RFC3339)
			}
		}
		evs = append(evs, Event{At: now, Kind: EvNotice, Pool: s.Pool, Slot: s.Name, InstanceID: s.InstanceID, Actor: actor, Reason: reason})
		pools = append(pools, s.Pool)
	}
	if len(evs) > 0 {
		if err := r.o.Store.Commit(ctx, Change{Events: evs}); err != nil {
			return err
		}
		for i, ev := range evs {
			r.o.Recorder.Noticed(pools[i], seen[ev.InstanceID])
			r.o.Logger.Warn("provider takes a builder back", "slot", SlotKey{ev.Pool, ev.Slot}, "instance", ev.InstanceID, "notice", ev.Reason)
		}
	}
	r.noticed = seen
	return nil
}

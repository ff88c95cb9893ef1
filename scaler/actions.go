package scaler

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Action is one step Plan asks the reconciler to take. Each kind is its own
// type with only the fields it needs; the reconciler applies it with a type
// switch, one method per type, so a new kind that nobody applies, or an
// applier that reads a field its kind does not have, fails to compile
// rather than at run time. String renders it for logs, errors and Plan's
// table tests.
type Action interface {
	fmt.Stringer
	// describe returns the fields every action shares, for String and the
	// event log.
	describe() actionText
}

// Launch starts a builder in an empty slot.
type Launch struct {
	Pool, Slot, Reason string
}

// Adopt records an instance found by the slot's launch id (To empty), or
// takes an untracked instance into its free slot (To Booting).
type Adopt struct {
	Pool, Slot, Instance string
	To                   SlotState
	Reason               string
}

// Advance moves a slot to state To because of what was observed.
type Advance struct {
	Pool, Slot, Instance string
	To                   SlotState
	Reason               string
}

// Bind writes the slot's builder address into the load balancer.
type Bind struct {
	Pool, Slot, Instance, Addr string
}

// Touch marks a busy slot active: now, or At (a release's time).
type Touch struct {
	Pool, Slot string
	At         time.Time // zero: the round's time
	Intent     string    // the released intent it applies, if any
}

// Drain stops new work going to a slot.
type Drain struct {
	Pool, Slot, Instance, Reason string
	Intent                       string // the operator's drain intent, if any
}

// Undrain takes a draining slot back into service: an operator's intent,
// or an idle-drained builder that demand wants again (Intent empty).
type Undrain struct {
	Pool, Slot, Instance, Intent string
	Reason                       string
}

// SetWeight sets a slot's load balancer weight (an operator's intent).
type SetWeight struct {
	Pool, Slot, Instance string
	Weight               int
	Intent               string
}

// Forget drops an intent without changing its slot: refused (Refused says
// why) or already true.
type Forget struct {
	Pool, Slot, Intent, Refused string
}

// Terminate terminates a slot's instance, or an orphan instance when Slot
// is empty, for Cause.
type Terminate struct {
	Pool, Slot, Instance string
	Cause                Cause
	Reason               string
	// IfIdle asks the reconciler to close the builder to new connections
	// and terminate it only if no session is open then (see Quiescer).
	IfIdle bool
}

// RetryTerminate asks the provider again to terminate the instance of a
// slot already terminating (a failed call, or one whose answer was lost);
// the slot and its counts do not change.
type RetryTerminate struct {
	Pool, Slot, Instance, Reason string
}

// Assign gives a pending reservation the slot.
type Assign struct {
	Pool, Slot, Reservation, Instance string
}

// Requeue sends an assigned reservation back to pending.
type Requeue struct {
	Pool, Slot, Reservation, Reason string
}

// EndReservation ends a live reservation as Failed or Expired.
type EndReservation struct {
	Pool, Slot, Reservation string
	State                   ReservationState // Failed or Expired
	Reason                  string
}

// actionText is every field an action may show, in the order String
// prints them.
type actionText struct {
	Kind, Pool, Slot, Reservation, Instance, Addr string
	To                                            SlotState
	Cause                                         Cause
	Reason                                        string
	IfIdle                                        bool
	Intent                                        string
	Weight                                        string
}

func (t actionText) String() string {
	var b strings.Builder
	b.WriteString(t.Kind)
	for _, kv := range [][2]string{{"pool", t.Pool}, {"slot", t.Slot}, {"reservation", t.Reservation},
		{"instance", t.Instance}, {"addr", t.Addr}, {"to", string(t.To)}, {"cause", string(t.Cause)}, {"reason", t.Reason},
		{"if_idle", map[bool]string{true: "true"}[t.IfIdle]}, {"intent", t.Intent}, {"weight", t.Weight}} {
		if kv[1] != "" {
			fmt.Fprintf(&b, " %s=%q", kv[0], kv[1])
		}
	}
	return b.String()
}

func (a Launch) describe() actionText {
	return actionText{Kind: "launch", Pool: a.Pool, Slot: a.Slot, Reason: a.Reason}
}
func (a Adopt) describe() actionText {
	return actionText{Kind: "adopt", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, To: a.To, Reason: a.Reason}
}
func (a Advance) describe() actionText {
	return actionText{Kind: "advance", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, To: a.To, Reason: a.Reason}
}
func (a Bind) describe() actionText {
	return actionText{Kind: "bind", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, Addr: a.Addr}
}
func (a Touch) describe() actionText {
	return actionText{Kind: "touch", Pool: a.Pool, Slot: a.Slot, Intent: a.Intent}
}
func (a Drain) describe() actionText {
	return actionText{Kind: "drain", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, Reason: a.Reason, Intent: a.Intent}
}
func (a Undrain) describe() actionText {
	return actionText{Kind: "undrain", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, Reason: a.Reason, Intent: a.Intent}
}
func (a SetWeight) describe() actionText {
	return actionText{Kind: "weight", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, Reason: fmt.Sprintf("weight %d", a.Weight),
		Intent: a.Intent, Weight: strconv.Itoa(a.Weight)}
}
func (a Forget) describe() actionText {
	return actionText{Kind: "forget", Pool: a.Pool, Slot: a.Slot, Reason: a.Refused, Intent: a.Intent}
}
func (a Terminate) describe() actionText {
	return actionText{Kind: "terminate", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, Cause: a.Cause, Reason: a.Reason, IfIdle: a.IfIdle}
}
func (a RetryTerminate) describe() actionText {
	return actionText{Kind: "retry-terminate", Pool: a.Pool, Slot: a.Slot, Instance: a.Instance, Reason: a.Reason}
}
func (a Assign) describe() actionText {
	return actionText{Kind: "assign", Pool: a.Pool, Slot: a.Slot, Reservation: a.Reservation, Instance: a.Instance}
}
func (a Requeue) describe() actionText {
	return actionText{Kind: "requeue", Pool: a.Pool, Slot: a.Slot, Reservation: a.Reservation, Reason: a.Reason}
}
func (a EndReservation) describe() actionText {
	kind := "fail"
	if a.State == Expired {
		kind = "expire"
	}
	return actionText{Kind: kind, Pool: a.Pool, Slot: a.Slot, Reservation: a.Reservation, Reason: a.Reason}
}

func (a Launch) String() string         { return a.describe().String() }
func (a Adopt) String() string          { return a.describe().String() }
func (a Advance) String() string        { return a.describe().String() }
func (a Bind) String() string           { return a.describe().String() }
func (a Touch) String() string          { return a.describe().String() }
func (a Drain) String() string          { return a.describe().String() }
func (a Undrain) String() string        { return a.describe().String() }
func (a SetWeight) String() string      { return a.describe().String() }
func (a Forget) String() string         { return a.describe().String() }
func (a Terminate) String() string      { return a.describe().String() }
func (a RetryTerminate) String() string { return a.describe().String() }
func (a Assign) String() string         { return a.describe().String() }
func (a Requeue) String() string        { return a.describe().String() }
func (a EndReservation) String() string { return a.describe().String() }

// Package scaler holds the autoscaler's core: slot and reservation states,
// the pure scaling policy (Plan) and the reconciler that applies it.
package scaler

import (
	"context"
	"errors"
	"slices"
	"strings"
	"time"
)

// SlotState is the persisted runtime state of a slot (docs/design.md §1).
type SlotState string

const (
	Empty       SlotState = "empty"
	Launching   SlotState = "launching"
	Booting     SlotState = "booting"
	Binding     SlotState = "binding"
	Ready       SlotState = "ready"
	Draining    SlotState = "draining"
	Terminating SlotState = "terminating"
)

// SlotStates lists every slot state in lifecycle order.
var SlotStates = []SlotState{Empty, Launching, Booting, Binding, Ready, Draining, Terminating}

// Starting reports whether a slot in state s holds an instance that is on its
// way to ready.
func (s SlotState) Starting() bool { return s == Launching || s == Booting || s == Binding }

// HasInstance reports whether a slot in state s may own a provider instance.
func (s SlotState) HasInstance() bool { return s != Empty }

// SlotKey names a slot: its pool and its HAProxy server name (slot1..slotN).
type SlotKey struct {
	Pool string
	Slot string
}

func (k SlotKey) String() string { return k.Pool + "/" + k.Slot }

// ParseSlotKey parses "pool/slot".
func ParseSlotKey(s string) (SlotKey, error) {
	pool, slot, ok := strings.Cut(s, "/")
	if !ok || pool == "" || slot == "" || strings.Contains(slot, "/") {
		return SlotKey{}, errors.New("slot must be written <pool>/<slot>, e.g. x86/slot1")
	}
	return SlotKey{Pool: pool, Slot: slot}, nil
}

// Route is what sends a build to a pool: the Nix systems the pool builds for
// and the features it offers.
type Route struct {
	Systems  []string
	Features []string
}

// Serves reports whether the route takes a build for system that needs every
// one of features.
func (r Route) Serves(system string, features []string) bool {
	if !slices.Contains(r.Systems, system) {
		return false
	}
	for _, f := range features {
		if !slices.Contains(r.Features, f) {
			return false
		}
	}
	return true
}

// MatchPool returns the index of the first of pools whose route serves a
// build for system that needs features, or -1 if none does.
func MatchPool[P any](pools []P, route func(P) Route, system string, features []string) int {
	return slices.IndexFunc(pools, func(p P) bool { return route(p).Serves(system, features) })
}

// DefaultWeight is the HAProxy weight of a slot no operator has changed.
const DefaultWeight = 100

// MaxWeight is the highest weight HAProxy accepts.
const MaxWeight = 256

// Slot is one HAProxy server position of a pool and the builder it holds.
type Slot struct {
	Pool  string
	Name  string
	State SlotState
	// InstanceID is the provider's id of the builder, once Launch returned it.
	InstanceID string
	// LaunchID is written before the provider is called and tagged onto the
	// instance, so an instance launched just before a crash is found again.
	LaunchID     string
	Address      string // host:port HAProxy connects to
	InstanceType string
	Market       string
	Zone         string
	StateSince   time.Time
	// LastActive is when the slot last held a reservation or a session; idle
	// time counts from here.
	LastActive time.Time
	Weight     int
	// DrainReason says why a slot is draining or terminating ("idle",
	// "operator", "max lifetime", ...); empty otherwise.
	DrainReason string
	// Version counts committed changes of the row (optimistic concurrency).
	Version int64
}

func (s Slot) Key() SlotKey { return SlotKey{Pool: s.Pool, Slot: s.Name} }

// ReservationState is the lifecycle state of a reservation (docs/design.md §3.1).
type ReservationState string

const (
	Pending  ReservationState = "pending"
	Assigned ReservationState = "ready"
	Released ReservationState = "released"
	Failed   ReservationState = "failed"
	Expired  ReservationState = "expired"
)

// ReservationStates lists every reservation state.
var ReservationStates = []ReservationState{Pending, Assigned, Released, Failed, Expired}

// Live reports whether a reservation in state s still holds or waits for capacity.
func (s ReservationState) Live() bool { return s == Pending || s == Assigned }

// Reservation is a lease on build capacity in one pool.
type Reservation struct {
	ID       string
	Pool     string
	System   string
	Features []string
	Owner    string
	// Source names where the demand comes from (a CI project); it matches
	// the reservation to the Forecast of that source.
	Source     string
	State      ReservationState
	Slot       string // set while State == Assigned
	Lease      time.Duration
	CreatedAt  time.Time
	ExpiresAt  time.Time
	AssignedAt time.Time
	EndedAt    time.Time
	Reason     string
	Version    int64
}

// InstanceState is a provider instance's lifecycle state, EC2's vocabulary.
type InstanceState string

const (
	InstancePending      InstanceState = "pending"
	InstanceRunning      InstanceState = "running"
	InstanceShuttingDown InstanceState = "shutting-down"
	InstanceStopping     InstanceState = "stopping"
	InstanceStopped      InstanceState = "stopped"
	InstanceTerminated   InstanceState = "terminated"
)

// Gone reports whether an instance in state s will never serve builds again.
func (s InstanceState) Gone() bool {
	return s == InstanceShuttingDown || s == InstanceStopping || s == InstanceStopped || s == InstanceTerminated
}

// Instance is a builder machine as its provider reports it.
type Instance struct {
	ID       string
	Pool     string // from the instance's tags
	Slot     string
	LaunchID string
	State    InstanceState
	// Address is where the builder's sshd listens (host:port), empty until known.
	Address     string
	LaunchedAt  time.Time
	Type        string
	Market      string
	Zone        string // availability zone, where the provider has them
	StateReason string // why the provider stopped it, e.g. Server.SpotInstanceTermination
	// PrivateIP and PublicIP are the provider's addresses of the machine;
	// discovery may choose one of them as Address.
	PrivateIP string
	PublicIP  string
}

// LaunchRequest asks a provider for one builder in a pool's slot.
type LaunchRequest struct {
	Pool     string
	Slot     string
	LaunchID string
}

// Provider starts and stops builder machines. Implementations tag every
// instance with the cluster, pool, slot and launch id at launch time, so List
// finds all of them after any crash.
type Provider interface {
	Launch(ctx context.Context, req LaunchRequest) (Instance, error)
	// Terminate stops an instance; an instance that is already gone is success.
	Terminate(ctx context.Context, instanceID string) error
	// List returns every instance tagged for this cluster, in any state.
	List(ctx context.Context) ([]Instance, error)
}

// ServerStatus is what the load balancer knows of a slot's server.
type ServerStatus struct {
	Addr string // address the server currently points at ("" if none)
	// Healthy: the builder answers the load balancer's health check (its
	// SSH banner). A binding slot becomes ready on this.
	Healthy bool
	// Up: the load balancer sends it new connections (healthy, and not
	// held down or in maintenance by the agent).
	Up       bool
	Sessions int // open connections
	// The admin side, as far as the load balancer reports it (a Pusher
	// does): in maintenance, draining, held down by its agent, and its
	// weight. A round re-pushes a slot whose server disagrees with it.
	Maint, Drain, AgentDown bool
	Weight                  int
}

// Agrees reports whether the load balancer's server is in the admin state
// and weight that slot s's state asks for (what Pusher.Push sets and the
// agent check answers). Health is not compared: a ready builder that fails
// its check is the check's business, not a push's.
func (srv ServerStatus) Agrees(s Slot) bool {
	switch s.State {
	case Binding:
		return !srv.Maint && !srv.Drain
	case Ready:
		return !srv.Maint && !srv.Drain && !srv.AgentDown && srv.Weight == min(max(s.Weight, 0), MaxWeight)
	case Draining:
		return srv.Drain || srv.Maint // in maintenance: quiesced before terminating
	}
	return srv.Maint
}

// Readiness binds builder addresses into the load balancer and reports which
// servers are up. The product's implementation is HAProxy (runtime API);
// scaler/local.Prober checks SSH banners directly for setups without it.
type Readiness interface {
	Bind(ctx context.Context, key SlotKey, addr string) error
	Servers(ctx context.Context) (map[SlotKey]ServerStatus, error)
}

// QueueReader is a Readiness that reads, in the same call as Servers, the
// connections the load balancer queues per pool because the builders they
// may go to are full (for HAProxy: qcur of the pool's backend and of its
// servers, from the one `show stat`). Queued only lists pools with a queue.
// Plan counts queued connections as demand (Observed.Queued).
type QueueReader interface {
	ServersAndQueues(ctx context.Context) (servers map[SlotKey]ServerStatus, queued map[string]int, err error)
}

// Quiescer is a Readiness that can close a slot's server to new
// connections, leaving open ones alone, and count the sessions still open:
// the confirm step before a drained builder is terminated. Plan saw no
// session, but HAProxy routes on its own between the round's observation
// and the terminate call (a connection balanced there, or steered by a
// SPOE answer given just before the view changed). Closed first and counted
// after, nothing can slip in between; pushing "drain" narrows that window
// but cannot close it.
type Quiescer interface {
	Quiesce(ctx context.Context, key SlotKey) (sessions int, err error)
}

// Pusher is a Readiness that can set a slot's server to the slot's state and
// weight at once (for HAProxy: its runtime API), instead of at the agent
// check's next answer. The agent check stays the authority: it answers from
// the same view, and it is what restores the state after HAProxy reloads or
// restarts. The reconciler pushes after publishing the view that holds the
// change, so an agent check between the two cannot undo a push, and
// confirms by observing the server in the next round.
type Pusher interface {
	Push(ctx context.Context, s Slot) error
}

// Event is one line of the append-only event log: who did what to which slot,
// instance or reservation, and why.
type Event struct {
	At            time.Time
	Kind          string // see the Ev* constants
	Pool          string
	Slot          string
	InstanceID    string
	ReservationID string
	Actor         string // "reconciler", "api", "operator", ...
	Reason        string
}

// Event kinds.
const (
	EvCreated    = "created"
	EvLaunched   = "launched"
	EvAdopted    = "adopted"
	EvBooted     = "booted"
	EvBound      = "bound"
	EvReady      = "ready"
	EvAssigned   = "assigned"
	EvRequeued   = "requeued"
	EvReleased   = "released"
	EvExpired    = "expired"
	EvDrained    = "drained"
	EvUndrained  = "undrained"
	EvWeight     = "weight"
	EvTerminated = "terminated"
	EvEmptied    = "emptied"
	EvFailed     = "failed"
	EvHeartbeat  = "heartbeat"
	// EvNotice: the provider announced that it takes the slot's builder
	// back (an interruption warning, a rebalance recommendation).
	EvNotice = "notice"
	// EvForecast and EvForecastWithdrawn: a forecast was made, withdrawn.
	EvForecast          = "forecast"
	EvForecastWithdrawn = "forecast_withdrawn"
)

// Change is one atomic write: slots and reservations to update (compared on
// Version, so a concurrent writer's change is never overwritten), intents
// recorded and intents done, and the events that explain them.
type Change struct {
	Slots        []Slot
	Reservations []Reservation
	Events       []Event
	// Intents are recorded for the reconciler to apply (API writers only).
	Intents []Intent
	// DoneIntents are the ids of intents this change applied or refused
	// (the reconciler only); they are deleted with it.
	DoneIntents []string
}

// IntentKind is what an operator or client asked of a slot.
type IntentKind string

const (
	// IntentDrain: stop new work going to the slot (operator).
	IntentDrain IntentKind = "drain"
	// IntentUndrain: take a draining slot back into service (operator).
	IntentUndrain IntentKind = "undrain"
	// IntentWeight: set the slot's load balancer weight (operator).
	IntentWeight IntentKind = "weight"
	// IntentReleased: a reservation on the slot was released at At, so the
	// builder's idle time counts from then (client).
	IntentReleased IntentKind = "released"
)

// Intent is a request to change a slot, recorded durably by the API and
// applied by the reconciler, the only writer of slot rows (docs/design.md
// §1.1). The reconciler deletes it in the commit that applies or refuses it.
type Intent struct {
	ID     string
	Kind   IntentKind
	Pool   string
	Slot   string
	Weight int // IntentWeight
	At     time.Time
	Actor  string // "operator", "api"
}

func (in Intent) Key() SlotKey { return SlotKey{Pool: in.Pool, Slot: in.Slot} }

// IntentResult is how the reconciler dealt with an intent: applied (Refused
// empty) or refused, and the slot as that round left it.
type IntentResult struct {
	Refused string
	Slot    Slot
}

// ErrConflict is returned by a Store when a row changed since it was read.
var ErrConflict = errors.New("concurrent update")

// RetryOnConflict calls attempt until it returns an error that does not wrap
// ErrConflict (or nil), at most attempts times, and returns the last error.
// Each attempt re-reads the rows it changes and decides afresh, so a
// concurrent change is merged, never overwritten.
func RetryOnConflict(attempts int, attempt func() error) error {
	var err error
	for range max(attempts, 1) {
		if err = attempt(); !errors.Is(err, ErrConflict) {
			return err
		}
	}
	return err
}

// Errors a Provider's Launch wraps, so that the reconciler (and metrics)
// can tell a provider that is out of capacity or rate from one that fails.
var (
	// ErrNoCapacity: nothing the pool may use can be had now (every
	// instance type, zone and market refused). Retry later.
	ErrNoCapacity = errors.New("no capacity")
	// ErrThrottled: the provider's API refused the call for its rate;
	// nothing was launched. Retry soon.
	ErrThrottled = errors.New("throttled")
)

// ErrNotFound is returned for an unknown reservation or slot.
var ErrNotFound = errors.New("not found")

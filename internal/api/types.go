// Package api is the client side of the daemon's HTTP reservation and
// operator API (docs/design.md §3.1): its wire types and the Go client
// autoscalerctl uses. It imports only the standard library and clock, so API clients
// do not pull in the server (internal/apiserver), the store (cgo SQLite),
// the config parser or Prometheus; cmd/autoscalerctl's deps_test.go checks
// that.
package api

import "time"

// CreateReservationRequest is the body of POST /v1/reservations.
type CreateReservationRequest struct {
	ID       string   `json:"id,omitempty"`
	Pool     string   `json:"pool,omitempty"`
	System   string   `json:"system"`
	Features []string `json:"features,omitempty"`
	Owner    string   `json:"owner,omitempty"`
	Lease    string   `json:"lease,omitempty"` // Go duration, e.g. "10m"
	// Source names where the demand comes from (a CI project); it matches
	// the reservation to a forecast of that source.
	Source string `json:"source,omitempty"`
}

// Reservation is a reservation as the API shows it.
type Reservation struct {
	ID         string     `json:"id"`
	Pool       string     `json:"pool"`
	System     string     `json:"system"`
	Features   []string   `json:"features"`
	Owner      string     `json:"owner"`
	Source     string     `json:"source,omitempty"`
	State      string     `json:"state"` // pending, ready, released, failed, expired
	Slot       string     `json:"slot,omitempty"`
	Address    string     `json:"address,omitempty"`
	InstanceID string     `json:"instance_id,omitempty"`
	Lease      string     `json:"lease"`
	CreatedAt  time.Time  `json:"created_at"`
	ExpiresAt  time.Time  `json:"expires_at"`
	AssignedAt *time.Time `json:"assigned_at,omitempty"`
	EndedAt    *time.Time `json:"ended_at,omitempty"`
	Reason     string     `json:"reason,omitempty"`
	// WaitSeconds is how long the reservation waited (or has waited) for a slot.
	WaitSeconds float64 `json:"wait_seconds"`
}

// CreateForecastRequest is the body of POST /v1/forecasts: an evaluation
// of Source started, and its builds will want builders of one pool (Pool,
// or the one that serves System and Features).
type CreateForecastRequest struct {
	ID       string   `json:"id"`
	Source   string   `json:"source"`
	Pool     string   `json:"pool,omitempty"`
	System   string   `json:"system,omitempty"`
	Features []string `json:"features,omitempty"`
	// Builds is how many builds are expected; nil: the daemon estimates
	// it from the source's past forecasts.
	Builds *int   `json:"builds,omitempty"`
	TTL    string `json:"ttl,omitempty"` // Go duration; default 30m, at most 6h
}

// Forecast is a forecast as the API shows it.
type Forecast struct {
	ID        string   `json:"id"`
	Source    string   `json:"source"`
	Pool      string   `json:"pool"`
	System    string   `json:"system,omitempty"`
	Features  []string `json:"features"`
	Builds    int      `json:"builds"`
	Estimated bool     `json:"estimated"`
	// Arrived counts the reservations of this source that came in its
	// pool while its TTL ran; Remaining is what it still counts as demand.
	Arrived     int        `json:"arrived"`
	Remaining   int        `json:"remaining"`
	State       string     `json:"state"` // open, withdrawn, expired
	CreatedAt   time.Time  `json:"created_at"`
	ExpiresAt   time.Time  `json:"expires_at"`
	WithdrawnAt *time.Time `json:"withdrawn_at,omitempty"`
}

// ForecastList is the answer of GET /v1/forecasts: one page, newest first.
type ForecastList struct {
	Forecasts []Forecast `json:"forecasts"`
	// Next is the cursor of the next page; empty on the last page.
	Next string `json:"next,omitempty"`
}

// Page sizes of the list endpoints (GET /v1/reservations, /v1/events and
// /v1/forecasts): a request without limit gets DefaultPageSize items, and
// limit may be at most MaxPageSize. An answer with more items after it has
// "next", an opaque cursor; the next page is the same request with
// cursor=<next>.
const (
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

// Slot is a slot as the API shows it.
type Slot struct {
	Pool       string `json:"pool"`
	Slot       string `json:"slot"`
	State      string `json:"state"`
	InstanceID string `json:"instance_id,omitempty"`
	// LaunchID is tagged onto the instance at launch: while a launch is in
	// flight (or was cut off by a crash) it finds the instance before its id
	// is known.
	LaunchID     string    `json:"launch_id,omitempty"`
	Address      string    `json:"address,omitempty"`
	InstanceType string    `json:"instance_type,omitempty"`
	Market       string    `json:"market,omitempty"`
	Zone         string    `json:"zone,omitempty"`
	Weight       int       `json:"weight"`
	Since        time.Time `json:"since"`
	LastActive   time.Time `json:"last_active,omitzero"`
	DrainReason  string    `json:"drain_reason,omitempty"`
	Reservations int       `json:"reservations"` // live reservations assigned here
}

// WeightRequest is the body of POST /v1/slots/{pool}/{slot}/weight.
type WeightRequest struct {
	Weight *int `json:"weight"`
}

// PoolStatus summarises one pool.
type PoolStatus struct {
	Name                   string         `json:"name"`
	Systems                []string       `json:"systems"`
	Features               []string       `json:"features"`
	MinBuilders            int            `json:"min_builders"`
	MaxBuilders            int            `json:"max_builders"`
	WarmPool               int            `json:"warm_pool"`
	ReservationsPerBuilder int            `json:"reservations_per_builder"`
	Slots                  map[string]int `json:"slots"`        // by state
	Reservations           map[string]int `json:"reservations"` // live, by state
	// HeldConnections waits in HAProxy for a builder (demand without a
	// reservation).
	HeldConnections int `json:"held_connections"`
	// QueuedConnections waits in HAProxy's queues because the builders it
	// may go to are at max_jobs; like held ones, each counts as demand.
	QueuedConnections int `json:"queued_connections"`
}

// HAProxyStatus tells whether HAProxy and the SPOE agent work.
type HAProxyStatus struct {
	Enabled bool `json:"enabled"`
	// Up: the last runtime-API call succeeded.
	Up bool `json:"up"`
	// SPOAUp: HAProxy's health check of the SPOE agent passes; null when
	// HAProxy does not say.
	SPOAUp *bool  `json:"spoa_up"`
	Error  string `json:"error,omitempty"`
}

// Status is the answer of GET /v1/status.
type Status struct {
	Pools     []PoolStatus    `json:"pools"`
	Reconcile ReconcileStatus `json:"reconcile"`
	HAProxy   HAProxyStatus   `json:"haproxy"`
}

// ReconcileStatus tells how the last reconcile went.
type ReconcileStatus struct {
	LastAt          time.Time `json:"last_at,omitzero"`
	LastError       string    `json:"last_error,omitempty"`
	DurationSeconds float64   `json:"duration_seconds"`
	// Phases is where the round's time went, in seconds. observe is
	// store, list and servers read at once (the longest of them); plan,
	// apply, publish and push follow one after the other.
	Phases RoundPhases `json:"phases_seconds"`
	Rounds uint64      `json:"rounds"`
}

// RoundPhases is the time of each phase of a reconcile round, in seconds.
type RoundPhases struct {
	Observe float64 `json:"observe"`
	Store   float64 `json:"store"`
	List    float64 `json:"list"`
	Servers float64 `json:"servers"`
	Plan    float64 `json:"plan"`
	Apply   float64 `json:"apply"`
	Publish float64 `json:"publish"`
	Push    float64 `json:"push"`
}

// Error is the body of every error answer.
type Error struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Error codes.
const (
	CodeBadRequest   = "bad_request"
	CodeNotFound     = "not_found"
	CodeUnauthorized = "unauthorized"
	CodeTooLarge     = "body_too_large"
	CodeConflict     = "conflict"
	CodeInternal     = "internal"
	CodeUnavailable  = "unavailable"
	// CodeMethodNotAllowed: the path exists, but not with this method
	// (status 405; the Allow header lists the methods it has).
	CodeMethodNotAllowed = "method_not_allowed"
	// CodeBusy: a write kept meeting concurrent changes of the same
	// reservation and gave up (status 503, with Retry-After); retrying
	// later is safe.
	CodeBusy = "busy"
)

// Event is one entry of the daemon's event log.
type Event struct {
	At            time.Time `json:"at"`
	Kind          string    `json:"kind"`
	Pool          string    `json:"pool,omitempty"`
	Slot          string    `json:"slot,omitempty"`
	InstanceID    string    `json:"instance_id,omitempty"`
	ReservationID string    `json:"reservation_id,omitempty"`
	Actor         string    `json:"actor,omitempty"`
	Reason        string    `json:"reason,omitempty"`
}

// ReservationList is the answer of GET /v1/reservations: one page, newest
// first.
type ReservationList struct {
	Reservations []Reservation `json:"reservations"`
	// Next is the cursor of the next (older) page; empty on the last page.
	Next string `json:"next,omitempty"`
}

// SlotList is the answer of GET /v1/slots.
type SlotList struct {
	Slots []Slot `json:"slots"`
}

// EventList is the answer of GET /v1/events: one page, the newest events
// that match, oldest first (like tail -n).
type EventList struct {
	Events []Event `json:"events"`
	// Next is the cursor of the next page, of the events before these;
	// empty on the last page.
	Next string `json:"next,omitempty"`
}

// Package apiserver serves the daemon's HTTP reservation and operator API
// (docs/design.md §3.1) over the store and the reconciler. The wire types
// and the Go client live in internal/api, which API clients such as
// autoscalerctl import without pulling in the server's dependencies.
package apiserver

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path"
	"strings"
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// MaxBodyBytes bounds every request body.
const MaxBodyBytes = 64 << 10

// DefaultBodyReadTimeout bounds the time a client may take to send a
// request body. It is a read deadline on the connection, set when a request
// with a body arrives and lifted once the body is read, so a client that
// announces a body and never sends it cannot hold a connection (and a
// handler) for ever, while long polls and the handlers that wait for a
// reconcile round run as long as they need. Set here, it holds on every
// listener the API is served on, whatever its http.Server's settings.
const DefaultBodyReadTimeout = 30 * time.Second

// Store is the state the API reads and writes.
type Store interface {
	CreateReservation(ctx context.Context, r scaler.Reservation, ev scaler.Event) (scaler.Reservation, bool, error)
	Reservation(ctx context.Context, id string) (scaler.Reservation, error)
	Reservations(ctx context.Context, f store.ReservationFilter) ([]scaler.Reservation, error)
	LiveReservations(ctx context.Context) ([]scaler.Reservation, error)
	Slots(ctx context.Context) ([]scaler.Slot, error)
	Slot(ctx context.Context, key scaler.SlotKey) (scaler.Slot, error)
	Commit(ctx context.Context, c scaler.Change) error
	LoggedEvents(ctx context.Context, f store.EventFilter) ([]store.LoggedEvent, error)
	// Generation counts committed writes (store.DB.Generation).
	Generation() uint64
	ForecastStore
}

// Scaler is the reconciler as the API drives it.
type Scaler interface {
	Kick()
	// Reconcile runs a round that starts after the call and waits for it.
	Reconcile(ctx context.Context) error
	Status() scaler.RoundStatus
	// Result returns how a round dealt with an intent (once).
	Result(id string) (scaler.IntentResult, bool)
}

// Options configures a Server.
type Options struct {
	Store        Store
	Scaler       Scaler
	Pools        []config.Pool
	Reservations config.Reservations
	Clock        clock.Clock // nil = wall clock
	Logger       *slog.Logger
	// HAProxy reports HAProxy's state for /v1/status (nil: not in use).
	HAProxy func() api.HAProxyStatus
	// Held reports connections held for a builder, per pool (nil: none).
	Held func() map[string]int
	// Queued reports connections queued for a builder with room, per pool,
	// as last read from the load balancer (nil: none).
	Queued func() map[string]int
	// Views is where the reconciler publishes the fleet; reads and long
	// polls are answered from it (nil: from the store).
	Views *scaler.Views
	// BodyReadTimeout bounds the time to send a request body (0:
	// DefaultBodyReadTimeout).
	BodyReadTimeout time.Duration
}

// Server serves the reservation and operator API.
type Server struct {
	o      Options
	notify notifier
	mux    *http.ServeMux

	// The API's own writes, by generation (Store.Generation after the
	// write): a view older than a write does not show it, so what the
	// write touched is read from the store until a view catches up.
	mu        sync.Mutex
	lastWrite uint64            // any reservation
	written   map[string]uint64 // per reservation id

	locks idLocks // the API's writes of one reservation take turns
}

// New returns a server; mount Handler on a listener.
func New(o Options) *Server {
	if o.Clock == nil {
		o.Clock = clock.Real{}
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Views == nil {
		o.Views = &scaler.Views{}
	}
	if o.BodyReadTimeout <= 0 {
		o.BodyReadTimeout = DefaultBodyReadTimeout
	}
	s := &Server{o: o, notify: notifier{ch: make(chan struct{})}, mux: http.NewServeMux(), written: map[string]uint64{}}
	s.mux.HandleFunc("POST /v1/reservations", s.create)
	s.mux.HandleFunc("GET /v1/reservations", s.listReservations)
	s.mux.HandleFunc("GET /v1/reservations/{id}", s.get)
	s.mux.HandleFunc("POST /v1/reservations/{id}/heartbeat", s.heartbeat)
	s.mux.HandleFunc("DELETE /v1/reservations/{id}", s.release)
	s.mux.HandleFunc("POST /v1/forecasts", s.createForecast)
	s.mux.HandleFunc("GET /v1/forecasts", s.listForecasts)
	s.mux.HandleFunc("GET /v1/forecasts/{id}", s.getForecast)
	s.mux.HandleFunc("DELETE /v1/forecasts/{id}", s.withdrawForecast)
	s.mux.HandleFunc("GET /v1/slots", s.slots)
	s.mux.HandleFunc("POST /v1/slots/{pool}/{slot}/drain", s.drain)
	s.mux.HandleFunc("POST /v1/slots/{pool}/{slot}/undrain", s.undrain)
	s.mux.HandleFunc("POST /v1/slots/{pool}/{slot}/weight", s.weight)
	s.mux.HandleFunc("GET /v1/status", s.status)
	s.mux.HandleFunc("POST /v1/reconcile", s.reconcile)
	s.mux.HandleFunc("GET /v1/events", s.events)
	s.mux.HandleFunc("GET /healthz", s.health)
	return s
}

// Handler is the API without authentication (for the unix socket, where
// file permissions decide who may connect).
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength != 0 {
			armBodyDeadline(w, s.o.BodyReadTimeout)
		}
		// Every handler reads at most MaxBodyBytes.
		r.Body = http.MaxBytesReader(w, r.Body, MaxBodyBytes)
		if clean := cleanPath(r.URL.Path); clean != r.URL.Path {
			// The mux would redirect to the clean path, with an HTML body;
			// every answer of the API is JSON, and no client needs the
			// redirect.
			writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no endpoint %s %s; write the path as %s", r.Method, quote(r.URL.Path), quote(clean)))
			return
		}
		if _, pattern := s.mux.Handler(r); pattern == "" {
			if allow := s.allowed(r); len(allow) > 0 {
				w.Header().Set("Allow", strings.Join(allow, ", "))
				writeError(w, http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, fmt.Sprintf("%s %s: method not allowed; use %s", r.Method, r.URL.Path, strings.Join(allow, " or ")))
				return
			}
			writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no endpoint %s %s; see docs/design.md §3.1 for the API", r.Method, r.URL.Path))
			return
		}
		s.mux.ServeHTTP(w, r)
	})
}

// cleanPath is the path net/http's ServeMux redirects p to: no empty, "."
// or ".." segments, a trailing slash kept.
func cleanPath(p string) string {
	if p == "" || p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if p[len(p)-1] == '/' && np != "/" {
		np += "/"
	}
	return np
}

// allowed lists the methods that have an endpoint at r's path.
func (s *Server) allowed(r *http.Request) []string {
	var allow []string
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodDelete} {
		probe := r.Clone(r.Context())
		probe.Method = m
		if _, pattern := s.mux.Handler(probe); pattern != "" {
			allow = append(allow, m)
		}
	}
	return allow
}

// RequireToken wraps h so that every request but /healthz needs
// "Authorization: Bearer <token>". The comparison is constant-time: it
// compares SHA-256 digests, which have a fixed length, because
// subtle.ConstantTimeCompare returns at once when the lengths differ and
// so would tell the token's length.
//
// A refused request is answered at once and its connection closed: its body
// is never read (net/http would otherwise read an unread body after the
// answer, to reuse the connection, and wait for ever on a client that
// announced a body and sends none).
func RequireToken(token string, h http.Handler) http.Handler {
	want := sha256.Sum256([]byte("Bearer " + token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			got := sha256.Sum256([]byte(r.Header.Get("Authorization")))
			if token == "" || subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
				refuse(w)
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// refuse answers 401 and closes the connection without reading the body.
func refuse(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="nix-builder-autoscaler"`)
	w.Header().Set("Connection", "close")
	// A deadline in the past makes the server's read of the unread body
	// after the answer fail at once; Connection: close then drops the
	// connection. Not supported (a test recorder): nothing to wait for.
	_ = http.NewResponseController(w).SetReadDeadline(time.Now())
	writeError(w, http.StatusUnauthorized, api.CodeUnauthorized, "missing or wrong bearer token; send Authorization: Bearer <token from the daemon's token_file>")
}

// armBodyDeadline sets a read deadline d from now on the connection of w.
// net/http lifts it itself once the body has been read to its end (it
// clears the deadline when it starts watching the connection for the
// client going away), and sets its own for the next request; a body that
// never comes fails the handler's read, or the server's read of the unread
// rest after the answer, which then closes the connection.
func armBodyDeadline(w http.ResponseWriter, d time.Duration) {
	// The wall clock: the deadline is the network poller's. Not
	// supported (a test recorder): no connection to hold.
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(d))
}

// Notify wakes every long poll so it re-reads its reservation.
func (s *Server) Notify() { s.notify.broadcast() }

type notifier struct {
	mu sync.Mutex
	ch chan struct{}
}

func (n *notifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}

func (n *notifier) broadcast() {
	n.mu.Lock()
	defer n.mu.Unlock()
	close(n.ch)
	n.ch = make(chan struct{})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, api.Error{Error: msg, Code: code})
}

func (s *Server) internal(w http.ResponseWriter, what string, err error) {
	s.o.Logger.Error("api: "+what, "err", err)
	writeError(w, http.StatusInternalServerError, api.CodeInternal, what+": "+err.Error())
}

// decode reads a JSON body strictly: size-limited, no unknown fields, one value.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		// Exactly one value: anything but the end of the body after it is
		// an error (json.Decoder.More misses a stray ']' or '}').
		var rest json.RawMessage
		switch e := dec.Decode(&rest); {
		case errors.Is(e, io.EOF):
			return true
		case errors.As(e, new(*http.MaxBytesError)):
			err = e
		default:
			err = errors.New("trailing data after the JSON object")
		}
	}
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, api.CodeTooLarge, fmt.Sprintf("request body larger than %d bytes", MaxBodyBytes))
	case errors.Is(err, os.ErrDeadlineExceeded):
		w.Header().Set("Connection", "close")
		writeError(w, http.StatusRequestTimeout, api.CodeBadRequest, "request body not received in time; send it with the request")
	case errors.Is(err, io.EOF):
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "empty body; send a JSON object")
	default:
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "invalid JSON body: "+err.Error())
	}
	return false
}

package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// DefaultSocket is where the daemon serves the API by default.
const DefaultSocket = "/run/nix-builder-autoscaler/daemon.sock"

// DefaultTimeout bounds one request when Client.Timeout is zero.
const DefaultTimeout = 30 * time.Second

// MaxResponseBytes is the most the client reads of one response body.
const MaxResponseBytes = 8 << 20

// unixHost is the Host of requests sent over the unix socket; the daemon
// ignores it.
const unixHost = "daemon"

// Client talks to the daemon's API over its unix socket or over TCP.
// Its methods are safe for concurrent use; set Timeout before the first call.
type Client struct {
	// Timeout bounds each request, from sending it to reading the whole
	// answer. A long poll gets its wait on top. Zero means DefaultTimeout.
	Timeout time.Duration
	// Clock paces WaitReady's polls (nil: clock.Real).
	Clock clock.Clock

	base     string // scheme://host[/prefix], no trailing slash
	token    string
	endpoint string // for error messages: "unix socket /path" or the base URL
	hc       *http.Client
}

// NewUnixClient returns a client for the daemon listening on the unix
// socket at path socket.
func NewUnixClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 90 * time.Second,
	}
	return &Client{
		base:     "http://" + unixHost,
		endpoint: "unix socket " + socket,
		hc:       &http.Client{Transport: tr},
	}
}

// NewHTTPClient returns a client for the daemon's TCP listener at baseURL
// (e.g. "https://ci-host:8443"). A non-empty token is sent as a bearer token
// with every request.
func NewHTTPClient(baseURL, token string) *Client {
	var tr http.RoundTripper = http.DefaultTransport
	if dt, ok := http.DefaultTransport.(*http.Transport); ok {
		tr = dt.Clone()
	}
	base := strings.TrimRight(baseURL, "/")
	return &Client{
		base:     base,
		token:    token,
		endpoint: base,
		hc:       &http.Client{Transport: tr},
	}
}

// Endpoint describes where the client connects, e.g.
// "unix socket /run/nix-builder-autoscaler/daemon.sock".
func (c *Client) Endpoint() string { return c.endpoint }

// APIError is an error answer of the daemon (any status outside 2xx).
type APIError struct {
	Status  int    // HTTP status
	Code    string // one of the Code* constants; empty if the body was not an Error
	Message string
}

func (e *APIError) Error() string { return e.Message }

// UnreachableError means no answer came from the daemon: the connection
// failed, or no answer arrived within the client's timeout.
type UnreachableError struct {
	Endpoint string // "unix socket /path" or the base URL
	Err      error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("cannot reach the daemon at %s: %v (is nix-builder-autoscaler running? use --socket or --url to point elsewhere)", e.Endpoint, e.Err)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// ReservationQuery filters GET /v1/reservations. Zero fields do not filter;
// Limit zero leaves the page size to the daemon (DefaultPageSize).
type ReservationQuery struct {
	States []string // e.g. "pending", "ready"
	Pool   string
	Limit  int
	// Cursor asks for the page after the one whose Next it is.
	Cursor string
}

// EventQuery filters GET /v1/events. Zero fields do not filter; Limit zero
// leaves the page size to the daemon (DefaultPageSize).
type EventQuery struct {
	Limit int
	Since time.Time // events at or after this time

	Pool        string
	Slot        string
	Reservation string // reservation id
	// Cursor asks for the page (of older events) after the one whose Next
	// it is.
	Cursor string
}

// CreateReservation asks for a reservation. created is true when the daemon
// made a new one (201) and false when one with the same id existed (200).
func (c *Client) CreateReservation(ctx context.Context, req CreateReservationRequest) (r Reservation, created bool, err error) {
	status, err := c.do(ctx, http.MethodPost, "/v1/reservations", nil, req, 0, &r)
	return r, err == nil && status == http.StatusCreated, err
}

// Reservation returns reservation id. With wait > 0 it is a long poll: the
// daemon answers as soon as the reservation is no longer pending, or after
// wait with its current state.
func (c *Client) Reservation(ctx context.Context, id string, wait time.Duration) (Reservation, error) {
	var q url.Values
	if wait > 0 {
		q = url.Values{"wait": {wait.String()}}
	}
	var r Reservation
	_, err := c.do(ctx, http.MethodGet, "/v1/reservations/"+url.PathEscape(id), q, nil, wait, &r)
	return r, err
}

// WaitReady long-polls reservation id, each poll waiting up to poll (30s if
// poll <= 0), until its state is no longer pending, and returns it. It stops
// at the first error, and when ctx ends it returns the last state seen with
// an error wrapping ctx.Err().
func (c *Client) WaitReady(ctx context.Context, id string, poll time.Duration) (Reservation, error) {
	if poll <= 0 {
		poll = 30 * time.Second
	}
	// A daemon answering a long poll at once while still pending must not
	// make this loop spin.
	minGap := min(poll, time.Second)
	clk := c.Clock
	if clk == nil {
		clk = clock.Real{}
	}
	var last Reservation
	for {
		start := clk.Now()
		r, err := c.Reservation(ctx, id, poll)
		if err != nil {
			return last, err
		}
		last = r
		if r.State != "pending" {
			return r, nil
		}
		_ = clock.Sleep(ctx, clk, minGap-clock.Since(clk, start))
		if err := ctx.Err(); err != nil {
			return last, fmt.Errorf("reservation %s still pending: %w", id, err)
		}
	}
}

// Heartbeat extends the lease of reservation id.
func (c *Client) Heartbeat(ctx context.Context, id string) (Reservation, error) {
	var r Reservation
	_, err := c.do(ctx, http.MethodPost, "/v1/reservations/"+url.PathEscape(id)+"/heartbeat", nil, nil, 0, &r)
	return r, err
}

// Release releases reservation id. Releasing an ended reservation is not an
// error; the answer shows its state.
func (c *Client) Release(ctx context.Context, id string) (Reservation, error) {
	var r Reservation
	_, err := c.do(ctx, http.MethodDelete, "/v1/reservations/"+url.PathEscape(id), nil, nil, 0, &r)
	return r, err
}

// CreateForecast tells the daemon that demand is coming (POST
// /v1/forecasts); created is false when the forecast existed (a retry).
func (c *Client) CreateForecast(ctx context.Context, req CreateForecastRequest) (f Forecast, created bool, err error) {
	status, err := c.do(ctx, http.MethodPost, "/v1/forecasts", nil, req, 0, &f)
	return f, err == nil && status == http.StatusCreated, err
}

// WithdrawForecast says the forecast's evaluation ended.
func (c *Client) WithdrawForecast(ctx context.Context, id string) (Forecast, error) {
	var f Forecast
	_, err := c.do(ctx, http.MethodDelete, "/v1/forecasts/"+url.PathEscape(id), nil, nil, 0, &f)
	return f, err
}

// Forecasts lists the newest forecasts, open or ended.
func (c *Client) Forecasts(ctx context.Context) (ForecastList, error) {
	var l ForecastList
	_, err := c.do(ctx, http.MethodGet, "/v1/forecasts", nil, nil, 0, &l)
	return l, err
}

// Reservations lists one page of reservations, newest first; see
// ListReservations for more than a page.
func (c *Client) Reservations(ctx context.Context, q ReservationQuery) (ReservationList, error) {
	v := url.Values{}
	if len(q.States) > 0 {
		v.Set("state", strings.Join(q.States, ","))
	}
	if q.Pool != "" {
		v.Set("pool", q.Pool)
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	if q.Cursor != "" {
		v.Set("cursor", q.Cursor)
	}
	var l ReservationList
	_, err := c.do(ctx, http.MethodGet, "/v1/reservations", v, nil, 0, &l)
	return l, err
}

// Slots lists every slot of every pool.
func (c *Client) Slots(ctx context.Context) (SlotList, error) {
	var l SlotList
	_, err := c.do(ctx, http.MethodGet, "/v1/slots", nil, nil, 0, &l)
	return l, err
}

// Status summarises the pools and the reconciler.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	_, err := c.do(ctx, http.MethodGet, "/v1/status", nil, nil, 0, &s)
	return s, err
}

// Drain stops new work going to a slot; its builder is retired once idle.
func (c *Client) Drain(ctx context.Context, pool, slot string) (Slot, error) {
	return c.slotAction(ctx, pool, slot, "drain", nil)
}

// Undrain takes back an operator's drain.
func (c *Client) Undrain(ctx context.Context, pool, slot string) (Slot, error) {
	return c.slotAction(ctx, pool, slot, "undrain", nil)
}

// SetWeight sets a slot's HAProxy weight (0..256).
func (c *Client) SetWeight(ctx context.Context, pool, slot string, w int) (Slot, error) {
	return c.slotAction(ctx, pool, slot, "weight", WeightRequest{Weight: &w})
}

func (c *Client) slotAction(ctx context.Context, pool, slot, action string, body any) (Slot, error) {
	var s Slot
	p := "/v1/slots/" + url.PathEscape(pool) + "/" + url.PathEscape(slot) + "/" + action
	_, err := c.do(ctx, http.MethodPost, p, nil, body, 0, &s)
	return s, err
}

// Reconcile runs a reconcile round now and returns how it went.
func (c *Client) Reconcile(ctx context.Context) (ReconcileStatus, error) {
	var s ReconcileStatus
	_, err := c.do(ctx, http.MethodPost, "/v1/reconcile", nil, nil, 0, &s)
	return s, err
}

// Events returns one page of the daemon's event log: the newest entries
// that match (before q.Cursor), oldest first; see ListEvents for more than a
// page.
func (c *Client) Events(ctx context.Context, q EventQuery) (EventList, error) {
	v := url.Values{}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	if !q.Since.IsZero() {
		v.Set("since", q.Since.UTC().Format(time.RFC3339Nano))
	}
	if q.Pool != "" {
		v.Set("pool", q.Pool)
	}
	if q.Slot != "" {
		v.Set("slot", q.Slot)
	}
	if q.Reservation != "" {
		v.Set("reservation", q.Reservation)
	}
	if q.Cursor != "" {
		v.Set("cursor", q.Cursor)
	}
	var l EventList
	_, err := c.do(ctx, http.MethodGet, "/v1/events", v, nil, 0, &l)
	return l, err
}

// Health checks that the daemon answers and reports itself ok.
func (c *Client) Health(ctx context.Context) error {
	var h struct {
		Status string `json:"status"`
	}
	if _, err := c.do(ctx, http.MethodGet, "/healthz", nil, nil, 0, &h); err != nil {
		return err
	}
	if h.Status != "ok" {
		return fmt.Errorf("daemon health is %q, not \"ok\"", h.Status)
	}
	return nil
}

// do sends one request and decodes a 2xx answer into out. extra lengthens
// the request's timeout (the wait of a long poll). It returns the HTTP
// status when an answer arrived.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, body any, extra time.Duration, out any) (int, error) {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, fmt.Errorf("encode %s %s: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}

	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	timeout += max(extra, 0)
	rctx, cancel := context.WithTimeoutCause(ctx, timeout, errNoAnswer)
	defer cancel()

	req, err := http.NewRequestWithContext(rctx, method, u, rd)
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "nix-builder-autoscaler-client")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}

	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, c.transportError(ctx, rctx, timeout, err)
	}
	defer resp.Body.Close()

	data, err := readLimited(resp.Body, MaxResponseBytes)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return resp.StatusCode, fmt.Errorf("read answer of %s %s: %w", method, path, ctxErr)
		}
		if errors.Is(context.Cause(rctx), errNoAnswer) {
			return resp.StatusCode, &UnreachableError{Endpoint: c.endpoint, Err: fmt.Errorf("answer not complete within %s: %w", timeout, context.DeadlineExceeded)}
		}
		return resp.StatusCode, fmt.Errorf("read answer of %s %s: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, decodeError(resp, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, fmt.Errorf("decode answer of %s %s: %w", method, path, err)
		}
	}
	return resp.StatusCode, nil
}

// errNoAnswer is the cause of a request context ended by the client's own
// timeout.
var errNoAnswer = errors.New("no answer in time")

func (c *Client) transportError(ctx, rctx context.Context, timeout time.Duration, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		// The caller gave up; that is not the daemon's fault.
		return fmt.Errorf("request to the daemon at %s: %w", c.endpoint, ctxErr)
	}
	if errors.Is(context.Cause(rctx), errNoAnswer) {
		return &UnreachableError{Endpoint: c.endpoint, Err: fmt.Errorf("no answer within %s: %w", timeout, context.DeadlineExceeded)}
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return &UnreachableError{Endpoint: c.endpoint, Err: err}
}

func readLimited(r io.Reader, limit int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("answer larger than %d bytes", limit)
	}
	return data, nil
}

func decodeError(resp *http.Response, data []byte) error {
	e := &APIError{Status: resp.StatusCode}
	var body Error
	if json.Unmarshal(data, &body) == nil && body.Error != "" {
		e.Code = body.Code
		e.Message = body.Error
		return e
	}
	// Not our error body (a proxy in between, or a daemon too old or too new).
	text := strings.TrimSpace(string(data))
	if len(text) > 200 {
		text = strings.ToValidUTF8(text[:200], "") + "..."
	}
	e.Message = "daemon answered " + resp.Status
	if text != "" {
		e.Message += ": " + text
	}
	return e
}

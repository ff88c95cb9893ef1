package apiserver

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// ForecastStore is the part of Store that forecasts use.
type ForecastStore interface {
	CreateForecast(ctx context.Context, f scaler.Forecast, ev scaler.Event) (scaler.Forecast, bool, error)
	WithdrawForecast(ctx context.Context, id string, ev scaler.Event) (scaler.Forecast, error)
	Forecast(ctx context.Context, id string) (scaler.Forecast, error)
	ForecastPage(ctx context.Context, limit int, after store.ListKey) ([]scaler.Forecast, error)
	ForecastHistory(ctx context.Context, source, pool string, n int) ([]int, error)
}

// checkSource says what is wrong with a source, or "": at most maxSource
// bytes of UTF-8 without control characters; required says it may not be
// empty.
func checkSource(src string, required bool) string {
	switch {
	case src == "" && required:
		return `source: required, e.g. "github:owner/repo": the project whose evaluation started, as its builds' reservations will name it`
	}
	return checkText("source", src, maxSource)
}

func (s *Server) createForecast(w http.ResponseWriter, r *http.Request) {
	var req api.CreateForecastRequest
	if !decode(w, r, &req) {
		return
	}
	ttl, msg := s.validateForecast(&req)
	if msg != "" {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, msg)
		return
	}
	now := s.o.Clock.Now()
	f := scaler.Forecast{ID: req.ID, Source: req.Source, Pool: req.Pool, System: req.System, Features: req.Features,
		CreatedAt: now, ExpiresAt: now.Add(ttl)}
	if f.Pool == "" {
		if f.Pool = s.matchPool(req.System, req.Features); f.Pool == "" {
			writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("system: no pool serves system %s with features [%s]; configured: %s",
				req.System, strings.Join(req.Features, " "), s.poolSummary()))
			return
		}
	}
	if req.Builds != nil {
		f.Builds = *req.Builds
	} else {
		n, err := scaler.Estimate(r.Context(), s.o.Store, f.Source, f.Pool)
		if err != nil {
			s.internal(w, "read forecast history", err)
			return
		}
		f.Builds, f.Estimated = n, true
	}
	ev := scaler.Event{At: now, Kind: scaler.EvForecast, Pool: f.Pool, Actor: "api",
		Reason: fmt.Sprintf("forecast %s from %s: %d builds%s, ttl %s", f.ID, f.Source, f.Builds, map[bool]string{true: " (estimated)"}[f.Estimated], ttl)}
	got, created, err := s.o.Store.CreateForecast(r.Context(), f, ev)
	if err != nil {
		s.internal(w, "create forecast", err)
		return
	}
	if !created {
		if got.Source != f.Source || got.Pool != f.Pool || req.Builds != nil && (got.Builds != *req.Builds || got.Estimated) {
			writeError(w, http.StatusConflict, api.CodeConflict, fmt.Sprintf("forecast %s already exists with other parameters (source %s, pool %s, %d builds); choose a new id",
				got.ID, got.Source, got.Pool, got.Builds))
			return
		}
		writeJSON(w, http.StatusOK, s.forecastView(got))
		return
	}
	s.o.Logger.Info("forecast", "forecast", got.ID, "source", got.Source, "pool", got.Pool, "builds", got.Builds, "estimated", got.Estimated, "ttl", ttl)
	s.o.Scaler.Kick()
	writeJSON(w, http.StatusCreated, s.forecastView(got))
}

// validateForecast checks and completes a forecast request; msg says what
// is wrong and how to fix it.
func (s *Server) validateForecast(req *api.CreateForecastRequest) (ttl time.Duration, msg string) {
	if !reID.MatchString(req.ID) {
		return 0, "id: required, 1-128 characters of letters, digits and ._:@/+- starting with a letter or digit; one per evaluation, so that a retry is not a second forecast"
	}
	if msg := checkSource(req.Source, true); msg != "" {
		return 0, msg
	}
	if req.System != "" {
		if msg := checkSystem(req.System); msg != "" {
			return 0, msg
		}
	}
	if msg := checkFeatures(req.Features); msg != "" {
		return 0, msg
	}
	req.Features = slices.Compact(slices.Sorted(slices.Values(req.Features)))
	switch {
	case req.Pool != "":
		p, ok := s.pool(req.Pool)
		if !ok {
			return 0, fmt.Sprintf("pool: no pool named %s; configured: %s", quote(req.Pool), s.poolSummary())
		}
		if req.System != "" && !p.Serves(req.System, req.Features) {
			return 0, fmt.Sprintf("pool: %s does not serve system %s with features [%s]", req.Pool, req.System, strings.Join(req.Features, " "))
		}
	case req.System == "":
		return 0, `system: required without a pool, e.g. "x86_64-linux": it picks the pool, as for a reservation`
	}
	if b := req.Builds; b != nil && (*b < 0 || *b > scaler.MaxForecastBuilds) {
		return 0, fmt.Sprintf("builds: %d is outside 0..%d; leave it out to let the daemon estimate it", *b, scaler.MaxForecastBuilds)
	}
	ttl = scaler.DefaultForecastTTL
	if req.TTL != "" {
		d, err := time.ParseDuration(req.TTL)
		switch {
		case err != nil:
			return 0, fmt.Sprintf("ttl: %s is not a duration; write it like \"30m\"", quote(req.TTL))
		case d <= 0:
			return 0, "ttl: must be positive"
		case d > scaler.MaxForecastTTL:
			return 0, fmt.Sprintf("ttl: %s is longer than %s; an evaluation that long should send a new forecast", d, scaler.MaxForecastTTL)
		}
		ttl = d
	}
	return ttl, ""
}

func (s *Server) withdrawForecast(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	now := s.o.Clock.Now()
	f, err := s.o.Store.WithdrawForecast(r.Context(), id, scaler.Event{At: now, Kind: scaler.EvForecastWithdrawn, Actor: "api",
		Reason: "forecast " + id + " withdrawn"})
	if errors.Is(err, scaler.ErrNotFound) {
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no forecast %s", quote(id)))
		return
	}
	if err != nil {
		s.internal(w, "withdraw forecast", err)
		return
	}
	if f.WithdrawnAt.Equal(now) {
		s.o.Logger.Info("forecast withdrawn", "forecast", f.ID, "source", f.Source, "pool", f.Pool, "arrived", f.Arrived)
		// The pool's target may drop: no launch for it is needed any more.
		s.o.Scaler.Kick()
	}
	writeJSON(w, http.StatusOK, s.forecastView(f))
}

func (s *Server) getForecast(w http.ResponseWriter, r *http.Request) {
	f, err := s.o.Store.Forecast(r.Context(), r.PathValue("id"))
	if errors.Is(err, scaler.ErrNotFound) {
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no forecast %s", quote(r.PathValue("id"))))
		return
	}
	if err != nil {
		s.internal(w, "read forecast", err)
		return
	}
	writeJSON(w, http.StatusOK, s.forecastView(f))
}

func (s *Server) listForecasts(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit, ok := pageLimit(w, q)
	if !ok {
		return
	}
	after, ok := keyFromCursor(w, q, cursorForecasts)
	if !ok {
		return
	}
	fs, err := s.o.Store.ForecastPage(r.Context(), limit+1, after)
	if err != nil {
		s.internal(w, "list forecasts", err)
		return
	}
	out := api.ForecastList{Forecasts: make([]api.Forecast, 0, min(len(fs), limit))}
	if len(fs) > limit {
		fs = fs[:limit]
		last := fs[limit-1]
		out.Next = keyCursor(cursorForecasts, store.ListKey{CreatedAt: last.CreatedAt, ID: last.ID})
	}
	for _, f := range fs {
		out.Forecasts = append(out.Forecasts, s.forecastView(f))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) forecastView(f scaler.Forecast) api.Forecast {
	now := s.o.Clock.Now()
	v := api.Forecast{ID: f.ID, Source: f.Source, Pool: f.Pool, System: f.System, Features: f.Features, Builds: f.Builds,
		Estimated: f.Estimated, Arrived: f.Arrived, Remaining: f.Remaining(now), State: string(f.State(now)),
		CreatedAt: f.CreatedAt, ExpiresAt: f.ExpiresAt}
	if v.Features == nil {
		v.Features = []string{}
	}
	if !f.WithdrawnAt.IsZero() {
		t := f.WithdrawnAt
		v.WithdrawnAt = &t
	}
	return v
}

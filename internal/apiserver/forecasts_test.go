package apiserver

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

func (ts *testServer) forecast(method, path, body string, wantStatus int) api.Forecast {
	ts.t.Helper()
	a := ts.do(method, path, body)
	if a.status != wantStatus {
		ts.t.Fatalf("%s %s %s: status %d, want %d: %s", method, path, body, a.status, wantStatus, a.body)
	}
	var f api.Forecast
	if err := json.Unmarshal(a.body, &f); err != nil {
		ts.t.Fatalf("%s %s: %v: %s", method, path, err, a.body)
	}
	return f
}

// TestForecastLifecycle: a forecast is made once per id, counts the
// reservations of its source that arrive (also after its withdrawal), and
// the next forecast of that source without a count is estimated from them.
func TestForecastLifecycle(t *testing.T) {
	ts := newTestServer(t)
	body := `{"id":"eval-1","source":"github:o/r","system":"x86_64-linux","builds":2,"ttl":"20m"}`
	f := ts.forecast("POST", "/v1/forecasts", body, http.StatusCreated)
	if f.Pool != "x86" || f.Builds != 2 || f.Estimated || f.State != "open" || f.Remaining != 2 || !f.ExpiresAt.Equal(serverT0.Add(20*time.Minute)) {
		t.Errorf("created forecast = %+v; want x86, 2 builds, open, 2 remaining, expiring in 20m", f)
	}
	ts.kicks.kmu.Lock()
	kicks := ts.kicks.kicks
	ts.kicks.kmu.Unlock()
	if kicks == 0 {
		t.Errorf("a new forecast kicked no round")
	}
	if again := ts.forecast("POST", "/v1/forecasts", body, http.StatusOK); again.CreatedAt != f.CreatedAt || again.Builds != 2 {
		t.Errorf("the same forecast again = %+v, want the first one", again)
	}
	if a := ts.do("POST", "/v1/forecasts", strings.Replace(body, `"builds":2`, `"builds":3`, 1)); a.status != http.StatusConflict {
		t.Errorf("the same id with other builds: %d %s, want 409", a.status, a.body)
	}

	ts.clock.Advance(time.Minute)
	ts.createReservation(`{"id":"b1","system":"x86_64-linux","source":"github:o/r"}`)
	ts.createReservation(`{"id":"b-other","system":"x86_64-linux","source":"github:o/other"}`)
	if f = ts.forecast("GET", "/v1/forecasts/eval-1", "", http.StatusOK); f.Arrived != 1 || f.Remaining != 1 {
		t.Errorf("after one reservation of its source: %+v, want 1 arrived, 1 remaining", f)
	}

	if f = ts.forecast("DELETE", "/v1/forecasts/eval-1", "", http.StatusOK); f.State != "withdrawn" || f.Remaining != 0 || f.WithdrawnAt == nil {
		t.Errorf("withdrawn forecast = %+v, want withdrawn, nothing remaining", f)
	}
	ts.forecast("DELETE", "/v1/forecasts/eval-1", "", http.StatusOK)
	if a := ts.do("DELETE", "/v1/forecasts/nope", ""); a.status != http.StatusNotFound {
		t.Errorf("withdrawing an unknown forecast: %d, want 404", a.status)
	}
	// The builds start when the evaluation ends: they still count.
	ts.createReservation(`{"id":"b2","system":"x86_64-linux","source":"github:o/r"}`)
	ts.createReservation(`{"id":"b3","system":"x86_64-linux","source":"github:o/r"}`)
	if f = ts.forecast("GET", "/v1/forecasts/eval-1", "", http.StatusOK); f.Arrived != 3 {
		t.Errorf("after its builds arrived: %+v, want 3 arrived", f)
	}

	ts.clock.Advance(time.Hour)
	next := ts.forecast("POST", "/v1/forecasts", `{"id":"eval-2","source":"github:o/r","system":"x86_64-linux"}`, http.StatusCreated)
	if !next.Estimated || next.Builds != 3 {
		t.Errorf("next forecast without a count = %+v, want 3 builds estimated from the last evaluation", next)
	}
	first := ts.forecast("POST", "/v1/forecasts", `{"id":"eval-x","source":"github:o/new","pool":"arm"}`, http.StatusCreated)
	if !first.Estimated || first.Builds != 1 {
		t.Errorf("first forecast of a source = %+v, want 1 build estimated", first)
	}
	if f = ts.forecast("GET", "/v1/forecasts/eval-1", "", http.StatusOK); f.State != "withdrawn" {
		t.Errorf("the first forecast is %s, want withdrawn", f.State)
	}

	var list api.ForecastList
	if err := json.Unmarshal(ts.do("GET", "/v1/forecasts", "").body, &list); err != nil || len(list.Forecasts) != 3 || list.Forecasts[0].ID != "eval-x" {
		t.Errorf("list = %+v, %v; want 3, newest first", list, err)
	}
}

func (ts *testServer) createReservation(body string) {
	ts.t.Helper()
	if a := ts.do("POST", "/v1/reservations", body); a.status != http.StatusCreated {
		ts.t.Fatalf("create reservation %s: %d %s", body, a.status, a.body)
	}
}

// TestForecastBadInput: every bad field is named with its fix.
func TestForecastBadInput(t *testing.T) {
	ts := newTestServer(t)
	for _, tt := range []struct{ body, want string }{
		{`{"source":"p","system":"x86_64-linux"}`, "id: required"},
		{`{"id":"e","system":"x86_64-linux"}`, "source: required"},
		{`{"id":"e","source":"a\u0007b","system":"x86_64-linux"}`, "source: must be UTF-8 text without control characters"},
		{`{"id":"e","source":"` + strings.Repeat("s", 257) + `","system":"x86_64-linux"}`, "source: longer than 256 bytes"},
		{`{"id":"e","source":"p"}`, "system: required without a pool"},
		{`{"id":"e","source":"p","system":"riscv64-linux"}`, "system: no pool serves system riscv64-linux"},
		{`{"id":"e","source":"p","pool":"nope"}`, `pool: no pool named "nope"`},
		{`{"id":"e","source":"p","pool":"arm","system":"x86_64-linux"}`, "pool: arm does not serve system x86_64-linux"},
		{`{"id":"e","source":"p","pool":"arm","builds":-1}`, "builds: -1 is outside 0..10000"},
		{`{"id":"e","source":"p","pool":"arm","ttl":"soon"}`, `ttl: "soon" is not a duration`},
		{`{"id":"e","source":"p","pool":"arm","ttl":"7h"}`, "ttl: 7h0m0s is longer than 6h0m0s"},
		{`{"id":"e","source":"p","pool":"arm","bogus":1}`, "bogus"},
	} {
		a := ts.do("POST", "/v1/forecasts", tt.body)
		var e api.Error
		_ = json.Unmarshal(a.body, &e)
		if a.status != http.StatusBadRequest || !strings.Contains(e.Error, tt.want) {
			t.Errorf("POST %s: %d %s; want 400 naming %q", tt.body, a.status, a.body, tt.want)
		}
	}
	if a := ts.do("POST", "/v1/reservations", `{"system":"x86_64-linux","source":"`+strings.Repeat("s", 300)+`"}`); a.status != http.StatusBadRequest ||
		!strings.Contains(string(a.body), "source: longer than 256 bytes") {
		t.Errorf("reservation with a long source: %d %s, want 400", a.status, a.body)
	}
}

package apiserver

import (
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestRequireTokenRefusesWithoutTheToken: every endpoint but /healthz needs
// exactly "Authorization: Bearer <token>".
func TestRequireTokenRefusesWithoutTheToken(t *testing.T) {
	const token = "0123456789abcdef-secret-token"
	inner := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"ok": "yes"})
	})
	h := RequireToken(token, inner)
	refused := []struct{ name, header string }{
		{"missing", ""},
		{"empty bearer", "Bearer "},
		{"bearer without space", "Bearer" + token},
		{"wrong token", "Bearer wrong"},
		{"token prefix", "Bearer " + token[:len(token)-1]},
		{"token with extra byte", "Bearer " + token + "x"},
		{"token with trailing space", "Bearer " + token + " "},
		{"plain token", token},
		{"basic scheme", "Basic " + token},
		{"lower-case scheme", "bearer " + token},
		{"upper-cased token", "Bearer " + strings.ToUpper(token)},
	}
	for _, path := range []string{"/v1/status", "/v1/reservations", "/v1/slots/x86/slot1/drain", "/healthz/", "/HEALTHZ", "/v1/../healthz"} {
		for _, c := range refused {
			req := httptest.NewRequest(http.MethodGet, "http://d"+"/", nil)
			req.URL.Path = path
			if c.header != "" {
				req.Header.Set("Authorization", c.header)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != http.StatusUnauthorized {
				t.Errorf("%s %s: status %d, want 401", path, c.name, rec.Code)
			}
			if strings.Contains(rec.Body.String(), "ok") && strings.Contains(rec.Body.String(), "yes") {
				t.Errorf("%s %s: the wrapped handler ran", path, c.name)
			}
			if strings.Contains(rec.Body.String(), token) || strings.Contains(rec.Header().Get("WWW-Authenticate"), token) {
				t.Errorf("%s %s: the answer quotes the token: %s", path, c.name, rec.Body)
			}
			if rec.Header().Get("WWW-Authenticate") == "" {
				t.Errorf("%s %s: 401 without WWW-Authenticate", path, c.name)
			}
		}
	}
	for _, path := range []string{"/v1/status", "/v1/reservations"} {
		req := httptest.NewRequest(http.MethodGet, "http://d"+path, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			t.Errorf("%s with the token: status %d, want 200", path, rec.Code)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://d/healthz", nil))
	if rec.Code != http.StatusOK {
		t.Errorf("/healthz without a token: status %d, want 200 (health checks need no token)", rec.Code)
	}
}

// TestRequireTokenEmptyTokenRefusesAll: a daemon that somehow has no token
// must not let "Bearer " through.
func TestRequireTokenEmptyTokenRefusesAll(t *testing.T) {
	h := RequireToken("", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) }))
	for _, hdr := range []string{"", "Bearer ", "Bearer"} {
		req := httptest.NewRequest(http.MethodGet, "http://d/v1/status", nil)
		if hdr != "" {
			req.Header.Set("Authorization", hdr)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusUnauthorized {
			t.Errorf("empty token, Authorization %q: status %d, want 401", hdr, rec.Code)
		}
	}
}

// TestRequireTokenConstantTime guards the comparison: the token must be
// compared with crypto/subtle, never with == or bytes.Equal, which return
// early at the first differing byte and leak the token's prefix by timing.
func TestRequireTokenConstantTime(t *testing.T) {
	src, err := os.ReadFile("server.go")
	if err != nil {
		t.Fatal(err)
	}
	body := regexp.MustCompile(`(?s)func RequireToken\(.*?\n}\n`).Find(src)
	if body == nil {
		t.Fatal("RequireToken not found in server.go")
	}
	if !strings.Contains(string(body), "subtle.ConstantTimeCompare(") {
		t.Errorf("RequireToken does not use subtle.ConstantTimeCompare:\n%s", body)
	}
	for _, bad := range []string{"bytes.Equal(", "strings.EqualFold(", "== want", "== token", "!= want", "!= token", "strings.HasPrefix("} {
		if strings.Contains(string(body), bad) {
			t.Errorf("RequireToken compares with %q, which is not constant-time:\n%s", bad, body)
		}
	}
}

// TestBodyBounded: a body over MaxBodyBytes is refused with 413, on every
// endpoint that reads one (heartbeat, drain and undrain read none).
func TestBodyBounded(t *testing.T) {
	srv, _ := fuzzServer(t)
	h := srv.Handler()
	big := `{"id":"big","system":"x86_64-linux","owner":"` + strings.Repeat("a", MaxBodyBytes) + `"}`
	for _, path := range []string{"/v1/reservations", "/v1/slots/x86/slot1/weight"} {
		req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(big))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusRequestEntityTooLarge {
			t.Errorf("POST %s with %d bytes: status %d, want 413: %s", path, len(big), rec.Code, rec.Body.String()[:min(200, rec.Body.Len())])
		}
	}
	// Whitespace after a valid object must not let the reader run past the limit.
	req := httptest.NewRequest(http.MethodPost, "/v1/reservations", strings.NewReader(`{"system":"x86_64-linux"}`+strings.Repeat(" ", MaxBodyBytes)))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusRequestEntityTooLarge {
		t.Errorf("POST /v1/reservations with %d bytes of trailing space: status %d, want 413", MaxBodyBytes, rec.Code)
	}
}

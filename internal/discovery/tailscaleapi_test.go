package discovery

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

func TestDeleteDevice(t *testing.T) {
	tests := []struct {
		name    string
		code    int
		body    string
		wantErr []string // substrings; nil means success
	}{
		{name: "deleted", code: 200},
		{name: "already gone", code: 404, body: `{"message":"not found"}`},
		{name: "server error", code: 500, body: `{"message":"boom"}`, wantErr: []string{"500 Internal Server Error", "boom", "nPEER1CNTRL"}},
		{name: "bad key", code: 401, body: `{"message":"API token invalid"}`, wantErr: []string{"401", "API token invalid", "api_key_file"}},
		{name: "outside the tailnet", code: 501, body: `{"message":"cannot delete devices outside of your tailnet"}`,
			wantErr: []string{"cannot delete devices outside of your tailnet"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			var got []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				mu.Lock()
				got = append(got, r.Method+" "+r.URL.EscapedPath()+" "+r.Header.Get("Authorization")+" "+string(body))
				mu.Unlock()
				w.WriteHeader(tt.code)
				io.WriteString(w, tt.body)
			}))
			defer srv.Close()

			for _, base := range []string{srv.URL, srv.URL + "/", srv.URL + "/api/v2/"} {
				err := NewTailscaleAPI(base, "-", " tskey-api-k1\n").DeleteDevice(context.Background(), "nPEER1CNTRL")
				switch {
				case tt.wantErr == nil && err != nil:
					t.Errorf("base %s: DeleteDevice: %v", base, err)
				case tt.wantErr != nil && err == nil:
					t.Errorf("base %s: DeleteDevice succeeded, want an error", base)
				case err != nil:
					for _, w := range tt.wantErr {
						if !strings.Contains(err.Error(), w) {
							t.Errorf("error %q does not contain %q", err, w)
						}
					}
				}
			}
			mu.Lock()
			defer mu.Unlock()
			for _, g := range got {
				if want := "DELETE /api/v2/device/nPEER1CNTRL Bearer tskey-api-k1 "; g != want {
					t.Errorf("request %q, want %q", g, want)
				}
			}
			if len(got) != 3 {
				t.Errorf("%d requests, want 3", len(got))
			}
		})
	}
}

func TestDeleteDeviceEscapesID(t *testing.T) {
	var path string
	srv := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { path = r.URL.EscapedPath() }))
	defer srv.Close()
	if err := NewTailscaleAPI(srv.URL, "-", "k").DeleteDevice(context.Background(), "a/../b"); err != nil {
		t.Fatal(err)
	}
	if path != "/api/v2/device/a%2F..%2Fb" {
		t.Errorf("path %q", path)
	}
}

func TestDeleteDeviceRefusals(t *testing.T) {
	if err := NewTailscaleAPI("http://127.0.0.1:1", "-", "").DeleteDevice(context.Background(), "n1"); err == nil ||
		!errors.Is(err, errNoCredentials) {
		t.Errorf("empty key: %v", err)
	}
	if err := NewTailscaleAPI("http://127.0.0.1:1", "-", "k").DeleteDevice(context.Background(), ""); err == nil {
		t.Error("empty id accepted")
	}
}

func TestDeleteDeviceTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	api := NewTailscaleAPI(srv.URL, "-", "k")
	api.Timeout = 100 * time.Millisecond
	// The caller's context has no deadline; it is cancelled only by a hang
	// guard. A deadline error can come only from api.Timeout.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	guard := time.AfterFunc(testwait.Bound, cancel)
	defer guard.Stop()
	err := api.DeleteDevice(ctx, "n1")
	if err == nil {
		t.Fatal("DeleteDevice succeeded against a server that never answers")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error = %v, want its Timeout's deadline (context.DeadlineExceeded)", err)
	}
}

func TestNewTailscaleAPIDefaults(t *testing.T) {
	a := NewTailscaleAPI("", "", "k")
	if a.base != DefaultAPIURL || a.Tailnet() != "-" {
		t.Errorf("base %q tailnet %q", a.base, a.Tailnet())
	}
}

func TestCheckKey(t *testing.T) {
	var paths []string
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.Method+" "+r.URL.EscapedPath())
		mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer tskey-api-good" {
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"message":"API token invalid"}`)
			return
		}
		io.WriteString(w, `{"devices":[{"id":"1"},{"id":"2"}]}`)
	}))
	defer srv.Close()
	n, err := NewTailscaleAPI(srv.URL, "", "tskey-api-good\n").CheckKey(context.Background())
	if err != nil || n != 2 {
		t.Fatalf("CheckKey with a good key = %d, %v; want 2 devices", n, err)
	}
	_, err = NewTailscaleAPI(srv.URL, "example.com", "tskey-api-bad").CheckKey(context.Background())
	if err == nil || !strings.Contains(err.Error(), "API token invalid") || !strings.Contains(err.Error(), "api_key_file") {
		t.Fatalf("CheckKey with a bad key: %v; want the API's message and the key file named", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"GET /api/v2/tailnet/-/devices", "GET /api/v2/tailnet/example.com/devices"}; strings.Join(paths, "|") != strings.Join(want, "|") {
		t.Fatalf("requests %q, want %q (read-only calls)", paths, want)
	}
}

package daemon_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

// pumpClock advances the fake clock a second at a time until the test ends,
// so the reconciler's ticker keeps firing while a builder boots in real time.
func (h *harness) pumpClock() {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				h.Clock.Advance(time.Second)
			}
		}
	}()
	h.t.Cleanup(func() {
		close(stop)
		<-done
	})
}

func TestLongPollWakesWhenBuilderBecomesReady(t *testing.T) {
	// The stand-in serves its banner only after boot_delay (real time), so
	// the reservation is surely pending when the poll starts and becomes
	// ready only while the poll waits.
	//
	// The poll waits 10 minutes (max_poll is raised to allow it); the
	// client gives up after testwait.Bound (2 minutes), a hang guard. A
	// poll that answers "ready" before that woke on the change: one that
	// did not wake would answer only when its wait ended, and fails on the
	// guard instead.
	//
	// pumpClock turns real time into fake time fast (a second every 20ms),
	// so the pool's and reservation's timeouts are set far beyond what a
	// slow boot on a busy machine can reach before the guard.
	const wait = 10 * time.Minute
	cfg := daemontest.Config(t, `max_builders = 1
launch_timeout = "1000h"
boot_timeout = "1000h"
bind_timeout = "1000h"
[pool.local]
address = "127.0.0.1"
boot_delay = "300ms"`)
	cfg.Reservations.MaxPoll = config.NewDuration(wait)
	cfg.Reservations.PendingTimeout = config.NewDuration(1000 * time.Hour)
	h := &harness{Harness: daemontest.Start(t, cfg), t: t}
	ctx := context.Background()
	r, created, err := h.Client.CreateReservation(ctx, api.CreateReservationRequest{ID: "poll-1", System: "x86_64-linux", Lease: "24h"})
	if err != nil || !created || r.State != "pending" {
		t.Fatalf("create = %+v, %v, %v; want a new pending reservation (no builder runs yet)", r, created, err)
	}
	h.pumpClock()

	guard, cancel := context.WithTimeout(ctx, testwait.Bound)
	defer cancel()
	begin := time.Now()
	r, err = h.Client.Reservation(guard, "poll-1", wait)
	t.Logf("long poll answered after %s", time.Since(begin))
	if err != nil {
		t.Fatalf("long poll with a %s wait: no answer within %s (%v); it must wake when the reservation becomes ready", wait, testwait.Bound, err)
	}
	if r.State != "ready" || r.Slot != "slot1" || r.Address == "" || r.InstanceID == "" {
		t.Fatalf("long poll answered %+v; want ready on slot1 with the builder's address", r)
	}
	if got, err := local.ReadBanner(ctx, r.Address, testwait.Bound); err != nil || !strings.HasPrefix(got, "SSH-2.0-") {
		t.Errorf("builder banner = %q, %v", got, err)
	}
}

// freePort returns a loopback address no one listened on a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// tcpConfig is daemontest.Config with the API also on TCP at listen,
// guarded by the token in tokenFile.
func tcpConfig(t *testing.T, listen, tokenFile string) *config.Config {
	t.Helper()
	return daemontest.ConfigWithDaemon(t, fmt.Sprintf("listen = %q\ntoken_file = %q", listen, tokenFile), "max_builders = 1")
}

func TestTCPListenerRequiresToken(t *testing.T) {
	const token = "s3cret-token-0123456789"
	tokenFile := filepath.Join(t.TempDir(), "token")
	// The file's trailing newline is not part of the token.
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freePort(t)
	h := daemontest.Start(t, tcpConfig(t, addr, tokenFile))
	base := "http://" + addr

	tests := []struct {
		name   string
		path   string
		auth   string // Authorization header; "" = none
		status int
	}{
		{"no token", "/v1/slots", "", http.StatusUnauthorized},
		{"wrong token", "/v1/slots", "Bearer wrong", http.StatusUnauthorized},
		{"empty bearer", "/v1/slots", "Bearer ", http.StatusUnauthorized},
		{"token without scheme", "/v1/slots", token, http.StatusUnauthorized},
		{"right token", "/v1/slots", "Bearer " + token, http.StatusOK},
		{"healthz without token", "/healthz", "", http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest("GET", base+tt.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tt.status {
				t.Fatalf("status = %d, want %d; body %s", resp.StatusCode, tt.status, body)
			}
			if tt.status == http.StatusUnauthorized {
				var e api.Error
				if err := json.Unmarshal(body, &e); err != nil || e.Code != api.CodeUnauthorized || e.Error == "" {
					t.Errorf("401 body = %s (%v); want JSON with code %q and a message", body, err, api.CodeUnauthorized)
				}
			}
		})
	}

	// The API client with the token works end to end over TCP.
	ctx := context.Background()
	c := api.NewHTTPClient(base, token)
	r, created, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "tcp-1", System: "x86_64-linux"})
	if err != nil || !created || r.ID != "tcp-1" {
		t.Fatalf("create over TCP = %+v, %v, %v", r, created, err)
	}
	if _, err := c.Release(ctx, "tcp-1"); err != nil {
		t.Fatalf("release over TCP: %v", err)
	}
	_, err = api.NewHTTPClient(base, "wrong").Slots(ctx)
	var ae *api.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized || ae.Code != api.CodeUnauthorized {
		t.Errorf("client with a wrong token: err = %v; want APIError 401 unauthorized", err)
	}
	// The unix socket needs no token.
	if _, err := h.Client.Slots(ctx); err != nil {
		t.Errorf("unix socket without token: %v", err)
	}
}

func TestNewRefusesUnusableTokenFile(t *testing.T) {
	tests := []struct {
		name    string
		content *string // nil = no file
	}{
		{"empty", ptr("")},
		{"only whitespace", ptr(" \n\t\n")},
		{"missing", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tokenFile := filepath.Join(t.TempDir(), "token")
			if tt.content != nil {
				if err := os.WriteFile(tokenFile, []byte(*tt.content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			cfg := tcpConfig(t, "127.0.0.1:8080", tokenFile)
			d, err := daemon.New(context.Background(), cfg, daemon.Options{Clock: clock.Real{}, BuilderCommand: []string{os.Args[0]}, BuilderEnv: []string{daemontest.EnvBuilder + "=1"}})
			if err == nil {
				d.Store().Close()
				t.Fatal("New succeeded; want an error naming token_file")
			}
			if !strings.Contains(err.Error(), "token_file") {
				t.Errorf("New error = %q; want it to name token_file", err)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

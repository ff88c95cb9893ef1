package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// runCLI runs autoscalerctl in-process with the NBA_* environment cleared.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	for _, k := range []string{"NBA_SOCKET", "NBA_URL", "NBA_TOKEN_FILE"} {
		if _, ok := os.LookupEnv(k); ok {
			t.Setenv(k, "")
		}
	}
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

// runCLIGuarded is runCLI for a command that must end by itself (a timeout
// it was given, an error it must notice): it fails the test if the command
// is still running after testwait.Bound, a hang guard far above any wait
// the command was told to make.
func runCLIGuarded(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	for _, k := range []string{"NBA_SOCKET", "NBA_URL", "NBA_TOKEN_FILE"} {
		if _, ok := os.LookupEnv(k); ok {
			t.Setenv(k, "")
		}
	}
	type result struct {
		code           int
		stdout, stderr string
	}
	done := make(chan result, 1)
	go func() {
		var out, errb bytes.Buffer
		code := run(args, &out, &errb)
		done <- result{code, out.String(), errb.String()}
	}()
	select {
	case r := <-done:
		return r.code, r.stdout, r.stderr
	case <-time.After(testwait.Bound):
		t.Fatalf("autoscalerctl %s still running after %s: stuck", strings.Join(args, " "), testwait.Bound)
		return 0, "", ""
	}
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args       []string
		wantStderr string
	}{
		{nil, "no command given"},
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"--bogus", "status"}, "unknown flag: --bogus"},
		{[]string{"status", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"status", "extra"}, "status takes no arguments"},
		{[]string{"weight", "x86/slot1", "300"}, "weight must be an integer 0..256"},
		{[]string{"weight", "x86/slot1", "-1"}, "weight must be an integer 0..256"},
		{[]string{"weight", "x86/slot1", "heavy"}, "weight must be an integer 0..256"},
		{[]string{"weight", "x86/slot1"}, "weight needs 2 arguments: autoscalerctl weight <pool>/<slot> <0-256>"},
		{[]string{"weight", "slot1", "50"}, "slot must be <pool>/<slot>"},
		{[]string{"drain", "slot1"}, "slot must be <pool>/<slot>"},
		{[]string{"drain", "x86/"}, "slot must be <pool>/<slot>"},
		{[]string{"undrain", "x86/slot1/extra"}, "slot must be <pool>/<slot>"},
		{[]string{"drain"}, "drain needs one argument: autoscalerctl drain <pool>/<slot>"},
		{[]string{"release"}, "release needs one argument: autoscalerctl release <id>"},
		{[]string{"heartbeat", "a", "b"}, "heartbeat takes one argument, got 2"},
		{[]string{"reserve"}, "--system is required"},
		{[]string{"reserve", "--system", "x86_64-linux", "--lease", "ten"}, "--lease must be a positive duration"},
		{[]string{"reserve", "--system", "x86_64-linux", "--wait-timeout", "1m"}, "--wait-timeout needs --wait"},
		{[]string{"reserve", "--system", "x86_64-linux", "--wait", "--wait-timeout", "0s"}, "--wait-timeout must be a positive duration"},
		{[]string{"reservations", "--state", "pending,done"}, "--state must be one or more of"},
		{[]string{"reservations", "--limit", "many"}, `invalid argument "many" for "--limit"`},
		{[]string{"events", "--slot", "x86/"}, "slot must be <pool>/<slot>"},
		{[]string{"events", "--pool", "arm", "--slot", "x86/slot1"}, "name different pools"},
		{[]string{"--timeout", "0s", "status"}, "--timeout must be a positive duration"},
		{[]string{"--url", "ci-host:8443", "status"}, "--url must be an http:// or https:// URL"},
		{[]string{"--url", "http://127.0.0.1:1", "--socket", "/x.sock", "status"}, "use either --socket or --url"},
		{[]string{"--url", "http://127.0.0.1:1", "--token-file", "/nonexistent/token", "status"}, "cannot read the token file"},
		{[]string{"help", "bogus"}, `no help for unknown command "bogus"`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(t, tt.args...)
			if code != exitUsage {
				t.Errorf("exit code = %d, want %d; stderr:\n%s", code, exitUsage, stderr)
			}
			if !strings.HasPrefix(stderr, "autoscalerctl: ") || !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr = %q, want it to start with \"autoscalerctl: \" and contain %q", stderr, tt.wantStderr)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--help"}, "Commands:"},
		{[]string{"-h"}, "Commands:"},
		{[]string{"help"}, "Commands:"},
		{[]string{"help", "weight"}, "Usage: autoscalerctl weight <pool>/<slot> <0-256>"},
		{[]string{"weight", "--help"}, "Usage: autoscalerctl weight <pool>/<slot> <0-256>"},
		{[]string{"reserve", "-h"}, "--wait-timeout duration"},
		{[]string{"reservations", "--help"}, "--state strings"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(t, tt.args...)
			if code != exitOK || stderr != "" {
				t.Errorf("exit code = %d, stderr %q; want 0 and nothing", code, stderr)
			}
			for _, want := range []string{tt.want, "Exit codes:", "--socket", "--json"} {
				if !strings.Contains(stdout, want) {
					t.Errorf("help does not contain %q:\n%s", want, stdout)
				}
			}
		})
	}
	// Every command has a help page.
	for _, c := range commands {
		if code, stdout, _ := runCLI(t, "help", c.name); code != 0 || !strings.Contains(stdout, "Usage: autoscalerctl "+c.name) {
			t.Errorf("help %s: exit code %d, output:\n%s", c.name, code, stdout)
		}
	}
}

func TestUnreachableSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "daemon.sock")
	for _, args := range [][]string{
		{"--socket", sock, "status"},
		{"slots", "--socket", sock, "--json"},
		{"--socket=" + sock, "drain", "x86/slot1"},
	} {
		code, stdout, stderr := runCLI(t, args...)
		if code != exitUnreachable {
			t.Errorf("%q: exit code = %d, want %d", args, code, exitUnreachable)
		}
		want := "autoscalerctl: cannot reach the daemon at unix socket " + sock + ": "
		if !strings.HasPrefix(stderr, want) || !strings.Contains(stderr, "--socket or --url") {
			t.Errorf("%q: stderr = %q, want prefix %q and a hint", args, stderr, want)
		}
		if stdout != "" {
			t.Errorf("%q: stdout = %q", args, stdout)
		}
	}

	// NBA_SOCKET is the default; an explicit --socket beats NBA_URL.
	var errb bytes.Buffer
	t.Setenv("NBA_SOCKET", sock)
	t.Setenv("NBA_URL", "")
	if code := run([]string{"status"}, &bytes.Buffer{}, &errb); code != exitUnreachable || !strings.Contains(errb.String(), sock) {
		t.Errorf("NBA_SOCKET: exit code %d, stderr %q", code, errb.String())
	}
	errb.Reset()
	t.Setenv("NBA_URL", "http://127.0.0.1:1")
	if code := run([]string{"--socket", sock, "status"}, &bytes.Buffer{}, &errb); code != exitUnreachable || !strings.Contains(errb.String(), sock) {
		t.Errorf("--socket with NBA_URL: exit code %d, stderr %q", code, errb.String())
	}
}

// fakeAPI is just enough of the daemon's API for the CLI's tests.
type fakeAPI struct {
	mu       sync.Mutex
	requests []string
	bodies   []string
	auth     []string
	// next is the state a reservation shows once polled ("ready",
	// "failed", or "pending" to keep it pending).
	next      string
	reconcErr string
}

// fakeSlots are the slots the fake shows. Times are relative to the request,
// so the CLI's "ago" columns are stable.
func fakeSlots() []api.Slot {
	fakeNow := time.Now()
	return []api.Slot{
		{Pool: "x86", Slot: "slot1", State: "ready", InstanceID: "i-0abc", Address: "100.64.0.3:22", InstanceType: "c7i.2xlarge",
			Market: "spot", Weight: 100, Since: fakeNow.Add(-192 * time.Second), LastActive: fakeNow.Add(-10 * time.Second), Reservations: 2},
		{Pool: "x86", Slot: "slot2", State: "empty", Weight: 100, Since: fakeNow.Add(-3 * time.Hour)},
	}
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body []byte
	if r.Body != nil {
		body, _ = readAll(r)
	}
	f.mu.Lock()
	f.requests = append(f.requests, r.Method+" "+r.URL.RequestURI())
	f.bodies = append(f.bodies, string(body))
	f.auth = append(f.auth, r.Header.Get("Authorization"))
	next, reconcErr := f.next, f.reconcErr
	f.mu.Unlock()

	fakeNow := time.Now()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.Status{
			Pools: []api.PoolStatus{{Name: "x86", Systems: []string{"x86_64-linux"}, Features: []string{"kvm"}, MaxBuilders: 4, WarmPool: 1,
				ReservationsPerBuilder: 2, Slots: map[string]int{"empty": 3, "ready": 1}, Reservations: map[string]int{"ready": 2},
				HeldConnections: 1, QueuedConnections: 3}},
			Reconcile: api.ReconcileStatus{LastAt: fakeNow.Add(-4 * time.Second), DurationSeconds: 0.12, Rounds: 1523},
		})
	})
	mux.HandleFunc("GET /v1/slots", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.SlotList{Slots: fakeSlots()})
	})
	mux.HandleFunc("POST /v1/slots/{pool}/{slot}/{action}", func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("pool") != "x86" || r.PathValue("slot") != "slot1" {
			writeJSON(w, 404, api.Error{Error: "slot " + r.PathValue("pool") + "/" + r.PathValue("slot") + " not found", Code: api.CodeNotFound})
			return
		}
		s := fakeSlots()[0]
		switch r.PathValue("action") {
		case "drain":
			s.State, s.DrainReason = "draining", "operator"
		case "weight":
			var wr api.WeightRequest
			_ = json.Unmarshal(body, &wr)
			s.Weight = *wr.Weight
		}
		writeJSON(w, 200, s)
	})
	mux.HandleFunc("POST /v1/reservations", func(w http.ResponseWriter, r *http.Request) {
		var req api.CreateReservationRequest
		_ = json.Unmarshal(body, &req)
		writeJSON(w, 201, fakeReservation(req.ID, "pending"))
	})
	mux.HandleFunc("GET /v1/reservations/{id}", func(w http.ResponseWriter, r *http.Request) {
		if next == "pending" {
			if d, err := time.ParseDuration(r.URL.Query().Get("wait")); err == nil {
				select {
				case <-time.After(d):
				case <-r.Context().Done():
					return
				}
			}
		}
		res := fakeReservation(r.PathValue("id"), next)
		if next == "failed" {
			res.Reason = "no pool matches system riscv64-linux"
		}
		writeJSON(w, 200, res)
	})
	mux.HandleFunc("POST /v1/reservations/{id}/heartbeat", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, fakeReservation(r.PathValue("id"), "pending"))
	})
	mux.HandleFunc("DELETE /v1/reservations/{id}", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, fakeReservation(r.PathValue("id"), "released"))
	})
	mux.HandleFunc("GET /v1/reservations", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.ReservationList{Reservations: []api.Reservation{fakeReservation("r2", "ready"), fakeReservation("r1", "released")}})
	})
	mux.HandleFunc("GET /v1/events", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.EventList{Events: []api.Event{{At: fakeNow.Add(-time.Minute), Kind: "drain", Pool: "x86", Slot: "slot1", Actor: "operator"}}})
	})
	mux.HandleFunc("POST /v1/reconcile", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.ReconcileStatus{LastAt: time.Now(), DurationSeconds: 0.3, Rounds: 1524, LastError: reconcErr})
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, map[string]string{"status": "ok"})
	})
	mux.ServeHTTP(w, r)
}

func fakeReservation(id, state string) api.Reservation {
	fakeNow := time.Now()
	if id == "" {
		id = "r1"
	}
	r := api.Reservation{ID: id, Pool: "x86", System: "x86_64-linux", Features: []string{"kvm"}, Owner: "autoscalerctl",
		State: state, Lease: "1m0s", CreatedAt: fakeNow.Add(-time.Minute), ExpiresAt: fakeNow.Add(time.Minute)}
	if state == "ready" {
		r.Slot, r.Address = "slot1", "100.64.0.3:22"
	}
	if state == "released" {
		t := fakeNow
		r.EndedAt = &t
	}
	return r
}

func readAll(r *http.Request) ([]byte, error) {
	var b bytes.Buffer
	_, err := b.ReadFrom(r.Body)
	return b.Bytes(), err
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// serveFake serves f on a unix socket and returns its path.
func serveFake(t *testing.T, f *fakeAPI) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nba-ctl") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "d.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(f)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

func TestCommandsAgainstFake(t *testing.T) {
	f := &fakeAPI{next: "ready"}
	sock := serveFake(t, f)

	tests := []struct {
		args        []string
		wantCode    int
		wantStdout  []string
		wantStderr  string
		wantRequest string
		wantBody    string
	}{
		{args: []string{"status"}, wantStdout: []string{"POOL", "RESERVATIONS", "HELD", "QUEUED", "x86_64-linux", "0..4", "empty=3 ready=1", "ready=2", "round 1523, 4s ago, took 120ms"},
			wantRequest: "GET /v1/status"},
		{args: []string{"slots"}, wantStdout: []string{"POOL", "SLOT", "STATE", "slot1", "i-0abc", "3m12s ago", "3h ago"}, wantRequest: "GET /v1/slots"},
		{args: []string{"reservations", "--state", "pending,ready", "--pool", "x86", "--limit", "5"}, wantStdout: []string{"ID", "r2", "ready", "released"},
			wantRequest: "GET /v1/reservations?limit=5&pool=x86&state=pending%2Cready"},
		{args: []string{"reservations", "--state", "pending", "--state", "ready"}, wantRequest: "GET /v1/reservations?state=pending%2Cready"},
		{args: []string{"events", "--slot", "x86/slot1", "--limit", "3"}, wantStdout: []string{"KIND", "drain", "1m ago"},
			wantRequest: "GET /v1/events?limit=3&pool=x86&slot=slot1"},
		{args: []string{"drain", "x86/slot1"}, wantStdout: []string{"draining", "operator"}, wantRequest: "POST /v1/slots/x86/slot1/drain"},
		{args: []string{"undrain", "x86/slot1"}, wantStdout: []string{"ready"}, wantRequest: "POST /v1/slots/x86/slot1/undrain"},
		{args: []string{"weight", "x86/slot1", "0"}, wantRequest: "POST /v1/slots/x86/slot1/weight", wantBody: `{"weight":0}`},
		{args: []string{"drain", "x86/slot9"}, wantCode: exitAPIError, wantStderr: "autoscalerctl: slot x86/slot9 not found\n"},
		{args: []string{"reconcile-now"}, wantStdout: []string{"round 1524"}, wantRequest: "POST /v1/reconcile"},
		{args: []string{"release", "r1"}, wantStdout: []string{"released reservation r1"}, wantRequest: "DELETE /v1/reservations/r1"},
		{args: []string{"heartbeat", "r1"}, wantStdout: []string{"reservation r1 (pending) now expires in 1m"}, wantRequest: "POST /v1/reservations/r1/heartbeat"},
		{args: []string{"health"}, wantStdout: []string{"ok"}, wantRequest: "GET /healthz"},
		{args: []string{"reserve", "--system", "x86_64-linux", "--feature", "kvm", "--feature", "nixos-test", "--id", "b-1", "--lease", "10m"},
			wantStdout: []string{"b-1", "pending"}, wantRequest: "POST /v1/reservations",
			wantBody: `{"id":"b-1","system":"x86_64-linux","features":["kvm","nixos-test"],"owner":"autoscalerctl","lease":"10m"}`},
		{args: []string{"reserve", "--system", "x86_64-linux", "--id", "b-2", "--wait"},
			wantStdout: []string{"ready", "slot1", "100.64.0.3:22"}, wantStderr: "waiting up to 10m0s", wantRequest: "GET /v1/reservations/b-2?wait=30s"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(t, append([]string{"--socket", sock}, tt.args...)...)
			if code != tt.wantCode {
				t.Errorf("exit code = %d, want %d; stderr: %s", code, tt.wantCode, stderr)
			}
			for _, want := range tt.wantStdout {
				if !strings.Contains(stdout, want) {
					t.Errorf("stdout does not contain %q:\n%s", want, stdout)
				}
			}
			if !strings.Contains(stderr, tt.wantStderr) || (tt.wantStderr == "" && stderr != "") {
				t.Errorf("stderr = %q, want %q", stderr, tt.wantStderr)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if tt.wantRequest != "" && f.requests[len(f.requests)-1] != tt.wantRequest {
				t.Errorf("last request = %q, want %q", f.requests[len(f.requests)-1], tt.wantRequest)
			}
			if tt.wantBody != "" && !slices.Contains(f.bodies, tt.wantBody) {
				t.Errorf("bodies = %q, want one %s", f.bodies, tt.wantBody)
			}
		})
	}
}

func TestJSONOutput(t *testing.T) {
	sock := serveFake(t, &fakeAPI{next: "ready"})
	code, stdout, stderr := runCLI(t, "slots", "--json", "--socket", sock)
	if code != 0 {
		t.Fatalf("exit code %d, stderr %s", code, stderr)
	}
	var got api.SlotList
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("output is not a SlotList: %v\n%s", err, stdout)
	}
	if len(got.Slots) != 2 || got.Slots[0].InstanceID != "i-0abc" {
		t.Errorf("slots = %+v", got.Slots)
	}
	if !strings.HasPrefix(stdout, "{\n  \"slots\": [") {
		t.Errorf("output is not indented:\n%s", stdout)
	}

	// Every command prints JSON with --json.
	for _, args := range [][]string{
		{"status"}, {"reservations"}, {"events"}, {"drain", "x86/slot1"}, {"undrain", "x86/slot1"}, {"weight", "x86/slot1", "5"},
		{"reconcile-now"}, {"release", "r1"}, {"heartbeat", "r1"}, {"health"}, {"reserve", "--system", "x86_64-linux"},
		{"reserve", "--system", "x86_64-linux", "--wait"},
	} {
		code, stdout, stderr := runCLI(t, append([]string{"--json", "--socket", sock}, args...)...)
		if code != 0 || stderr != "" || !json.Valid([]byte(stdout)) {
			t.Errorf("--json %q: exit code %d, stderr %q, stdout:\n%s", args, code, stderr, stdout)
		}
	}
}

func TestBearerTokenFromFile(t *testing.T) {
	f := &fakeAPI{}
	srv := httptest.NewServer(f)
	defer srv.Close()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCLI(t, "--url", srv.URL, "--token-file", tokenFile, "health")
	if code != 0 {
		t.Fatalf("exit code %d, stderr %s", code, stderr)
	}
	if got := f.auth[0]; got != "Bearer s3cret" {
		t.Errorf("Authorization = %q, want %q", got, "Bearer s3cret")
	}

	// The environment works too.
	t.Setenv("NBA_URL", srv.URL)
	t.Setenv("NBA_TOKEN_FILE", tokenFile)
	if code := run([]string{"slots"}, &bytes.Buffer{}, &bytes.Buffer{}); code != 0 || f.auth[1] != "Bearer s3cret" {
		t.Errorf("with NBA_URL and NBA_TOKEN_FILE: exit code %d, auth %q", code, f.auth[1:])
	}
}

func TestReserveWaitNotReady(t *testing.T) {
	t.Run("failed", func(t *testing.T) {
		sock := serveFake(t, &fakeAPI{next: "failed"})
		code, stdout, stderr := runCLI(t, "--socket", sock, "reserve", "--system", "riscv64-linux", "--id", "x", "--wait")
		if code != exitNotReady {
			t.Errorf("exit code = %d, want %d", code, exitNotReady)
		}
		if want := "autoscalerctl: reservation x is failed: no pool matches system riscv64-linux\n"; !strings.HasSuffix(stderr, want) {
			t.Errorf("stderr = %q, want suffix %q", stderr, want)
		}
		if !strings.Contains(stdout, "failed") {
			t.Errorf("stdout does not show the reservation:\n%s", stdout)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		sock := serveFake(t, &fakeAPI{next: "pending"})
		code, _, stderr := runCLIGuarded(t, "--socket", sock, "reserve", "--system", "x86_64-linux", "--id", "slow", "--wait", "--wait-timeout", "300ms")
		if code != exitNotReady {
			t.Errorf("exit code = %d, want %d; stderr %s", code, exitNotReady, stderr)
		}
		if want := "reservation slow still pending after 300ms (wait timed out); release it with 'autoscalerctl release slow'"; !strings.Contains(stderr, want) {
			t.Errorf("stderr = %q, want %q", stderr, want)
		}
	})
}

func TestReconcileError(t *testing.T) {
	sock := serveFake(t, &fakeAPI{reconcErr: "describe instances: throttled"})
	code, stdout, stderr := runCLI(t, "--socket", sock, "reconcile-now")
	if code != exitAPIError || !strings.Contains(stderr, "reconcile round ended with an error: describe instances: throttled") {
		t.Errorf("exit code %d, stderr %q", code, stderr)
	}
	if !strings.Contains(stdout, "last error") {
		t.Errorf("stdout = %q", stdout)
	}
}

func TestHumanDuration(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"},
		{1400 * time.Millisecond, "1s"},
		{42 * time.Second, "42s"},
		{192 * time.Second, "3m12s"},
		{2*time.Hour + 5*time.Minute + 30*time.Second, "2h5m"},
		{76 * time.Hour, "3d4h"},
		{5 * time.Minute, "5m"},
		{48 * time.Hour, "2d"},
		{-90 * time.Second, "1m30s"},
	}
	for _, tt := range tests {
		if got := humanDuration(tt.d); got != tt.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
	now := time.Now()
	for _, tt := range []struct {
		t    time.Time
		want string
	}{
		{time.Time{}, "-"},
		{now, "now"},
		{now.Add(-192 * time.Second), "3m12s ago"},
		{now.Add(8 * time.Minute), "in 8m"},
	} {
		if got := relTime(tt.t, now); got != tt.want {
			t.Errorf("relTime(%v) = %q, want %q", tt.t, got, tt.want)
		}
	}
	if got := cell("a\tb\nc\x1b[31m"); got != "a b c [31m" {
		t.Errorf("cell = %q", got)
	}
}

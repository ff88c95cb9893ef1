package agentcheck

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// fakeSlots is an in-memory Slots whose contents tests change.
type fakeSlots struct {
	mu      sync.Mutex
	slots   map[scaler.SlotKey]scaler.Slot
	err     error         // returned by Slot when set
	hang    chan struct{} // when set, Slot waits for it to close, ignoring ctx
	waitCtx bool          // when set, Slot waits for ctx to end (a hung store honouring ctx)
	calls   int
	lookups map[scaler.SlotKey]int // calls by key
}

func newFakeSlots(slots ...scaler.Slot) *fakeSlots {
	f := &fakeSlots{slots: map[scaler.SlotKey]scaler.Slot{}, lookups: map[scaler.SlotKey]int{}}
	for _, s := range slots {
		f.slots[s.Key()] = s
	}
	return f
}

func (f *fakeSlots) Slot(ctx context.Context, key scaler.SlotKey) (scaler.Slot, error) {
	f.mu.Lock()
	f.calls++
	f.lookups[key]++
	hang, err := f.hang, f.err
	s, ok := f.slots[key]
	waitCtx := f.waitCtx
	f.mu.Unlock()
	if hang != nil {
		<-hang
	}
	if waitCtx {
		<-ctx.Done()
	}
	if err != nil {
		return scaler.Slot{}, err
	}
	if err := ctx.Err(); err != nil {
		return scaler.Slot{}, err
	}
	if !ok {
		return scaler.Slot{}, fmt.Errorf("get slot %s: %w", key, scaler.ErrNotFound)
	}
	return s, nil
}

// update changes a slot under the lock.
func (f *fakeSlots) update(key scaler.SlotKey, change func(*scaler.Slot)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.slots[key]
	s.Pool, s.Name = key.Pool, key.Slot
	change(&s)
	f.slots[key] = s
}

func (f *fakeSlots) setErr(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// callCount returns how many lookups began.
func (f *fakeSlots) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// lookupsOf returns how many lookups of key began. A lookup that began after
// a change (update, setErr) sees it.
func (f *fakeSlots) lookupsOf(key scaler.SlotKey) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lookups[key]
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// checks returns nix_builder_autoscaler_agent_checks_total by result.
func checks(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "nix_builder_autoscaler_agent_checks_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" {
					got[l.GetValue()] = m.GetCounter().GetValue()
				}
			}
		}
	}
	return got
}

var readySlot = scaler.Slot{Pool: "x86", Name: "slot1", State: scaler.Ready, Weight: 100,
	InstanceID: "i-1", InstanceType: "c7i.large", Market: "spot"}

// newTestServer returns a responder whose limits are hang guards: a test
// that is about a limit sets it short itself. (A short limit elsewhere would
// make an exchange fail whenever the machine is busy.)
func newTestServer(t *testing.T, slots Slots) (*Server, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	s := New(slots, map[string]int{"x86": 4}, testLogger(t), reg, nil)
	s.readTimeout = testwait.Bound
	s.lookupTimeout = testwait.Bound
	s.writeTimeout = testwait.Bound
	return s, reg
}

// shortTimeout is the limit of a test whose exchange ends on that limit.
const shortTimeout = 50 * time.Millisecond

// TestHandle runs single exchanges over net.Pipe.
func TestHandle(t *testing.T) {
	const ready = "up ready 100% maxconn:4 #i-1 c7i.large spot\n"
	tests := []struct {
		name   string
		send   func(w io.Writer)
		fake   func(f *fakeSlots)
		tune   func(s *Server) // for an exchange that ends on a limit
		want   string
		result string
	}{
		{name: "ready", send: say("x86/slot1\n"), want: ready, result: ResultOK},
		{name: "crlf", send: say("x86/slot1\r\n"), want: ready, result: ResultOK},
		{name: "slow writer", send: func(w io.Writer) {
			for _, b := range []byte("x86/slot1\n") {
				time.Sleep(10 * time.Millisecond)
				if _, err := w.Write([]byte{b}); err != nil {
					return
				}
			}
		}, want: ready, result: ResultOK},
		{name: "garbage", send: say("\x00\xff\x16\x03\x01 hello\n"), want: "maint\n", result: ResultBadIdentity},
		{name: "no slash", send: say("x86\n"), want: "maint\n", result: ResultBadIdentity},
		{name: "two slashes", send: say("x86/slot1/x\n"), want: "maint\n", result: ResultBadIdentity},
		{name: "empty line", send: say("\n"), want: "maint\n", result: ResultBadIdentity},
		{name: "oversized line", send: say(strings.Repeat("a", 10*MaxLine)), want: "maint\n", result: ResultBadIdentity},
		{name: "oversized with line end", send: say(strings.Repeat("a", MaxLine) + "\n"), want: "maint\n", result: ResultBadIdentity},
		{name: "longest line", send: say("x86/" + strings.Repeat("s", MaxLine-5) + "\n"), want: "maint\n", result: ResultUnknown},
		// HAProxy keeps the connection open: the read timeout ends these.
		{name: "silent", send: func(io.Writer) {}, tune: func(s *Server) { s.readTimeout = shortTimeout },
			want: "maint\n", result: ResultBadIdentity},
		{name: "no line end", send: say("x86/slot1"), tune: func(s *Server) { s.readTimeout = shortTimeout },
			want: "maint\n", result: ResultBadIdentity},
		{name: "unknown slot", send: say("x86/slot9\n"), want: "maint\n", result: ResultUnknown},
		{name: "unknown pool", send: say("arm/slot1\n"), want: "maint\n", result: ResultUnknown},
		{name: "store error", send: say("x86/slot1\n"), fake: func(f *fakeSlots) { f.err = errors.New("database is locked") },
			want: "", result: ResultError},
		{name: "store hangs", send: say("x86/slot1\n"),
			// A store honouring ctx gives up at the lookup timeout.
			fake: func(f *fakeSlots) { f.waitCtx = true }, tune: func(s *Server) { s.lookupTimeout = shortTimeout },
			want: "", result: ResultError},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeSlots(readySlot)
			if tt.fake != nil {
				tt.fake(f)
			}
			s, reg := newTestServer(t, f)
			if tt.tune != nil {
				tt.tune(s)
			}
			client, server := net.Pipe()
			defer client.Close()
			done := make(chan struct{})
			go func() {
				defer close(done)
				s.handle(t.Context(), server)
			}()
			go tt.send(client)
			_ = client.SetReadDeadline(time.Now().Add(testwait.Bound))
			got, err := io.ReadAll(client)
			if err != nil && !errors.Is(err, io.ErrClosedPipe) {
				t.Fatalf("read reply: %v", err)
			}
			if string(got) != tt.want {
				t.Errorf("reply = %q, want %q", got, tt.want)
			}
			select {
			case <-done:
			case <-time.After(testwait.Bound):
				t.Fatalf("handler still running after %v: stuck", testwait.Bound)
			}
			if c := checks(t, reg); c[tt.result] != 1 {
				t.Errorf("agent_checks_total = %v, want 1 for %s", c, tt.result)
			}
		})
	}
}

func say(s string) func(io.Writer) {
	return func(w io.Writer) { _, _ = io.WriteString(w, s) }
}

// serve starts s on a loopback listener and returns its address and a stop
// function that cancels it and returns Serve's result.
func serve(t *testing.T, s *Server) (string, func() error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(ctx, ln) }()
	var once sync.Once
	var serr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case serr = <-errc:
			case <-time.After(testwait.Bound):
				serr = fmt.Errorf("Serve still running %v after its context ended: stuck", testwait.Bound)
			}
		})
		return serr
	}
	t.Cleanup(func() { _ = stop() })
	return ln.Addr().String(), stop
}

// ask sends one identity and returns everything the responder answered.
func ask(addr, identity string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, testwait.Bound)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(testwait.Bound))
	if _, err := io.WriteString(c, identity); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return "", fmt.Errorf("read reply to %q: %w", identity, err)
	}
	return string(b), nil
}

func TestServe(t *testing.T) {
	f := newFakeSlots(readySlot,
		scaler.Slot{Pool: "x86", Name: "slot2", State: scaler.Booting, InstanceID: "i-2"},
		scaler.Slot{Pool: "x86", Name: "slot3", State: scaler.Draining})
	s, reg := newTestServer(t, f)
	addr, stop := serve(t, s)

	want := map[string]string{
		"x86/slot1\n": "up ready 100% maxconn:4 #i-1 c7i.large spot\n",
		"x86/slot2\n": "down #booting i-2\n",
		"x86/slot3\n": "drain\n",
		"x86/slot4\n": "maint\n",
		"nope\n":      "maint\n",
	}
	var wg sync.WaitGroup
	for range 20 {
		for id, w := range want {
			wg.Go(func() {
				got, err := ask(addr, id)
				if err != nil || got != w {
					t.Errorf("reply to %q = %q, %v; want %q", id, got, err, w)
				}
			})
		}
	}
	wg.Wait()
	wantChecks := map[string]float64{ResultOK: 60, ResultUnknown: 20, ResultBadIdentity: 20, ResultError: 0}
	if got := checks(t, reg); fmt.Sprint(got) != fmt.Sprint(wantChecks) {
		t.Errorf("agent_checks_total = %v, want %v", got, wantChecks)
	}

	// A half-closed connection with a partial line gets "maint" at once.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(testwait.Bound))
	_, _ = io.WriteString(c, "x86/slot1")
	_ = c.(*net.TCPConn).CloseWrite()
	if b, _ := io.ReadAll(c); string(b) != "maint\n" {
		t.Errorf("reply to a half-closed partial line = %q, want %q", b, "maint\n")
	}
	c.Close()

	if err := stop(); err != nil {
		t.Fatalf("Serve = %v, want nil", err)
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("listener still accepts after Serve returned")
	}
}

// TestServeWaitsForInFlight: Serve returns only after every handler has, even
// one whose store ignores its context.
func TestServeWaitsForInFlight(t *testing.T) {
	f := newFakeSlots(readySlot)
	f.hang = make(chan struct{})
	s, _ := newTestServer(t, f)
	addr, stop := serve(t, s)

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = io.WriteString(c, "x86/slot1\n")
	testwait.Until(t, "the handler to call the store", func() bool { return f.callCount() > 0 })
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	// Serve has left Accept and waits (for the handler) or has returned:
	// only then can it be caught returning too early.
	var serveGone bool
	testwait.Until(t, "Serve to stop accepting and wait", func() bool {
		state, found := serveState()
		serveGone = !found
		return serveGone || parked(state)
	})
	if serveGone {
		t.Fatal("Serve returned while a handler was still running")
	}
	select {
	case err := <-stopped:
		t.Fatalf("Serve returned (%v) while a handler was still running", err)
	default:
	}
	close(f.hang)
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Serve = %v, want nil", err)
		}
	case <-time.After(testwait.Bound):
		t.Fatalf("Serve still running %v after the handler finished: stuck", testwait.Bound)
	}
	// Shutting down, the lookup's context was cancelled: no answer at all.
	_ = c.SetReadDeadline(time.Now().Add(testwait.Bound))
	if b, _ := io.ReadAll(c); len(b) != 0 {
		t.Errorf("reply during shutdown = %q, want none", b)
	}
}

// brokenListener fails every Accept with a permanent error.
type brokenListener struct{ net.Listener }

func (brokenListener) Accept() (net.Conn, error) { return nil, errors.New("listener exploded") }

func TestServeAcceptError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s, _ := newTestServer(t, newFakeSlots())
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(t.Context(), brokenListener{ln}) }()
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), "listener exploded") {
			t.Errorf("Serve = %v, want the accept error", err)
		}
	case <-time.After(testwait.Bound):
		t.Fatalf("Serve still running %v after its listener broke: stuck", testwait.Bound)
	}
}

func TestNewCopiesMaxJobs(t *testing.T) {
	mj := map[string]int{"x86": 4}
	s := New(newFakeSlots(readySlot), mj, nil, nil, nil)
	mj["x86"] = 99
	mj["arm"] = 1
	if s.maxJobs["x86"] != 4 || len(s.maxJobs) != 1 {
		t.Errorf("maxJobs = %v, want the map New was given", s.maxJobs)
	}
}

// serveState returns the scheduling state ("IO wait", "semacquire", ...) of
// the goroutine running Server.Serve, from a dump of all goroutines; found
// is false when no goroutine runs it. The tests of this package do not run
// in parallel, so that is the calling test's Serve.
func serveState() (state string, found bool) {
	fn := runtime.FuncForPC(reflect.ValueOf((*Server).Serve).Pointer()).Name() + "("
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	for _, g := range strings.Split(string(buf), "\n\n") {
		header, frames, _ := strings.Cut(g, "\n")
		for _, line := range strings.Split(frames, "\n") {
			if strings.HasPrefix(line, fn) {
				// "goroutine 7 [IO wait, 2 minutes]:"
				_, st, _ := strings.Cut(header, "[")
				st, _, _ = strings.Cut(st, "]")
				st, _, _ = strings.Cut(st, ",")
				return st, true
			}
		}
	}
	return "", false
}

// parked reports whether a goroutine in state waits for another goroutine:
// not running, not about to run, not in a system call or network wait, and
// not in a pause of the garbage collector or scheduler.
func parked(state string) bool {
	switch state {
	case "running", "runnable", "syscall", "IO wait", "preempted", "idle", "dead", "copystack":
		return false
	}
	return !strings.HasPrefix(state, "GC ")
}

// TestIdleConnectionsDoNotStarveChecks: another local process holding more
// idle connections than the responder takes at once does not keep HAProxy's
// checks from being answered. Before the listener made room (a semaphore,
// idle connections holding their place until their read timeout), a check
// waited behind them.
func TestIdleConnectionsDoNotStarveChecks(t *testing.T) {
	s, _ := newTestServer(t, newFakeSlots(readySlot))
	s.readTimeout = time.Hour // only a newer connection can end an idle one
	addr, stop := serve(t, s)
	defer stop()

	for range MaxConns + 44 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	for i := range 2 * MaxConns {
		got, err := ask(addr, "x86/slot1\n")
		if err != nil || got != "up ready 100% maxconn:4 #i-1 c7i.large spot\n" {
			t.Fatalf("check %d behind idle connections: %q, %v", i, got, err)
		}
	}
}

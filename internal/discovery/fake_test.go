package discovery

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// shortDir is a temporary directory with a path short enough for a unix
// socket (t.TempDir() paths can pass the 108-byte limit).
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbat")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// referenceDoc is testdata/status.json, a LocalAPI status document of the
// real shape, decoded generically so tests can change it.
func referenceDoc(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "status.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

// statusDoc is the reference document with its peers replaced by peers.
func statusDoc(t *testing.T, peers ...map[string]any) map[string]any {
	t.Helper()
	doc := referenceDoc(t)
	m := map[string]any{}
	for _, p := range peers {
		m[p["PublicKey"].(string)] = p
	}
	doc["Peer"] = m
	return doc
}

// peer is the reference document's peer, changed to node id with host name
// host, Tailscale IPv4 address ip (none if empty) and online.
func peer(t *testing.T, id, host, ip string, online bool) map[string]any {
	t.Helper()
	var tmpl map[string]any
	for _, p := range referenceDoc(t)["Peer"].(map[string]any) {
		tmpl = p.(map[string]any)
	}
	if tmpl == nil {
		t.Fatal("testdata/status.json has no peer")
	}
	sum := sha256.Sum256([]byte(id))
	tmpl["ID"] = id
	tmpl["PublicKey"] = "nodekey:" + hex.EncodeToString(sum[:])
	tmpl["HostName"] = host
	tmpl["DNSName"] = strings.ToLower(host) + ".tail1234.ts.net."
	ips := []any{}
	if ip != "" {
		ips = append(ips, ip)
	}
	tmpl["TailscaleIPs"] = append(ips, "fd7a:115c:a1e0::"+hex.EncodeToString(sum[:2]))
	tmpl["Online"] = online
	return tmpl
}

// fakeTailscaled serves a LocalAPI on a unix socket, like tailscaled: it
// answers 403 to a Host other than local-tailscaled.sock.
type fakeTailscaled struct {
	socket string
	srv    *http.Server

	mu     sync.Mutex
	doc    any    // served as JSON
	raw    []byte // served as is, when set
	code   int    // response status (200 if 0)
	delay  time.Duration
	hosts  []string
	paths  []string
	calls  int
	closed bool
}

func startTailscaled(t *testing.T, socket string, doc any) *fakeTailscaled {
	t.Helper()
	f := &fakeTailscaled{socket: socket, doc: doc}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	f.srv = &http.Server{Handler: http.HandlerFunc(f.serve), ReadHeaderTimeout: 5 * time.Second}
	go f.srv.Serve(ln)
	t.Cleanup(f.stop)
	return f
}

func (f *fakeTailscaled) stop() {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.closed = true
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f.srv.Shutdown(ctx)
}

func (f *fakeTailscaled) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.calls++
	f.hosts = append(f.hosts, r.Host)
	f.paths = append(f.paths, r.Method+" "+r.URL.Path)
	doc, raw, code, delay := f.doc, f.raw, f.code, f.delay
	f.mu.Unlock()

	if r.Host != "" && r.Host != localAPIHost {
		http.Error(w, "invalid localapi request", http.StatusForbidden)
		return
	}
	if r.Method != http.MethodGet || r.URL.Path != statusPath {
		http.NotFound(w, r)
		return
	}
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if raw == nil {
		var err error
		if raw, err = json.Marshal(doc); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if code != 0 {
		w.WriteHeader(code)
	}
	w.Write(raw)
}

func (f *fakeTailscaled) set(doc any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.doc, f.raw, f.code = doc, nil, 0
}

func (f *fakeTailscaled) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// fakeProvider is a stateful inner provider with error hooks and call
// records.
type fakeProvider struct {
	mu           sync.Mutex
	instances    []scaler.Instance
	listErr      error
	terminateErr error
	launched     []scaler.LaunchRequest
	terminated   []string
}

func (f *fakeProvider) Launch(_ context.Context, req scaler.LaunchRequest) (scaler.Instance, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.launched = append(f.launched, req)
	in := scaler.Instance{ID: "i-launched", Pool: req.Pool, Slot: req.Slot, LaunchID: req.LaunchID, State: scaler.InstancePending}
	f.instances = append(f.instances, in)
	return in, nil
}

func (f *fakeProvider) Terminate(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.terminated = append(f.terminated, id)
	if f.terminateErr != nil {
		return f.terminateErr
	}
	for i := range f.instances {
		if f.instances[i].ID == id {
			f.instances[i].State = scaler.InstanceShuttingDown
		}
	}
	return nil
}

func (f *fakeProvider) List(context.Context) ([]scaler.Instance, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.listErr != nil {
		return nil, f.listErr
	}
	return f.instances, nil // the same backing array each time, on purpose
}

// logBuffer collects log lines for assertions and echoes them to the test
// output.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	out io.Writer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	return b.out.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// lines returns the logged lines at level that contain every one of subs.
func (b *logBuffer) lines(level string, subs ...string) []string {
	var got []string
	for l := range strings.Lines(b.String()) {
		if !strings.Contains(l, "level="+level) {
			continue
		}
		if !slices.ContainsFunc(subs, func(s string) bool { return !strings.Contains(l, s) }) {
			got = append(got, l)
		}
	}
	return got
}

func newLog(t *testing.T) (*slog.Logger, *logBuffer) {
	b := &logBuffer{out: t.Output()}
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

// lookups returns discovery_lookups_total by "source/result".
func lookups(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	return counters(t, reg, "nix_builder_autoscaler_discovery_lookups_total", "source", "result")
}

func counters(t *testing.T, reg *prometheus.Registry, name string, labels ...string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var key []string
			for _, want := range labels {
				for _, l := range m.GetLabel() {
					if l.GetName() == want {
						key = append(key, l.GetValue())
					}
				}
			}
			if v := m.GetCounter().GetValue(); v != 0 {
				got[strings.Join(key, "/")] = v
			}
		}
	}
	return got
}

// fakeClock is a settable time source for the log throttle.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

var errBoom = errors.New("boom")

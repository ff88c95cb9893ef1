package discovery

// Test helpers of the package: an inner provider, a log buffer, metric
// readers and a clock. The fake tailscaled is discoverytest.LocalAPI.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

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

var errBoom = errors.New("boom")

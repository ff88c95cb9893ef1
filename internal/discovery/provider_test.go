package discovery

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"text/template"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery/discoverytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// booting is a running instance without an address, as the EC2 provider
// lists a builder that has just booted.
func booting(id, pool, slot string) scaler.Instance {
	return scaler.Instance{ID: id, Pool: pool, Slot: slot, State: scaler.InstanceRunning,
		PrivateIP: "10.0.1.5", PublicIP: "198.51.100.7"}
}

type harness struct {
	p     *Provider
	inner *fakeProvider
	ts    *discoverytest.LocalAPI
	sock  string
	reg   *prometheus.Registry
	logs  *logBuffer
	clock *clocktest.Clock
}

// newHarness wraps a fake provider holding instances; pools "x86" and
// "arm" use Tailscale unless o.Pools says otherwise. The fake tailscaled
// serves doc, or is not started when doc is nil.
func newHarness(t *testing.T, o Options, doc any, instances ...scaler.Instance) *harness {
	t.Helper()
	h := &harness{inner: &fakeProvider{instances: instances}, reg: prometheus.NewRegistry(),
		clock: clocktest.New(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))}
	h.sock = filepath.Join(discoverytest.ShortDir(t), "ts.sock")
	if doc != nil {
		h.ts = discoverytest.StartAt(t, h.sock, doc)
	}
	var log *slog.Logger
	log, h.logs = newLog(t)
	if o.Pools == nil {
		o.Pools = map[string]PoolSource{"x86": {Source: SourceTailscale}, "arm": {Source: SourceTailscale}}
	}
	o.LocalAPI = NewLocalAPI(h.sock)
	// A hang guard only: no test here waits for a LocalAPI call to time out.
	o.LocalAPI.Timeout = testwait.Bound
	o.Logger = log
	o.Registerer = h.reg
	h.p = Wrap(h.inner, o)
	h.p.clock = h.clock
	return h
}

func (h *harness) list(t *testing.T) map[string]string {
	t.Helper()
	list, err := h.p.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	got := map[string]string{}
	for _, in := range list {
		got[in.ID] = in.Address
	}
	return got
}

func TestListTailscale(t *testing.T) {
	tests := []struct {
		name      string
		o         Options
		peers     func() []discoverytest.Peer
		instances []scaler.Instance
		want      map[string]string
		lookups   map[string]float64
		warn      []string // a WARN line must contain all of these
	}{
		{
			name: "online peer with the builder's host name",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": "100.101.0.1:22"},
			lookups:   map[string]float64{"tailscale/found": 1},
		},
		{
			name: "host name compared without case",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{discoverytest.NewPeer("nA", "Nix-Builder-I-1", "100.101.0.1", true)}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": "100.101.0.1:22"},
			lookups:   map[string]float64{"tailscale/found": 1},
		},
		{
			name: "MagicDNS name's first label",
			peers: func() []discoverytest.Peer {
				p := discoverytest.NewPeer("nA", "ip-10-0-1-5", "100.101.0.1", true)
				p["DNSName"] = "nix-builder-i-1.tail1234.ts.net."
				return []discoverytest.Peer{p}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": "100.101.0.1:22"},
			lookups:   map[string]float64{"tailscale/found": 1},
		},
		{
			name: "offline peer",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", false)}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": ""},
			lookups:   map[string]float64{"tailscale/offline": 1},
		},
		{
			name: "collision: a dead node and the new one",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{
					discoverytest.NewPeer("nOLD", "nix-builder-i-1", "100.101.0.1", false),
					discoverytest.NewPeer("nNEW", "nix-builder-i-1", "100.101.0.2", true),
				}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": "100.101.0.2:22"},
			lookups:   map[string]float64{"tailscale/found": 1},
		},
		{
			name: "collision: two online nodes",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{
					discoverytest.NewPeer("nONE", "nix-builder-i-1", "100.101.0.1", true),
					discoverytest.NewPeer("nTWO", "nix-builder-i-1", "100.101.0.2", true),
				}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": ""},
			lookups:   map[string]float64{"tailscale/ambiguous": 1},
			warn:      []string{"several online tailnet nodes", "nONE", "nTWO", "instance=i-1"},
		},
		{
			name: "collision between host name and MagicDNS label",
			peers: func() []discoverytest.Peer {
				p := discoverytest.NewPeer("nTWO", "laptop", "100.101.0.2", true)
				p["DNSName"] = "nix-builder-i-1.tail1234.ts.net."
				return []discoverytest.Peer{discoverytest.NewPeer("nONE", "nix-builder-i-1", "100.101.0.1", true), p}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": ""},
			lookups:   map[string]float64{"tailscale/ambiguous": 1},
			warn:      []string{"nONE (nix-builder-i-1)", "nTWO (laptop)"},
		},
		{
			name: "only another builder on the tailnet",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{discoverytest.NewPeer("nB", "nix-builder-i-2", "100.101.0.2", true)}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1"), booting("i-2", "arm", "slot1")},
			want:      map[string]string{"i-1": "", "i-2": "100.101.0.2:22"},
			lookups:   map[string]float64{"tailscale/absent": 1, "tailscale/found": 1},
		},
		{
			name: "IPv6 listed first",
			peers: func() []discoverytest.Peer {
				p := discoverytest.NewPeer("nA", "nix-builder-i-1", "", true)
				p["TailscaleIPs"] = []any{"fd7a:115c:a1e0::1", "100.101.0.9"}
				return []discoverytest.Peer{p}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": "100.101.0.9:22"},
			lookups:   map[string]float64{"tailscale/found": 1},
		},
		{
			name: "no IPv4 address",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{discoverytest.NewPeer("nA", "nix-builder-i-1", "", true)}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1")},
			want:      map[string]string{"i-1": ""},
			lookups:   map[string]float64{"tailscale/absent": 1},
			warn:      []string{"no IPv4 address", "nA"},
		},
		{
			name: "required tag missing",
			o:    Options{Tag: "tag:nix-builder"},
			peers: func() []discoverytest.Peer {
				p := discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)
				p["Tags"] = nil
				return []discoverytest.Peer{p, discoverytest.NewPeer("nB", "nix-builder-i-2", "100.101.0.2", true)}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot1"), booting("i-2", "x86", "slot2")},
			want:      map[string]string{"i-1": "", "i-2": "100.101.0.2:22"},
			lookups:   map[string]float64{"tailscale/absent": 1, "tailscale/found": 1},
		},
		{
			name: "template, cluster and port",
			o: Options{
				Pools:    map[string]PoolSource{"x86": {Source: SourceTailscale, Port: 2222}},
				Hostname: template.Must(template.New("h").Parse("{{.Cluster}}-{{.Pool}}-{{.Slot}}")),
				Cluster:  "ci",
			},
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{discoverytest.NewPeer("nA", "ci-x86-slot3", "100.101.0.3", true)}
			},
			instances: []scaler.Instance{booting("i-1", "x86", "slot3")},
			want:      map[string]string{"i-1": "100.101.0.3:2222"},
			lookups:   map[string]float64{"tailscale/found": 1},
		},
		{
			name: "instances not running or already addressed are left alone",
			peers: func() []discoverytest.Peer {
				return []discoverytest.Peer{discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)}
			},
			instances: []scaler.Instance{
				{ID: "i-1", Pool: "x86", Slot: "slot1", State: scaler.InstancePending},
				{ID: "i-2", Pool: "x86", Slot: "slot2", State: scaler.InstanceRunning, Address: "100.101.0.77:22"},
				{ID: "i-3", Pool: "x86", Slot: "slot3", State: scaler.InstanceTerminated},
			},
			want:    map[string]string{"i-1": "", "i-2": "100.101.0.77:22", "i-3": ""},
			lookups: map[string]float64{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, tt.o, discoverytest.Status(tt.peers()...), tt.instances...)
			if got := h.list(t); !maps.Equal(got, tt.want) {
				t.Errorf("addresses = %v, want %v", got, tt.want)
			}
			if got := lookups(t, h.reg); !maps.Equal(got, tt.lookups) {
				t.Errorf("lookups = %v, want %v", got, tt.lookups)
			}
			if tt.warn != nil && len(h.logs.lines("WARN", tt.warn...)) != 1 {
				t.Errorf("want one WARN line with %q; logs:\n%s", tt.warn, h.logs)
			}
			if tt.warn == nil && len(h.logs.lines("WARN")) > 0 {
				t.Errorf("unexpected warnings:\n%s", h.logs)
			}
		})
	}
}

// TestBootingToBinding drives a builder through its boot as the reconciler
// sees it: not on the tailnet, then offline, then online.
func TestBootingToBinding(t *testing.T) {
	h := newHarness(t, Options{}, discoverytest.Status(), booting("i-0abc", "x86", "slot1"))
	if got := h.list(t)["i-0abc"]; got != "" {
		t.Fatalf("before joining: address %q", got)
	}
	h.ts.SetDoc(discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-0abc", "100.101.0.1", false)))
	if got := h.list(t)["i-0abc"]; got != "" {
		t.Fatalf("offline: address %q", got)
	}
	h.ts.SetDoc(discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-0abc", "100.101.0.1", true)))
	if got := h.list(t)["i-0abc"]; got != "100.101.0.1:22" {
		t.Fatalf("online: address %q, want 100.101.0.1:22", got)
	}
	want := map[string]float64{"tailscale/absent": 1, "tailscale/offline": 1, "tailscale/found": 1}
	if got := lookups(t, h.reg); !maps.Equal(got, want) {
		t.Errorf("lookups = %v, want %v", got, want)
	}
	if len(h.logs.lines("INFO", "builder found on the tailnet", "node=nA")) != 1 {
		t.Errorf("want one INFO line for the found builder; logs:\n%s", h.logs)
	}
}

func TestBuilderNeverAppears(t *testing.T) {
	h := newHarness(t, Options{}, discoverytest.Status(discoverytest.NewPeer("nB", "nix-builder-i-other", "100.101.0.2", true)),
		booting("i-1", "x86", "slot1"))
	for range 5 {
		if got := h.list(t)["i-1"]; got != "" {
			t.Fatalf("address %q for a builder that never joined", got)
		}
	}
	if got := lookups(t, h.reg); !maps.Equal(got, map[string]float64{"tailscale/absent": 5}) {
		t.Errorf("lookups = %v", got)
	}
	if n := h.ts.Requests(); n != 5 {
		t.Errorf("%d status calls for 5 Lists", n)
	}
}

func TestOneStatusCallPerList(t *testing.T) {
	doc := discoverytest.Status(
		discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true),
		discoverytest.NewPeer("nB", "nix-builder-i-2", "100.101.0.2", true),
		discoverytest.NewPeer("nC", "nix-builder-i-3", "100.101.0.3", true))
	o := Options{Pools: map[string]PoolSource{"x86": {Source: SourceTailscale}, "vpc": {Source: SourceEC2PrivateIP}}}
	h := newHarness(t, o, doc,
		booting("i-1", "x86", "slot1"), booting("i-2", "x86", "slot2"), booting("i-3", "x86", "slot3"),
		booting("i-4", "vpc", "slot1"))
	got := h.list(t)
	want := map[string]string{"i-1": "100.101.0.1:22", "i-2": "100.101.0.2:22", "i-3": "100.101.0.3:22", "i-4": "10.0.1.5:22"}
	if !maps.Equal(got, want) {
		t.Errorf("addresses = %v, want %v", got, want)
	}
	if n := h.ts.Requests(); n != 1 {
		t.Errorf("%d status calls, want 1", n)
	}

	// No instance needs the tailnet: no call at all.
	h2 := newHarness(t, o, doc, booting("i-4", "vpc", "slot1"),
		scaler.Instance{ID: "i-5", Pool: "x86", Slot: "slot1", State: scaler.InstancePending})
	h2.list(t)
	if n := h2.ts.Requests(); n != 0 {
		t.Errorf("%d status calls with nothing to look up, want 0", n)
	}
}

func TestLocalAPIDown(t *testing.T) {
	instances := []scaler.Instance{booting("i-1", "x86", "slot1"), booting("i-2", "vpc", "slot1"),
		{ID: "i-3", Pool: "x86", Slot: "slot2", State: scaler.InstancePending}}
	o := Options{Pools: map[string]PoolSource{"x86": {Source: SourceTailscale}, "vpc": {Source: SourceEC2PrivateIP}}}
	h := newHarness(t, o, nil, instances...) // no tailscaled

	for range 3 {
		list, err := h.p.List(context.Background())
		if err != nil {
			t.Fatalf("List failed with Tailscale down: %v", err)
		}
		if len(list) != 3 {
			t.Fatalf("List returned %d instances, want 3", len(list))
		}
		want := slices.Clone(instances)
		want[1].Address = "10.0.1.5:22" // the VPC pool does not need Tailscale
		if !slices.Equal(list, want) {
			t.Errorf("List = %+v\nwant %+v", list, want)
		}
		h.clock.Advance(10 * time.Second)
	}
	errs := h.logs.lines("ERROR", "cannot read the tailnet", "is tailscaled running?", h.sock)
	if len(errs) != 1 {
		t.Errorf("%d ERROR lines in 30s, want 1; logs:\n%s", len(errs), h.logs)
	}
	if got := lookups(t, h.reg); got["tailscale/error"] != 3 {
		t.Errorf("lookups = %v, want 3 errors", got)
	}

	h.clock.Advance(time.Minute)
	h.list(t)
	if n := len(h.logs.lines("ERROR", "cannot read the tailnet")); n != 2 {
		t.Errorf("%d ERROR lines after a minute more, want 2", n)
	}

	// tailscaled comes back.
	h.ts = discoverytest.StartAt(t, h.sock, discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)))
	if got := h.list(t)["i-1"]; got != "100.101.0.1:22" {
		t.Errorf("after recovery: address %q", got)
	}
	if len(h.logs.lines("INFO", "answers again")) != 1 {
		t.Errorf("want one recovery line; logs:\n%s", h.logs)
	}
}

func TestLocalAPINotLoggedIn(t *testing.T) {
	doc := discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true))
	doc["BackendState"] = "Stopped"
	h := newHarness(t, Options{}, doc, booting("i-1", "x86", "slot1"))
	if got := h.list(t)["i-1"]; got != "" {
		t.Errorf("address %q from a stopped tailscaled", got)
	}
	if len(h.logs.lines("ERROR", "tailscale is Stopped; run `tailscale up`")) != 1 {
		t.Errorf("logs:\n%s", h.logs)
	}
}

func TestListEC2Sources(t *testing.T) {
	o := Options{Pools: map[string]PoolSource{
		"priv":  {Source: SourceEC2PrivateIP},
		"pub":   {Source: SourceEC2PublicIP, Port: 2222},
		"prov":  {Source: SourceProvider},
		"empty": {},
	}}
	noPublic := booting("i-4", "pub", "slot2")
	noPublic.PublicIP = ""
	fromProvider := booting("i-5", "prov", "slot1")
	fromProvider.Address = "127.0.0.5:2201"
	h := newHarness(t, o, nil,
		booting("i-1", "priv", "slot1"),
		booting("i-2", "pub", "slot1"),
		booting("i-3", "unconfigured", "slot1"),
		noPublic, fromProvider,
		booting("i-6", "prov", "slot2"),
		booting("i-7", "empty", "slot1"),
	)
	got := h.list(t)
	want := map[string]string{"i-1": "10.0.1.5:22", "i-2": "198.51.100.7:2222", "i-3": "", "i-4": "",
		"i-5": "127.0.0.5:2201", "i-6": "", "i-7": ""}
	if !maps.Equal(got, want) {
		t.Errorf("addresses = %v, want %v", got, want)
	}
	wantLookups := map[string]float64{"ec2-private-ip/found": 1, "ec2-public-ip/found": 1, "ec2-public-ip/absent": 1}
	if got := lookups(t, h.reg); !maps.Equal(got, wantLookups) {
		t.Errorf("lookups = %v, want %v", got, wantLookups)
	}
}

func TestListPassesInnerErrorAndKeepsInnerUnchanged(t *testing.T) {
	h := newHarness(t, Options{}, discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)),
		booting("i-1", "x86", "slot1"))
	h.list(t)
	if a := h.inner.instances[0].Address; a != "" {
		t.Errorf("List changed the inner provider's instance: Address %q", a)
	}
	h.inner.listErr = errBoom
	if _, err := h.p.List(context.Background()); !errors.Is(err, errBoom) {
		t.Errorf("List error = %v, want %v", err, errBoom)
	}
}

func TestLaunchPassesThrough(t *testing.T) {
	h := newHarness(t, Options{}, nil)
	req := scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "L1"}
	in, err := h.p.Launch(context.Background(), req)
	if err != nil || in.ID != "i-launched" || len(h.inner.launched) != 1 || h.inner.launched[0] != req {
		t.Errorf("Launch = %+v, %v; inner saw %+v", in, err, h.inner.launched)
	}
}

// deleteRecorder is an Options.DeleteDevice with an error hook.
type deleteRecorder struct {
	mu    sync.Mutex
	calls []string
	err   error
}

func (d *deleteRecorder) DeleteDevice(_ context.Context, id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, id)
	return d.err
}

func (d *deleteRecorder) seen() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.calls)
}

func TestTerminateDeletesSeenDevice(t *testing.T) {
	// Through the real API client, against a fake Tailscale API.
	var mu sync.Mutex
	var requests []string
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		requests = append(requests, r.Method+" "+r.URL.Path+" "+r.Header.Get("Authorization"))
		mu.Unlock()
	}))
	defer api.Close()
	doc := discoverytest.Status(
		discoverytest.NewPeer("nOLD", "nix-builder-i-1", "100.101.0.1", false),
		discoverytest.NewPeer("nNEW", "nix-builder-i-1", "100.101.0.2", true),
		discoverytest.NewPeer("nB", "nix-builder-i-2", "100.101.0.3", true))
	o := Options{DeleteDevice: NewTailscaleAPI(api.URL, "-", "tskey-api-test\n").DeleteDevice}
	h := newHarness(t, o, doc, booting("i-1", "x86", "slot1"), booting("i-2", "x86", "slot2"), booting("i-3", "x86", "slot3"))
	h.list(t)

	for _, id := range []string{"i-1", "i-3"} { // i-3 was never on the tailnet
		if err := h.p.Terminate(context.Background(), id); err != nil {
			t.Fatalf("Terminate(%s): %v", id, err)
		}
	}
	if err := h.p.Terminate(context.Background(), "i-1"); err != nil { // again: nothing left to delete
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"DELETE /api/v2/device/nNEW Bearer tskey-api-test"}
	if !slices.Equal(requests, want) {
		t.Errorf("API requests = %q, want %q", requests, want)
	}
	if !slices.Equal(h.inner.terminated, []string{"i-1", "i-3", "i-1"}) {
		t.Errorf("inner terminated %v", h.inner.terminated)
	}
	if got := counters(t, h.reg, "nix_builder_autoscaler_discovery_device_deletions_total", "result"); !maps.Equal(got, map[string]float64{"ok": 1}) {
		t.Errorf("deletions = %v", got)
	}
}

func TestTerminateToleratesDeleteFailure(t *testing.T) {
	del := &deleteRecorder{err: errBoom}
	h := newHarness(t, Options{DeleteDevice: del.DeleteDevice},
		discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)), booting("i-1", "x86", "slot1"))
	h.list(t)
	if err := h.p.Terminate(context.Background(), "i-1"); err != nil {
		t.Fatalf("Terminate failed because the device deletion did: %v", err)
	}
	if len(h.logs.lines("WARN", "could not delete", "node=nA", "boom")) != 1 {
		t.Errorf("want one WARN line; logs:\n%s", h.logs)
	}
	// A repeated Terminate tries again, and succeeds this time.
	del.mu.Lock()
	del.err = nil
	del.mu.Unlock()
	if err := h.p.Terminate(context.Background(), "i-1"); err != nil {
		t.Fatal(err)
	}
	if got := del.seen(); !slices.Equal(got, []string{"nA", "nA"}) {
		t.Errorf("DeleteDevice calls = %v", got)
	}
	want := map[string]float64{"ok": 1, "error": 1}
	if got := counters(t, h.reg, "nix_builder_autoscaler_discovery_device_deletions_total", "result"); !maps.Equal(got, want) {
		t.Errorf("deletions = %v, want %v", got, want)
	}
}

func TestTerminateInnerFailure(t *testing.T) {
	del := &deleteRecorder{}
	h := newHarness(t, Options{DeleteDevice: del.DeleteDevice},
		discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)), booting("i-1", "x86", "slot1"))
	h.list(t)
	h.inner.terminateErr = errBoom
	if err := h.p.Terminate(context.Background(), "i-1"); !errors.Is(err, errBoom) {
		t.Errorf("Terminate = %v, want %v", err, errBoom)
	}
	if got := del.seen(); len(got) != 0 {
		t.Errorf("device deleted although the instance was not terminated: %v", got)
	}
}

func TestForgetsInstancesNoLongerListed(t *testing.T) {
	del := &deleteRecorder{}
	h := newHarness(t, Options{DeleteDevice: del.DeleteDevice},
		discoverytest.Status(discoverytest.NewPeer("nA", "nix-builder-i-1", "100.101.0.1", true)), booting("i-1", "x86", "slot1"))
	h.list(t)
	h.inner.instances = nil
	h.list(t)
	if err := h.p.Terminate(context.Background(), "i-1"); err != nil {
		t.Fatal(err)
	}
	if got := del.seen(); len(got) != 0 {
		t.Errorf("DeleteDevice calls = %v for a forgotten instance", got)
	}
}

func TestAmbiguityWarningIsThrottled(t *testing.T) {
	doc := discoverytest.Status(
		discoverytest.NewPeer("nONE", "nix-builder-i-1", "100.101.0.1", true),
		discoverytest.NewPeer("nTWO", "nix-builder-i-1", "100.101.0.2", true))
	h := newHarness(t, Options{}, doc, booting("i-1", "x86", "slot1"))
	for range 4 {
		h.list(t)
		h.clock.Advance(20 * time.Second)
	}
	if n := len(h.logs.lines("WARN", "several online")); n != 2 {
		t.Errorf("%d warnings over 80s, want 2 (one a minute)", n)
	}
	if got := lookups(t, h.reg)["tailscale/ambiguous"]; got != 4 {
		t.Errorf("ambiguous lookups = %v, want 4", got)
	}
}

func TestHostname(t *testing.T) {
	h := newHarness(t, Options{Cluster: "ci"}, nil)
	got, err := h.p.Hostname(scaler.Instance{ID: "i-0abc", Pool: "x86", Slot: "slot1"})
	if err != nil || got != "nix-builder-i-0abc" {
		t.Errorf("Hostname = %q, %v", got, err)
	}

	bad := template.Must(template.New("h").Parse("{{.Nope}}"))
	h = newHarness(t, Options{Hostname: bad}, discoverytest.Status(), booting("i-1", "x86", "slot1"))
	if got := h.list(t)["i-1"]; got != "" {
		t.Errorf("address %q", got)
	}
	if got := lookups(t, h.reg); got["tailscale/error"] != 1 {
		t.Errorf("lookups = %v", got)
	}
	if !strings.Contains(h.logs.String(), "tailscale.hostname") {
		t.Errorf("logs:\n%s", h.logs)
	}
}

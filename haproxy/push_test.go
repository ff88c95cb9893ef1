package haproxy

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// TestPush: on a real HAProxy whose agent check never answers (so only the
// pushes can change the server), Push takes a slot's server through the
// states the agent check would: out of maintenance but held DOWN while
// binding (its health check runs and passes), UP at the pushed weight once
// ready, DRAIN when draining, MAINT otherwise.
func TestPush(t *testing.T) {
	b := startBanner(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveLines(t, l, testwait.Bound, func(string) (string, bool) { return "", false })
	cfg := testGlobal + fmt.Sprintf(`backend nba_x86
    balance leastconn
    option tcp-check
    tcp-check expect rstring ^SSH-2\.0-
    default-server check inter 100ms fall 2 rise 1 agent-check agent-addr 127.0.0.1 agent-port %d agent-inter 100ms maxconn 2 weight 100
    server slot1 slot.nba.invalid:22 init-addr last,%s disabled agent-send "x86/slot1\n"
`, l.Addr().(*net.TCPAddr).Port, Placeholder)
	h := haproxytest.Start(t, haproxytest.Dir(t), cfg)
	r := NewReadiness(NewClient(h.Socket, testwait.Bound), []string{"x86"}, placeholderAddr, 100*time.Millisecond, nil, nil)
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	slot := scaler.Slot{Pool: "x86", Name: "slot1", State: scaler.Binding, Weight: 100, Address: b.Addr}
	status := func() string { return serverStat(t, h, "nba_x86", "slot1").Status() }

	if st := status(); !strings.HasPrefix(st, "MAINT") {
		t.Fatalf("before any push: status %q, want MAINT (the config's disabled)", st)
	}
	if err := r.Bind(t.Context(), key, b.Addr); err != nil {
		t.Fatal(err)
	}
	if err := r.Push(t.Context(), slot); err != nil {
		t.Fatal(err)
	}
	srv := waitServer(t, r, key, "health check passed while binding", func(s scaler.ServerStatus) bool { return s.Healthy })
	if srv.Up {
		t.Fatalf("binding slot's server is up (%q); the agent's down must hold it until ready", status())
	}

	slot.State, slot.Weight = scaler.Ready, 37
	if err := r.Push(t.Context(), slot); err != nil {
		t.Fatal(err)
	}
	// No wait: the push itself made it UP.
	servers, err := r.Servers(t.Context())
	if err != nil || !servers[key].Up {
		t.Fatalf("right after pushing ready: %+v, %v (status %q); want up", servers[key], err, status())
	}
	if w := serverStat(t, h, "nba_x86", "slot1").Int("weight"); w != 37 {
		t.Errorf("weight after push = %d, want 37", w)
	}

	slot.State = scaler.Draining
	if err := r.Push(t.Context(), slot); err != nil {
		t.Fatal(err)
	}
	if st := status(); !strings.HasPrefix(st, "DRAIN") {
		t.Errorf("after pushing draining: status %q, want DRAIN", st)
	}

	slot.State = scaler.Terminating
	if err := r.Push(t.Context(), slot); err != nil {
		t.Fatal(err)
	}
	if st := status(); !strings.HasPrefix(st, "MAINT") {
		t.Errorf("after pushing terminating: status %q, want MAINT", st)
	}

	if err := r.Push(t.Context(), scaler.Slot{Pool: "x86", Name: "slot9", State: scaler.Ready}); err == nil {
		t.Error("push to a server HAProxy does not have succeeded")
	}
}

package local

import (
	"context"
	"io"
	"maps"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// fakeServer listens on loopback and greets each connection with greeting
// ("" = says nothing), holding it until the peer closes or the test ends.
func fakeServer(t *testing.T, greeting string) string { return greetingServer(t, greeting, true) }

// closingServer listens on loopback and sends each connection greeting,
// then closes it.
func closingServer(t *testing.T, greeting string) string { return greetingServer(t, greeting, false) }

func greetingServer(t *testing.T, greeting string, hold bool) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	done := make(chan struct{})
	t.Cleanup(func() {
		close(done)
		_ = ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				go func() { <-done; _ = c.Close() }()
				_, _ = io.WriteString(c, greeting)
				if hold {
					_, _ = io.Copy(io.Discard, c)
				}
			})
		}
	})
	return ln.Addr().String()
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

func TestProber(t *testing.T) {
	t.Parallel()
	p := newProvider(t, standinOptions(t, "c1", t.TempDir(), nil))
	standin := launch(t, context.Background(), p, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
	t.Cleanup(func() { _ = p.Terminate(context.Background(), standin.ID) })

	tests := []struct {
		name string
		addr string
		up   bool
	}{
		{"stand-in", standin.Address, true},
		{"other sshd", fakeServer(t, "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"), true},
		{"closed port", closedPort(t), false},
		{"http server", fakeServer(t, "HTTP/1.0 400 Bad Request\r\n\r\n"), false},
		{"ssh 1 banner", fakeServer(t, "SSH-1.5-old\r\n"), false},
		{"banner cut off by close", closingServer(t, "SSH-2.0-cut"), true},
		{"closed without a word", closingServer(t, ""), false},
	}
	// Each of these answers (or refuses) at once, so the timeout is only a
	// hang guard: a busy machine does not turn a builder down.
	pr := NewProber(testwait.Bound)
	ctx := context.Background()
	want := map[scaler.SlotKey]scaler.ServerStatus{}
	for _, tt := range tests {
		key := scaler.SlotKey{Pool: "x86", Slot: tt.name}
		if err := pr.Bind(ctx, key, tt.addr); err != nil {
			t.Fatalf("Bind(%s, %s): %v", key, tt.addr, err)
		}
		want[key] = scaler.ServerStatus{Addr: tt.addr, Up: tt.up, Healthy: tt.up, Sessions: 0}
	}
	got, err := pr.Servers(ctx)
	if err != nil {
		t.Fatalf("Servers: %v", err)
	}
	for _, tt := range tests {
		key := scaler.SlotKey{Pool: "x86", Slot: tt.name}
		if got[key] != want[key] {
			t.Errorf("%s: got %+v, want %+v", tt.name, got[key], want[key])
		}
	}
	if len(got) != len(want) {
		t.Errorf("Servers: got %d servers, want %d", len(got), len(want))
	}

	// Unbinding removes a server; a bad address is refused.
	gone := scaler.SlotKey{Pool: "x86", Slot: "closed port"}
	if err := pr.Bind(ctx, gone, ""); err != nil {
		t.Fatalf("Bind(%s, \"\"): %v", gone, err)
	}
	delete(want, gone)
	if err := pr.Bind(ctx, scaler.SlotKey{Pool: "x86", Slot: "bad"}, "no-port"); err == nil {
		t.Error("Bind with an address without port: got nil error")
	}
	got, err = pr.Servers(ctx)
	if err != nil {
		t.Fatalf("Servers: %v", err)
	}
	if !maps.Equal(got, want) {
		t.Errorf("Servers after unbind:\n got %+v\nwant %+v", got, want)
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := pr.Servers(cctx); err == nil {
		t.Error("Servers with a cancelled context: got nil error")
	}
}

// TestProberSilentServer: a server that accepts and never says a word is
// down once the probe's timeout has passed; it does not hold Servers up.
func TestProberSilentServer(t *testing.T) {
	t.Parallel()
	addr := fakeServer(t, "")
	pr := NewProber(200 * time.Millisecond)
	key := scaler.SlotKey{Pool: "x86", Slot: "silent"}
	if err := pr.Bind(context.Background(), key, addr); err != nil {
		t.Fatal(err)
	}
	got, err := pr.Servers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := (scaler.ServerStatus{Addr: addr}); got[key] != want || len(got) != 1 {
		t.Errorf("Servers: got %+v, want only %s: %+v (down)", got, key, want)
	}
}

func TestProberBootDelay(t *testing.T) {
	t.Parallel()
	p := newProvider(t, standinOptions(t, "c1", t.TempDir(),
		map[string]PoolOptions{"x86": {Address: "127.0.0.1", BootDelay: time.Hour}}))
	inst := launch(t, context.Background(), p, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
	t.Cleanup(func() { _ = p.Terminate(context.Background(), inst.ID) })

	pr := NewProber(200 * time.Millisecond)
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	if err := pr.Bind(context.Background(), key, inst.Address); err != nil {
		t.Fatal(err)
	}
	got, err := pr.Servers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := (scaler.ServerStatus{Addr: inst.Address}); got[key] != want {
		t.Errorf("booting stand-in: got %+v, want %+v (down)", got[key], want)
	}
}

func TestReadBanner(t *testing.T) {
	t.Parallel()
	long := "SSH-2.0-" + strings.Repeat("x", 300) + "\r\n"
	tests := []struct {
		name    string
		addr    string
		timeout time.Duration
		want    string
		wantErr bool
	}{
		// These end without waiting for the timeout (a line, a close, the
		// length limit, a refusal): it is only a hang guard.
		{"openssh", fakeServer(t, "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"), testwait.Bound, "SSH-2.0-OpenSSH_9.2p1 Debian-2", false},
		{"bare newline", fakeServer(t, "SSH-2.0-x\nmore\n"), testwait.Bound, "SSH-2.0-x", false},
		{"closed before the line end", closingServer(t, "SSH-2.0-slow"), testwait.Bound, "SSH-2.0-slow", true},
		{"longer than RFC 4253 allows", fakeServer(t, long), testwait.Bound, long[:255], true},
		{"closed port", closedPort(t), testwait.Bound, "", true},
		// This one ends at the timeout, whatever the load: nothing comes.
		{"silent server", fakeServer(t, ""), 300 * time.Millisecond, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := ReadBanner(context.Background(), tt.addr, tt.timeout)
			if got != tt.want || (err != nil) != tt.wantErr {
				t.Errorf("ReadBanner = %q, %v; want %q, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

package discovery

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery/discoverytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

func TestStatusDecodesReferenceDocument(t *testing.T) {
	ts := discoverytest.StartAt(t, filepath.Join(discoverytest.ShortDir(t), "ts.sock"), discoverytest.ReferenceDoc())
	sock := ts.Socket

	st, err := NewLocalAPI(sock).Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.BackendState != "Running" || st.MagicDNSSuffix != "tail1234.ts.net" {
		t.Errorf("BackendState, MagicDNSSuffix = %q, %q", st.BackendState, st.MagicDNSSuffix)
	}
	if st.Self == nil || st.Self.HostName != "scheduler" || st.Self.ID != "nSELF1CNTRL" {
		t.Errorf("Self = %+v", st.Self)
	}
	const key = "nodekey:ffb8c30c34e873f99d3a14a4bacd50cac2efd6652ab9af17e68073133ecf772f"
	p := st.Peer[key]
	if p == nil {
		t.Fatalf("peer %s missing; peers: %v", key, st.Peer)
	}
	want := PeerStatus{
		ID:       "nPEER1CNTRL",
		HostName: "builder-i-0abc123",
		DNSName:  "builder-i-0abc123.tail1234.ts.net.",
		TailscaleIPs: []netip.Addr{netip.MustParseAddr("100.101.102.103"),
			netip.MustParseAddr("fd7a:115c:a1e0::abcd")},
		Online: true,
		Tags:   []string{"tag:nix-builder"},
	}
	if p.ID != want.ID || p.HostName != want.HostName || p.DNSName != want.DNSName || p.Online != want.Online ||
		!slices.Equal(p.TailscaleIPs, want.TailscaleIPs) || !slices.Equal(p.Tags, want.Tags) {
		t.Errorf("peer = %+v, want %+v", *p, want)
	}
	if ip, ok := p.IPv4(); !ok || ip.String() != "100.101.102.103" {
		t.Errorf("IPv4() = %v, %v", ip, ok)
	}
	if got := p.DNSLabel(); got != "builder-i-0abc123" {
		t.Errorf("DNSLabel() = %q", got)
	}
	if !p.HasTag("tag:nix-builder") || p.HasTag("tag:other") {
		t.Errorf("HasTag wrong for %v", p.Tags)
	}

	if hosts := ts.Hosts(); !slices.Equal(hosts, []string{"local-tailscaled.sock"}) {
		t.Errorf("Host headers = %q, want [local-tailscaled.sock]", hosts)
	}
	if paths := ts.Paths(); !slices.Equal(paths, []string{"GET /localapi/v0/status"}) {
		t.Errorf("requests = %q", paths)
	}
}

func TestStatusErrors(t *testing.T) {
	needsLogin := discoverytest.ReferenceDoc()
	needsLogin["BackendState"] = "NeedsLogin"

	tests := []struct {
		name  string
		setup func(t *testing.T, sock string, c *LocalAPI)
		is    error    // errors.Is target, if any
		want  []string // substrings of the message
	}{
		{
			name:  "socket missing",
			setup: func(*testing.T, string, *LocalAPI) {},
			is:    fs.ErrNotExist,
			want:  []string{"is tailscaled running?", "tailscale.socket = "},
		},
		{
			name: "nothing listening",
			setup: func(t *testing.T, sock string, _ *LocalAPI) {
				ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
				if err != nil {
					t.Fatal(err)
				}
				ln.SetUnlinkOnClose(false)
				ln.Close()
			},
			is:   syscall.ECONNREFUSED,
			want: []string{"nothing listens on", "is tailscaled running?"},
		},
		{
			name: "not logged in",
			setup: func(t *testing.T, sock string, _ *LocalAPI) {
				discoverytest.StartAt(t, sock, needsLogin)
			},
			want: []string{"tailscale is NeedsLogin; run `tailscale up`"},
		},
		{
			name: "bad JSON",
			setup: func(t *testing.T, sock string, _ *LocalAPI) {
				discoverytest.StartAt(t, sock, nil).SetRaw(0, []byte(`{"BackendState": "Running", "Peer": [`))
			},
			want: []string{"decoding the status"},
		},
		{
			name: "HTTP error",
			setup: func(t *testing.T, sock string, _ *LocalAPI) {
				discoverytest.StartAt(t, sock, nil).SetRaw(500, []byte("Nope\nsomething broke\n"))
			},
			want: []string{"500 Internal Server Error", "Nope something broke"},
		},
		{
			name: "document too large",
			setup: func(t *testing.T, sock string, c *LocalAPI) {
				discoverytest.StartAt(t, sock, discoverytest.ReferenceDoc())
				c.maxBytes = 100
			},
			want: []string{"larger than 100 bytes"},
		},
		{
			name: "no answer in time",
			setup: func(t *testing.T, sock string, c *LocalAPI) {
				discoverytest.StartAt(t, sock, discoverytest.ReferenceDoc()).SetDelay(time.Minute)
				c.Timeout = 100 * time.Millisecond
			},
			is:   context.DeadlineExceeded,
			want: []string{"no answer in time"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := filepath.Join(discoverytest.ShortDir(t), "ts.sock")
			c := NewLocalAPI(sock)
			tt.setup(t, sock, c)
			st, err := c.Status(context.Background())
			if err == nil {
				t.Fatalf("Status() = %+v, want an error", st)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("error %q is not %v", err, tt.is)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if strings.Contains(tt.name, "logged in") {
				var bse *BackendStateError
				if !errors.As(err, &bse) || bse.State != "NeedsLogin" {
					t.Errorf("error %#v is not a *BackendStateError{NeedsLogin}", err)
				}
			}
		})
	}
}

func TestStatusPermissionDenied(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root opens any socket; see TestRequestErrorPermission")
	}
	sock := discoverytest.Start(t).Socket
	if err := os.Chmod(sock, 0); err != nil {
		t.Fatal(err)
	}
	_, err := NewLocalAPI(sock).Status(context.Background())
	if !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "permission denied on "+sock) {
		t.Errorf("error = %v, want permission denied on %s", err, sock)
	}
}

// TestRequestErrorPermission checks the permission message without a real
// denial (the tests may run as root).
func TestRequestErrorPermission(t *testing.T) {
	c := NewLocalAPI("/run/x/tailscaled.sock")
	raw := &url.Error{Op: "Get", URL: "http://local-tailscaled.sock/localapi/v0/status",
		Err: &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)}}
	err := c.requestError(context.Background(), raw)
	if !errors.Is(err, fs.ErrPermission) {
		t.Errorf("error %q does not wrap fs.ErrPermission", err)
	}
	for _, w := range []string{"permission denied on /run/x/tailscaled.sock", `tailscale.socket = "/run/x/tailscaled.sock"`} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not contain %q", err, w)
		}
	}
}

func TestStatusHonoursCallerContext(t *testing.T) {
	f := discoverytest.StartAt(t, filepath.Join(discoverytest.ShortDir(t), "ts.sock"), discoverytest.ReferenceDoc())
	f.SetDelay(time.Minute)
	sock := f.Socket
	c := NewLocalAPI(sock)
	c.Timeout = 10 * time.Minute // longer than the fake's delay: only the caller ends the call
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Status(ctx)
		errc <- err
	}()
	// Cancel once the request is open (the fake holds it for a minute).
	testwait.Until(t, "the status request to reach the fake", func() bool { return f.Requests() > 0 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("error = %v, want context.Canceled", err)
	}
}

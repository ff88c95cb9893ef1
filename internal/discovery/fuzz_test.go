package discovery

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

type bodyTransport struct{ body string }

func (b bodyTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: http.StatusOK, Status: "200 OK", Header: http.Header{"Content-Type": {"application/json"}},
		Body: io.NopCloser(strings.NewReader(b.body)), Request: r}, nil
}

// FuzzLocalAPIStatus decodes arbitrary status documents through
// LocalAPI.Status: no panic, a Running status or an error, and every
// accessor works on the peers it returns.
func FuzzLocalAPIStatus(f *testing.F) {
	for _, s := range []string{
		`{"BackendState":"Running","MagicDNSSuffix":"tail.ts.net","Self":{"ID":"n1","HostName":"ctl","DNSName":"ctl.tail.ts.net.","TailscaleIPs":["100.64.0.1","fd7a:115c:a1e0::1"],"Online":true},` +
			`"Peer":{"nodekey:ab":{"ID":"n2","HostName":"nix-builder-i-1","DNSName":"nix-builder-i-1.tail.ts.net.","TailscaleIPs":["fd7a:115c:a1e0::2","::ffff:100.64.0.2"],"Online":true,"Tags":["tag:nix-builder"]}}}`,
		`{"BackendState":"NeedsLogin"}`,
		`{"BackendState":"Running","Peer":{"k":null}}`,
		`{"BackendState":"Running","Self":null,"Peer":{"k":{"TailscaleIPs":["999.1.1.1"]}}}`,
		`{"BackendState":"Running","Peer":{"k":{"DNSName":"","TailscaleIPs":[]}}}`,
		`{}`, `null`, `[]`, ``, `{"BackendState":"Running"`, `{"BackendState":1}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		if len(body) > 1<<20 {
			t.Skip()
		}
		c := NewLocalAPI("/nonexistent/tailscaled.sock")
		c.maxBytes = 64 << 10
		c.client = &http.Client{Transport: bodyTransport{body}}
		st, err := c.Status(context.Background())
		if err != nil {
			if st != nil {
				t.Fatalf("Status returned a status and the error %v", err)
			}
			if len(body) > 64<<10 && !strings.Contains(err.Error(), "larger than") {
				t.Fatalf("Status on %d bytes: %v; want the size limit", len(body), err)
			}
			var be *BackendStateError
			if errors.As(err, &be) && be.State == BackendRunning {
				t.Fatalf("BackendStateError for a running tailscaled: %v", err)
			}
			return
		}
		if st.BackendState != BackendRunning {
			t.Fatalf("Status returned state %q without an error", st.BackendState)
		}
		peers := []*PeerStatus{st.Self}
		for _, p := range st.Peer {
			peers = append(peers, p)
		}
		for _, p := range peers {
			if p == nil {
				continue
			}
			if ip, ok := p.IPv4(); ok && !ip.Is4() {
				t.Fatalf("IPv4() = %v, not IPv4", ip)
			}
			_ = p.DNSLabel()
			_ = p.HasTag("tag:nix-builder")
		}
	})
}

// Package discovery finds the address HAProxy should use for a booted
// builder: its Tailscale IP (read from tailscaled's LocalAPI), or its EC2
// private or public IP. It wraps a scaler.Provider so the reconciler sees
// each running instance with its Address filled in as soon as it is known
// (booting → binding, docs/design.md §1).
package discovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"syscall"
	"time"
)

// DefaultSocket is where tailscaled serves its LocalAPI on Linux.
const DefaultSocket = "/var/run/tailscale/tailscaled.sock"

// DefaultLocalAPITimeout bounds one LocalAPI call.
const DefaultLocalAPITimeout = 5 * time.Second

// localAPIHost is the Host header tailscaled expects; it answers other
// hosts (except an empty one) with 403 "invalid localapi request".
const localAPIHost = "local-tailscaled.sock"

const statusPath = "/localapi/v0/status"

// maxStatusBytes bounds the status document. A peer takes about 1.3 kB, so
// this leaves room for tens of thousands of peers.
const maxStatusBytes = 32 << 20

// BackendRunning is the BackendState of a tailscaled that is connected.
const BackendRunning = "Running"

// LocalAPI is a minimal client of tailscaled's LocalAPI (HTTP over its unix
// socket). It reads; it never changes tailscaled's state.
type LocalAPI struct {
	socket string
	// Timeout bounds each call (DefaultLocalAPITimeout unless changed
	// before first use; 0 means only the caller's context bounds it).
	Timeout  time.Duration
	maxBytes int64
	client   *http.Client
}

// NewLocalAPI returns a client of the LocalAPI at socket (DefaultSocket if
// empty).
func NewLocalAPI(socket string) *LocalAPI {
	if socket == "" {
		socket = DefaultSocket
	}
	c := &LocalAPI{socket: socket, Timeout: DefaultLocalAPITimeout, maxBytes: maxStatusBytes}
	c.client = &http.Client{Transport: &http.Transport{
		// No Proxy: the transport must never send LocalAPI requests to an
		// HTTP proxy from the environment.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", c.socket)
		},
		// tailscaled closes idle LocalAPI connections after a few seconds;
		// one call per reconcile round does not need them.
		DisableKeepAlives: true,
	}}
	return c
}

// Socket is the path the client connects to.
func (c *LocalAPI) Socket() string { return c.socket }

// Status is the part of tailscaled's status document discovery uses.
type Status struct {
	// BackendState is "Running" when tailscaled is connected; otherwise
	// e.g. "NeedsLogin", "NeedsMachineAuth", "Stopped", "Starting".
	BackendState   string
	Self           *PeerStatus
	MagicDNSSuffix string
	// Peer holds the other nodes this node may reach or be reached by,
	// keyed by node key ("nodekey:<64 hex>").
	Peer map[string]*PeerStatus
}

// PeerStatus is one node of the tailnet.
type PeerStatus struct {
	// ID is the stable node ID (like "n1a2b3c4CNTRL"), which Tailscale's
	// API accepts as the device ID.
	ID string
	// HostName is the name the node reports (tailscale up --hostname).
	HostName string
	// DNSName is its MagicDNS name, with a trailing dot.
	DNSName      string
	TailscaleIPs []netip.Addr
	Online       bool
	Tags         []string
}

// IPv4 returns the node's first IPv4 Tailscale address.
func (p *PeerStatus) IPv4() (netip.Addr, bool) {
	for _, a := range p.TailscaleIPs {
		if a = a.Unmap(); a.Is4() {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// DNSLabel is the first label of the node's MagicDNS name.
func (p *PeerStatus) DNSLabel() string {
	label, _, _ := strings.Cut(p.DNSName, ".")
	return label
}

// HasTag reports whether the node carries ACL tag t (like "tag:nix-builder").
func (p *PeerStatus) HasTag(t string) bool { return slices.Contains(p.Tags, t) }

// BackendStateError is returned when tailscaled answers but is not
// connected to its tailnet.
type BackendStateError struct {
	State string
}

func (e *BackendStateError) Error() string {
	state := e.State
	if state == "" {
		state = "in an unknown state"
	}
	return fmt.Sprintf("tailscale is %s; run `tailscale up` on this host", state)
}

// Status fetches GET /localapi/v0/status. It fails with a
// *BackendStateError when tailscaled is not Running; errors from the
// socket wrap the system error, so errors.Is(err, fs.ErrNotExist) and
// errors.Is(err, fs.ErrPermission) work.
func (c *LocalAPI) Status(ctx context.Context) (*Status, error) {
	if c.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+localAPIHost+statusPath, nil)
	if err != nil {
		return nil, fmt.Errorf("tailscale LocalAPI: %w", err)
	}
	req.Host = localAPIHost
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, c.requestError(ctx, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, c.maxBytes+1))
	if err != nil {
		return nil, fmt.Errorf("tailscale LocalAPI at %s: reading the status: %w", c.socket, err)
	}
	if int64(len(body)) > c.maxBytes {
		return nil, fmt.Errorf("tailscale LocalAPI at %s: the status document is larger than %d bytes", c.socket, c.maxBytes)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("tailscale LocalAPI at %s: GET %s: %s: %s", c.socket, statusPath, resp.Status, snippet(body))
	}
	var st Status
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("tailscale LocalAPI at %s: decoding the status: %w", c.socket, err)
	}
	if st.BackendState != BackendRunning {
		return nil, &BackendStateError{State: st.BackendState}
	}
	return &st, nil
}

// requestError explains a failed LocalAPI request in the operator's terms.
func (c *LocalAPI) requestError(ctx context.Context, err error) error {
	setting := fmt.Sprintf("tailscale.socket = %q", c.socket)
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err // the URL is always the same; the dial error says it all
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("tailscale LocalAPI: no socket at %s; is tailscaled running? (%s): %w", c.socket, setting, err)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("tailscale LocalAPI: nothing listens on %s; is tailscaled running? (%s): %w", c.socket, setting, err)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("tailscale LocalAPI: permission denied on %s: this daemon's user cannot open the socket "+
			"(tailscaled creates it with mode 0666: check the directory's permissions and the service's sandboxing) (%s): %w",
			c.socket, setting, err)
	case ctx.Err() != nil && errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("tailscale LocalAPI at %s: no answer in time: %w", c.socket, err)
	}
	return fmt.Errorf("tailscale LocalAPI at %s: %w", c.socket, err)
}

// snippet is the start of an error body, on one line.
func snippet(b []byte) string {
	const limit = 200
	s := strings.Join(strings.Fields(string(b)), " ")
	if len(s) > limit {
		s = s[:limit] + "…"
	}
	if s == "" {
		s = "(empty body)"
	}
	return s
}

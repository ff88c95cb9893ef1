package local

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// DefaultProbeTimeout is the Prober's timeout when NewProber gets none.
const DefaultProbeTimeout = 2 * time.Second

// Prober is a scaler.Readiness for setups without a load balancer: it dials
// every bound builder itself and calls it up when the first line the
// builder sends starts with "SSH-2.0-", the check HAProxy runs
// ("tcp-check expect ^SSH-2.0-").
//
// The prober cannot see sessions: it is not in the connection path, so
// ServerStatus.Sessions is always 0, and idle detection with a Prober rests
// on reservations alone. HAProxy's runtime API, which the product uses,
// reports the real session counts.
type Prober struct {
	timeout time.Duration

	mu    sync.Mutex
	addrs map[scaler.SlotKey]string
}

var _ scaler.Readiness = (*Prober)(nil)

// NewProber returns a Prober whose every probe (dial and first line) is
// bounded by timeout; timeout <= 0 means DefaultProbeTimeout.
func NewProber(timeout time.Duration) *Prober {
	if timeout <= 0 {
		timeout = DefaultProbeTimeout
	}
	return &Prober{timeout: timeout, addrs: map[scaler.SlotKey]string{}}
}

// Bind points key at addr (host:port); "" unbinds it.
func (p *Prober) Bind(ctx context.Context, key scaler.SlotKey, addr string) error {
	if addr != "" {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("prober: bind %s: %w", key, err)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if addr == "" {
		delete(p.addrs, key)
	} else {
		p.addrs[key] = addr
	}
	return nil
}

// Servers probes every bound address in parallel and reports each as up or
// down, with its address. Sessions is always 0 (see Prober). It fails only
// when ctx ends.
func (p *Prober) Servers(ctx context.Context) (map[scaler.SlotKey]scaler.ServerStatus, error) {
	p.mu.Lock()
	addrs := make(map[scaler.SlotKey]string, len(p.addrs))
	for k, a := range p.addrs {
		addrs[k] = a
	}
	p.mu.Unlock()

	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		out = make(map[scaler.SlotKey]scaler.ServerStatus, len(addrs))
	)
	for key, addr := range addrs {
		wg.Go(func() {
			up := p.probe(ctx, addr)
			mu.Lock()
			out[key] = scaler.ServerStatus{Addr: addr, Up: up, Healthy: up}
			mu.Unlock()
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// probe reports whether addr answers with an SSH-2.0 banner within the
// timeout. A banner cut short (no line end before the peer closed, the
// timeout or the length limit) counts by what arrived.
func (p *Prober) probe(ctx context.Context, addr string) bool {
	line, _ := ReadBanner(ctx, addr, p.timeout)
	return strings.HasPrefix(line, "SSH-2.0-")
}

// maxBanner is the most bytes RFC 4253 allows for the identification line.
const maxBanner = 255

// ReadBanner connects to addr (host:port) and returns the first line the
// server sends, the SSH identification line, without its line end. The dial
// and the read together are bounded by timeout (and ctx), and at most 255
// bytes are read (RFC 4253). When the read fails (the peer closed, the time
// or the 255 bytes ran out before a line end), the error comes with what
// arrived until then.
func ReadBanner(ctx context.Context, addr string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetReadDeadline(dl)
	}
	line, err := bufio.NewReader(io.LimitReader(c, maxBanner)).ReadString('\n')
	line = strings.TrimRight(line, "\r\n")
	if err != nil {
		return line, fmt.Errorf("read banner from %s: %w", addr, err)
	}
	return line, nil
}

package haproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// StatCmd is what each round asks HAProxy: backend and server lines (all
// proxies, types 2 backends + 4 servers, all server ids), so that one call
// gives each server's state, sessions and address, and each backend's
// queue.
const StatCmd = "show stat -1 6 -1"

// statServersCmd asks for server lines only (Quiesce reads one server).
const statServersCmd = "show stat -1 4 -1"

// Readiness is scaler.Readiness on HAProxy's runtime API: Bind writes a
// slot's builder address into its server (`set server ... addr`), Servers
// reads every pool server's address, state and sessions from one `show stat`,
// and ServersAndQueues, from the same answer, the connections each pool
// queues.
//
// What counts as queued (HAProxy 2.6.12, measured): a connection waits in a
// queue when the server it may go to is at its maxconn (max_jobs). One the
// SPOE agent sent to a slot (use-server) waits in that server's queue (qcur
// of its line); one balanced by HAProxy (no agent answer) waits in the
// backend's queue (qcur of the BACKEND line), which does not include the
// servers' queues. A pool's queued connections are the sum of the two. A
// connection in the backend's queue goes to the first server with room, a
// builder that comes up included; one in a server's queue waits for that
// server. With no server UP HAProxy queues nothing: it closes the
// connection (unless the agent holds it first, which is Held, not queued).
//
// What counts as Up (HAProxy 2.6.12, measured):
//   - status "UP" and "DRAIN"/"DRAIN (agent)" are up: HAProxy routes to the
//     server (a draining one keeps its sessions and `use-server` traffic) and
//     its check passes (a failing check shows "DOWN", not "DRAIN").
//   - "UP n/m" is up: the server is still UP and in the rotation while its
//     last checks failed and it counts down towards DOWN.
//   - "DOWN n/m" (checks passing, counting up to rise), "DOWN",
//     "DOWN (agent)", "NOLB", "MAINT", "MAINT (resolution)",
//     "MAINT (via ...)" are not up.
//   - A server leaving maintenance (agent `ready`, CLI `state ready`) is
//     shown "UP n/m" at once, before its first check ran (check_status
//     "INI"), even while it points at the placeholder. It is not reported up
//     until that first check completed, so a slot is never called ready on
//     a check that did not happen.
//   - "no check" (health checks disabled) is up: HAProxy routes to it.
//
// Readiness registers these gauges (namespace nix_builder_autoscaler):
//   - haproxy_up: 1 when the last runtime-API exchange (Servers, or Bind
//     getting an answer) succeeded, else 0; 0 before the first call.
//   - spoa_up: 1 when at least one server of backend SPOABackend is UP
//     ("UP", "UP n/m", or "no check") in the last Servers call, 0 when it
//     has servers and none is; absent when the backend does not exist or the
//     last Servers call failed (unknown is not down).
//   - haproxy_server_sessions{pool,slot}: current sessions (scur) of each
//     pool server; absent after a failed Servers call (stale numbers would
//     mislead).
//   - haproxy_queued_connections{pool}: connections queued for the pool
//     (its backend's queue and its servers'), demand the scaler counts;
//     absent after a failed Servers call.
type Readiness struct {
	c     *Client
	pools map[string]string // backend name → pool
	clock clock.Clock

	mu        sync.Mutex
	haproxyUp bool
	lastErr   string
	spoaUp    bool
	spoaKnown bool
	sessions  map[scaler.SlotKey]int
	queued    map[string]int // per pool, every pool backend HAProxy has

	placeholder string
	// bound: per slot, the address last bound and whether a check that did
	// not pass was seen since (only then is a passing check this builder's).
	bound map[scaler.SlotKey]*boundAddr
	// checkInterval is HAProxy's check inter (haproxy.check_interval): a
	// passing check older than a few intervals after a bind cannot be the
	// previous builder's.
	checkInterval time.Duration
}

type boundAddr struct {
	addr     string
	at       time.Time
	seen     bool
	verified bool
}

var (
	_ scaler.Readiness   = (*Readiness)(nil)
	_ scaler.Quiescer    = (*Readiness)(nil)
	_ scaler.QueueReader = (*Readiness)(nil)
)

// NewReadiness returns a Readiness for the given pools (their backends are
// Backend(pool)); reg, when not nil, receives its metrics.
// placeholder ("ip:port", haproxy.placeholder) is where Bind points a
// server that has no builder.
//
// HAProxy keeps a server's last check result through maintenance and shows
// it again after `set server addr`, so a slot reused for a new builder would
// look healthy before the new builder answers. A passing check counts for a
// newly bound address only after a check of it failed or ran, or after
// 3 × checkInterval.
func NewReadiness(c *Client, pools []string, placeholder string, checkInterval time.Duration, clk clock.Clock, reg prometheus.Registerer) *Readiness {
	if checkInterval <= 0 {
		checkInterval = time.Second
	}
	if clk == nil {
		clk = clock.Real{}
	}
	r := &Readiness{c: c, pools: make(map[string]string, len(pools)), placeholder: placeholder, checkInterval: checkInterval, clock: clk}
	for _, p := range pools {
		r.pools[Backend(p)] = p
	}
	if reg != nil {
		reg.MustRegister(readinessCollector{r})
	}
	return r
}

// Bind points a slot's server at addr ("ip:port"), or back at the
// placeholder when addr is "". Hostnames are
// refused: HAProxy's `set server addr` takes IP addresses, and providers
// report builder IPs.
func (r *Readiness) Bind(ctx context.Context, key scaler.SlotKey, addr string) error {
	if addr == "" {
		addr = r.placeholder
	}
	var ip string
	var port int
	{
		host, p, err := net.SplitHostPort(addr)
		if err != nil {
			return fmt.Errorf("bind %s: address %q is not ip:port: %w", key, addr, err)
		}
		if _, err := parseLiteralIP(host); err != nil {
			return fmt.Errorf("bind %s: %q is not an IP address: HAProxy servers are bound by IP (the provider reports IPs); hostnames are not accepted", key, host)
		}
		port, err = strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return fmt.Errorf("bind %s: port %q of %q is not a number in 1..65535", key, p, addr)
		}
		ip = host
	}
	err := r.c.SetServerAddr(ctx, Backend(key.Pool), key.Slot, ip, port)
	if err == nil {
		r.mu.Lock()
		if r.bound == nil {
			r.bound = map[scaler.SlotKey]*boundAddr{}
		}
		if b := r.bound[key]; b == nil || b.addr != addr {
			r.bound[key] = &boundAddr{addr: addr, at: r.clock.Now()}
		}
		r.mu.Unlock()
	}
	var cmdErr *CommandError
	switch {
	case err == nil, errors.As(err, &cmdErr):
		r.setHAProxyUp(true)
	case errors.Is(err, ErrUnreachable):
		r.setHAProxyUp(false)
	}
	if err != nil {
		return fmt.Errorf("bind %s to %s: %w", key, net.JoinHostPort(ip, strconv.Itoa(port)), err)
	}
	return nil
}

func (r *Readiness) setHAProxyUp(up bool) {
	r.mu.Lock()
	r.haproxyUp = up
	r.mu.Unlock()
}

// Servers reports every server of every pool backend: the address it points
// at ("ip:port", "[ip]:port" for IPv6, "" without one), whether it is up
// (see Readiness) and its current sessions. It costs one `show stat`; only
// a HAProxy whose `show stat` lacks the addr column (older than 2.6.12
// measured here) costs a second call, `show servers state`. A pool whose
// backend HAProxy does not have contributes no entries. It also records the
// SPOE agent backend's state for SPOAUp and the metrics.
func (r *Readiness) Servers(ctx context.Context) (map[scaler.SlotKey]scaler.ServerStatus, error) {
	out, _, err := r.ServersAndQueues(ctx)
	return out, err
}

// ServersAndQueues is Servers, and, from the same `show stat`, the
// connections queued per pool (see Readiness): only pools with a queue are
// listed.
func (r *Readiness) ServersAndQueues(ctx context.Context) (map[scaler.SlotKey]scaler.ServerStatus, map[string]int, error) {
	out, queued, spoaUp, spoaKnown, err := r.servers(ctx)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.haproxyUp, r.spoaUp, r.spoaKnown, r.sessions, r.queued = false, false, false, nil, nil
		r.lastErr = err.Error()
		return nil, nil, fmt.Errorf("haproxy servers: %w", err)
	}
	r.haproxyUp, r.spoaUp, r.spoaKnown, r.lastErr, r.queued = true, spoaUp, spoaKnown, "", queued
	r.sessions = make(map[scaler.SlotKey]int, len(out))
	for k, s := range out {
		r.sessions[k] = s.Sessions
	}
	return out, positive(queued), nil
}

// Queued returns the connections queued per pool, as the last Servers call
// read them (nil when it failed or none was made); only pools with a queue
// are listed.
func (r *Readiness) Queued() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return positive(r.queued)
}

// positive copies the entries of m above zero (nil if none).
func positive(m map[string]int) map[string]int {
	var out map[string]int
	for k, n := range m {
		if n > 0 {
			if out == nil {
				out = map[string]int{}
			}
			out[k] = n
		}
	}
	return out
}

func (r *Readiness) servers(ctx context.Context) (out map[scaler.SlotKey]scaler.ServerStatus, queued map[string]int, spoaUp, spoaKnown bool, err error) {
	stats, err := r.c.showStat(ctx, StatCmd)
	if err != nil {
		return nil, nil, false, false, err
	}
	out = map[scaler.SlotKey]scaler.ServerStatus{}
	queued = map[string]int{}
	needAddr := false
	for _, s := range stats {
		if !s.IsServer() {
			// A backend's own line: its queue, the connections balanced
			// there that wait for a server with room.
			if pool, ok := r.pools[s.Proxy()]; ok && s.Server() == "BACKEND" {
				queued[pool] += int(max(s.Int("qcur"), 0))
			}
			continue
		}
		if s.Proxy() == SPOABackend {
			spoaKnown = true
			spoaUp = spoaUp || spoaServerUp(s.Status())
		}
		pool, ok := r.pools[s.Proxy()]
		if !ok || s.Server() == "" {
			continue
		}
		if !s.Has("addr") {
			needAddr = true
		}
		key := scaler.SlotKey{Pool: pool, Slot: s.Server()}
		// Connections sent to this server (use-server) that wait for room.
		queued[pool] += int(max(s.Int("qcur"), 0))
		healthy := r.healthy(key, s)
		status := s.Status()
		out[key] = scaler.ServerStatus{
			Addr:      s.Addr(),
			Up:        serverUp(status, s.Str("check_status")) && healthy,
			Healthy:   healthy,
			Sessions:  int(max(s.Int("scur"), 0)),
			Maint:     strings.HasPrefix(status, "MAINT"),
			Drain:     strings.HasPrefix(status, "DRAIN"),
			AgentDown: status == "DOWN (agent)",
			Weight:    int(s.Int("uweight")),
		}
	}
	if needAddr && len(out) > 0 {
		if err := r.fillAddrs(ctx, out); err != nil {
			return nil, nil, false, false, err
		}
	}
	return out, queued, spoaUp, spoaKnown, nil
}

// healthy reports whether the health check of the slot's server (row s of
// show stat) passed, and, for an address bound since, whether a check of
// the new address has been seen.
func (r *Readiness) healthy(key scaler.SlotKey, s Stat) bool {
	healthy := checkPassed(s.Str("check_status"))
	r.mu.Lock()
	if b := r.bound[key]; b != nil && !b.verified {
		running := strings.HasPrefix(s.Str("check_status"), "* ")
		outOfMaint := !strings.HasPrefix(s.Status(), "MAINT")
		switch {
		case clock.Since(r.clock, b.at) >= 3*r.checkInterval:
			b.verified = true
		case outOfMaint && (!healthy || running):
			b.seen = true // a check of the new address failed or is running
		case outOfMaint && b.seen && healthy:
			b.verified = true
		}
		healthy = healthy && b.verified
	}
	r.mu.Unlock()
	return healthy
}

// fillAddrs sets the addresses of out's servers from `show servers state`,
// for a HAProxy whose show stat lacks the addr column.
func (r *Readiness) fillAddrs(ctx context.Context, out map[scaler.SlotKey]scaler.ServerStatus) error {
	states, err := r.c.ShowServersState(ctx, "")
	if err != nil {
		return fmt.Errorf("show stat has no addr column, and: %w", err)
	}
	for _, st := range states {
		pool, ok := r.pools[st.Backend()]
		if !ok {
			continue
		}
		k := scaler.SlotKey{Pool: pool, Slot: st.Server()}
		if v, ok := out[k]; ok {
			v.Addr = st.Addr()
			out[k] = v
		}
	}
	return nil
}

// serverUp decides ServerStatus.Up from show stat's status and check_status
// columns (see Readiness for the reasons).
func serverUp(status, checkStatus string) bool {
	if status == "no check" {
		return true
	}
	word, _, _ := strings.Cut(status, " ")
	if word != "UP" && word != "DRAIN" {
		return false
	}
	// "* L7OK" while a check runs; "INI" until the first check completed.
	checkStatus = strings.TrimPrefix(checkStatus, "* ")
	return !strings.HasPrefix(checkStatus, "INI")
}

// checkPassed reports whether the server's last health check (the SSH
// banner) passed, whatever the agent says: a binding slot is held DOWN by
// the agent ("ready down") while HAProxy checks it, and becomes ready when
// this turns true.
func checkPassed(checkStatus string) bool {
	switch strings.TrimPrefix(checkStatus, "* ") {
	case "L4OK", "L6OK", "L7OK":
		return true
	}
	return false
}

// Quiesce puts the slot's server in maintenance, so that neither balancing
// nor a use-server rule can send it a new connection (open ones go on), and
// then returns the sessions open on it (scur). Until the agent check has
// told HAProxy "drain", a drained slot's server is still up at full weight;
// maintenance closes that gap. HAProxy 2.6 lifts forced maintenance at the
// agent's next state answer: for a slot the daemon then terminates that
// answer is "maint"; for one it keeps draining (a session was open) it is
// "drain", weight 0, which balancing skips and the SPOE agent never picks.
func (r *Readiness) Quiesce(ctx context.Context, key scaler.SlotKey) (int, error) {
	be := Backend(key.Pool)
	if err := r.c.SetServerState(ctx, be, key.Slot, "maint"); err != nil {
		return 0, fmt.Errorf("quiesce %s: %w", key, err)
	}
	stats, err := r.c.showStat(ctx, statServersCmd)
	if err != nil {
		return 0, fmt.Errorf("quiesce %s: %w", key, err)
	}
	for _, s := range stats {
		if s.IsServer() && s.Proxy() == be && s.Server() == key.Slot {
			return int(max(s.Int("scur"), 0)), nil
		}
	}
	return 0, fmt.Errorf("quiesce %s: show stat has no server %s/%s", key, be, key.Slot)
}

// Up reports whether the last call to HAProxy succeeded, with the error
// that made it fail otherwise.
func (r *Readiness) Up() (bool, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.haproxyUp, r.lastErr
}

// spoaServerUp reports whether a SPOE agent server takes connections.
func spoaServerUp(status string) bool {
	word, _, _ := strings.Cut(status, " ")
	return word == "UP" || status == "no check"
}

// SPOAUp reports, from the last Servers call, whether a server of the SPOE
// agent backend (SPOABackend) is UP; known is false when that call failed,
// no call was made yet, or HAProxy has no such backend.
func (r *Readiness) SPOAUp() (up, known bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.spoaUp, r.spoaKnown
}

const readinessNamespace = scaler.MetricsNamespace

var (
	rdHAProxyUpDesc = prometheus.NewDesc(prometheus.BuildFQName(readinessNamespace, "", "haproxy_up"),
		"1 when the last call to HAProxy's runtime API succeeded.", nil, nil)
	rdSPOAUpDesc = prometheus.NewDesc(prometheus.BuildFQName(readinessNamespace, "", "spoa_up"),
		"1 when HAProxy reports a server of the SPOE agent backend UP, 0 when none is; absent when unknown.", nil, nil)
	rdServerSessionsDesc = prometheus.NewDesc(prometheus.BuildFQName(readinessNamespace, "", "haproxy_server_sessions"),
		"Current sessions of each pool server, as HAProxy reported them in the last successful read.", []string{"pool", "slot"}, nil)
	rdQueuedDesc = prometheus.NewDesc(prometheus.BuildFQName(readinessNamespace, "", "haproxy_queued_connections"),
		"Connections HAProxy queues for the pool (its backend's queue and its servers') because the builders are at max_jobs, in the last successful read; the scaler counts them as demand.", []string{"pool"}, nil)
)

// readinessCollector exports a consistent snapshot of the last calls, so a
// scrape never sees a half-updated set of per-server gauges.
type readinessCollector struct{ r *Readiness }

func (c readinessCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- rdHAProxyUpDesc
	ch <- rdSPOAUpDesc
	ch <- rdServerSessionsDesc
	ch <- rdQueuedDesc
}

func (c readinessCollector) Collect(ch chan<- prometheus.Metric) {
	r := c.r
	r.mu.Lock()
	defer r.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(rdHAProxyUpDesc, prometheus.GaugeValue, gaugeBool(r.haproxyUp))
	if r.spoaKnown {
		ch <- prometheus.MustNewConstMetric(rdSPOAUpDesc, prometheus.GaugeValue, gaugeBool(r.spoaUp))
	}
	for k, n := range r.sessions {
		ch <- prometheus.MustNewConstMetric(rdServerSessionsDesc, prometheus.GaugeValue, float64(n), k.Pool, k.Slot)
	}
	for p, n := range r.queued {
		ch <- prometheus.MustNewConstMetric(rdQueuedDesc, prometheus.GaugeValue, float64(n), p)
	}
}

func gaugeBool(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

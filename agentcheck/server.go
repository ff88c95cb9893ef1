// Package agentcheck answers HAProxy's agent checks for every server of every
// pool on one TCP listener (docs/design.md §3.2).
//
// Each server line carries `agent-send "<pool>/<slot>\n"`. HAProxy connects
// every agent-inter, sends that line, reads one reply line and closes. The
// reply (see Reply) sets the server's admin state, weight and maxconn: the
// agent owns them, and its next reply overrides whatever the runtime API set
// in between (`set server ... state maint`, `set weight`).
//
// What HAProxy 2.6.12 does with agent replies, measured with the real HAProxy
// in this package's tests (TestHAProxy):
//
//   - The words are read up to the first "\r" or "\n", in any order; a "#"
//     ends them and starts a description. HAProxy applies the admin word
//     (ready, drain, maint) first, then the weight ("50%" of the configured
//     weight: with `weight 100`, show stat's weight and uweight read 50) and
//     "maxconn:N" (show stat's slim), then the health word (up, down).
//   - "ready" clears MAINT set by the config keyword `disabled` or by `set
//     server ... state maint`. Agent checks keep running in MAINT; the
//     regular health check does not (check_status stays empty).
//   - "down" keeps a server DOWN while its own health check passes: status
//     reads "DOWN (agent)", check_status reads L7OK once sshd answers, and
//     check_health counts up as usual. "down" alone does not clear MAINT.
//   - "drain" gives status "DRAIN (agent)"; weight and uweight keep their
//     value. "maint" gives status "MAINT".
//   - The description after "#" is kept only when the reply has a health
//     word: show stat's last_agt then reads "via agent : up (<description>)"
//     or "via agent : down (<description>)", and agent_desc holds the
//     generic text ("Layer7 check passed", "Layer7 wrong status"). The stats
//     page shows the agent's text only for a server the agent holds DOWN (in
//     the LastChk cell's tooltip, "Layer7 wrong status: via agent : down
//     (booting i-1)"); for an UP or DRAIN server the cell shows the health
//     check's result. Without a health word ("drain #...", "maint #...")
//     HAProxy drops the description: agent_status reads CHECKED, agent_desc
//     "No status change", last_agt is empty.
//   - "0%" sets weight 0: status stays UP (the stats page shows UP and
//     weight 0/0, not DRAIN as the manual says), and load balancing sends the
//     server no new connection; with no other usable server a new connection
//     is closed at once.
//   - `use-server` ignores weight and DRAIN: a connection steered to a
//     server with weight 0 or in DRAIN is still sent to it; only DOWN and
//     MAINT servers are skipped. The SPOE agent must therefore never steer
//     to a draining slot or one with weight 0.
//   - An empty line, or a connection closed without any reply, changes
//     nothing: admin state, weight, maxconn and health stay what the last
//     reply set (agent_status reads CHECKED "No status change" for an empty
//     line, L7RSP "TCPCHK got an empty response at step 2" for no reply). An
//     agent that fails never marks a server down. Serve relies on this when
//     the fleet view is not there yet (before the daemon's first round).
package agentcheck

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/connlimit"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Limits of one agent-check exchange. HAProxy sends its agent-send line as
// soon as it connects, so these are generous; HAProxy's own check timeout
// ends the exchange on its side anyway.
const (
	// ReadTimeout bounds reading the identity line.
	ReadTimeout = 2 * time.Second
	// LookupTimeout bounds the slot lookup.
	LookupTimeout = time.Second
	// WriteTimeout bounds writing the reply.
	WriteTimeout = 2 * time.Second
	// MaxLine is the longest identity line accepted, line end included.
	MaxLine = 256
	// MaxConns bounds the connections open at once. When full, the one
	// that has waited longest without sending its identity line is closed
	// (internal/connlimit): HAProxy sends its line as soon as it connects,
	// so idle connections of another process cannot starve its checks.
	MaxConns = 256
)

// Results, the values of the result label of
// nix_builder_autoscaler_agent_checks_total.
const (
	ResultOK          = "ok"           // a slot's reply was sent
	ResultUnknown     = "unknown"      // unknown pool or slot: "maint" was sent
	ResultBadIdentity = "bad_identity" // unreadable or malformed line: "maint" was sent
	ResultError       = "error"        // the lookup failed (no fleet view yet): nothing was sent
)

// maint is the reply to every identity that names no slot.
const maint = "maint"

// busier is a connection that a full listener must not close while its
// request is answered (connlimit.Conn).
type busier interface{ Busy() }

// Slots is where the responder reads slots: the daemon passes the
// reconciler's published fleet view (scaler.Views), so a check costs a map
// lookup, never a database read. Slot returns an error
// wrapping scaler.ErrNotFound for a slot that does not exist.
type Slots interface {
	Slot(ctx context.Context, key scaler.SlotKey) (scaler.Slot, error)
}

// Server is the agent-check responder.
type Server struct {
	slots   Slots
	clock   clock.Clock
	maxJobs map[string]int
	log     *slog.Logger
	checks  *prometheus.CounterVec

	readTimeout, lookupTimeout, writeTimeout time.Duration

	// lastWarn (unix nanoseconds) limits lookup-error warnings to one per
	// warnEvery; the others are logged at debug level.
	lastWarn atomic.Int64
}

// warnEvery is the least time between two lookup-error warnings.
const warnEvery = 10 * time.Second

// New returns a responder for the pools in maxJobs (pool name → the pool's
// max_jobs, which becomes each ready server's maxconn). A pool missing from
// maxJobs is unknown: its servers are told "maint". log may be nil (no
// logging); the metrics are registered on reg unless it is nil.
func New(slots Slots, maxJobs map[string]int, log *slog.Logger, reg prometheus.Registerer, clk clock.Clock) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if clk == nil {
		clk = clock.Real{}
	}
	s := &Server{
		clock:         clk,
		slots:         slots,
		maxJobs:       maps.Clone(maxJobs),
		log:           log,
		readTimeout:   ReadTimeout,
		lookupTimeout: LookupTimeout,
		writeTimeout:  WriteTimeout,
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: scaler.MetricsNamespace,
			Name:      "agent_checks_total",
			Help:      "HAProxy agent checks answered, by result (ok, unknown, bad_identity, error).",
		}, []string{"result"}),
	}
	for _, r := range []string{ResultOK, ResultUnknown, ResultBadIdentity, ResultError} {
		s.checks.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(s.checks)
	}
	return s
}

// Serve answers agent checks on ln until ctx ends, then closes ln, waits for
// the connections in flight and returns nil. It returns an error if ln fails
// for another reason (after the same cleanup). Unless ln is a
// connlimit.Listener already (the daemon's, which it measures), Serve caps
// it at MaxConns.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if _, ok := ln.(*connlimit.Listener); !ok {
		ln = connlimit.New(ln, MaxConns)
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	var wg sync.WaitGroup
	defer wg.Wait()
	var delay time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				// Out of file descriptors and the like: back off, bounded.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("agent check: accept failed, retrying", "err", err, "in", delay)
				t := s.clock.NewTimer(delay)
				select {
				case <-t.C():
				case <-ctx.Done():
					t.Stop()
					return nil
				}
				continue
			}
			ln.Close()
			return fmt.Errorf("agent check: accept: %w", err)
		}
		delay = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.handle(ctx, conn)
		}()
	}
}

// isTemporary reports errors after which accepting again makes sense.
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// handle runs one exchange: read the identity line, answer, close.
func (s *Server) handle(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	reply, result := s.answer(ctx, conn)
	s.checks.WithLabelValues(result).Inc()
	if reply == "" {
		return
	}
	_ = conn.SetWriteDeadline(time.Now().Add(s.writeTimeout))
	if _, err := conn.Write([]byte(reply + "\n")); err != nil {
		s.log.Debug("agent check: write reply", "remote", conn.RemoteAddr(), "err", err)
	}
}

// answer returns the reply line (without "\n") and the result label; an
// empty reply means: close without answering.
func (s *Server) answer(ctx context.Context, conn net.Conn) (string, string) {
	line, err := readLine(conn, s.readTimeout)
	if err != nil {
		s.log.Debug("agent check: no identity", "remote", conn.RemoteAddr(), "err", err)
		return maint, ResultBadIdentity
	}
	// A whole line came: this connection is a check being answered, no
	// longer one a newer connection may push out.
	if b, ok := conn.(busier); ok {
		b.Busy()
	}
	key, err := scaler.ParseSlotKey(line)
	if err != nil {
		s.log.Debug("agent check: bad identity", "remote", conn.RemoteAddr(), "identity", line)
		return maint, ResultBadIdentity
	}
	maxJobs, ok := s.maxJobs[key.Pool]
	if !ok {
		s.log.Debug("agent check: unknown pool", "slot", key.String())
		return maint, ResultUnknown
	}
	lctx, cancel := context.WithTimeout(ctx, s.lookupTimeout)
	defer cancel()
	slot, err := s.slots.Slot(lctx, key)
	if errors.Is(err, scaler.ErrNotFound) {
		s.log.Debug("agent check: unknown slot", "slot", key.String())
		return maint, ResultUnknown
	}
	if err != nil {
		// Say nothing: HAProxy keeps the state of the last answer. "maint"
		// would stop every builder at once while the daemon starts, and
		// anything else might send traffic where the reconciler would not.
		s.lookupError(key, err)
		return "", ResultError
	}
	return Reply(slot, maxJobs), ResultOK
}

func (s *Server) lookupError(key scaler.SlotKey, err error) {
	now := s.clock.Now().UnixNano()
	last := s.lastWarn.Load()
	if now-last >= int64(warnEvery) && s.lastWarn.CompareAndSwap(last, now) {
		s.log.Warn("agent check: slot lookup failed; not answering, HAProxy keeps the last state",
			"slot", key.String(), "err", err)
		return
	}
	s.log.Debug("agent check: slot lookup failed", "slot", key.String(), "err", err)
}

var errLineTooLong = errors.New("identity line too long")

// readLine reads one line of at most MaxLine bytes ending in "\n" (an
// optional "\r" before it is dropped) within timeout.
func readLine(conn net.Conn, timeout time.Duration) (string, error) {
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return "", err
	}
	buf := make([]byte, MaxLine)
	n := 0
	for {
		m, err := conn.Read(buf[n:])
		if i := bytes.IndexByte(buf[n:n+m], '\n'); i >= 0 {
			return string(bytes.TrimSuffix(buf[:n+i], []byte("\r"))), nil
		}
		n += m
		if n == len(buf) {
			return "", errLineTooLong
		}
		if err != nil {
			return "", fmt.Errorf("read identity: %w (after %d bytes)", err, n)
		}
	}
}

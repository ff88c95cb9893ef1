package haproxy

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"text/template"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/spoa/wire"
)

// The SPOE wire contract with the agent (the message, its arguments, the
// variables the agent sets and the variable prefix) is package wire's
// (docs/design.md §3.3); the generated files spell those names only through
// it. The names below are the configuration's own.
//
// Each pool's SPOE scope sends one message, wire.Message, through the group
// SPOEGroup, triggered by `tcp-request content send-spoe-group`.
const SPOEGroup = "nba-steer"

// HAProxy itself sets SPOEVarError (txn.nba.err, an integer: 1 timeout,
// 256+N SPOP error N, see HAProxy's SPOE.txt) when the agent did not answer,
// and SPOEVarProcessTime (txn.nba.ptime, milliseconds the agent took, i.e.
// how long a connection was held), under wire.VarPrefix in the transaction
// scope. Both appear in the traffic log, with the agent's sess.nba.slot and
// sess.nba.verdict.
const (
	SPOEVarError       = "err"
	SPOEVarProcessTime = "ptime"
)

// PlaceholderHost is the host name written on every slot's server line. It
// is never resolved (init-addr has no libc method; .invalid is reserved), but
// a server declared by name is one whose address HAProxy 2.6 restores from
// the server-state file ("init-addr last"); a server declared by IP address
// gets only its port back from that file, not its address.
const PlaceholderHost = "slot.nba.invalid"

// Offsets of the SPOE bounds above the agent's hold (haproxy.hold), docs/design.md
// §3.3: hold < timeout processing ≤ tcp-request inspect-delay. The agent gives
// up first and answers a verdict; SPOE's own timeout is the backstop if the
// agent hangs; the inspect delay is never what cuts a connection.
const (
	ProcessingMargin = 10 * time.Second
	InspectMargin    = 20 * time.Second
)

// Fixed timeouts of the generated configuration.
const (
	// SessionTimeout is the client and server inactivity timeout of builder
	// connections: Nix holds one SSH connection per remote build, which
	// can stay silent for hours.
	SessionTimeout = 24 * time.Hour
	// SPOEIdleTimeout is SPOE's `timeout idle`.
	SPOEIdleTimeout = 2 * time.Minute
	// minSPOAServerTimeout keeps idle SPOE connections from timing out
	// before SPOE closes them itself (timeout idle).
	minSPOAServerTimeout = SPOEIdleTimeout + time.Minute
)

// Timeouts are the hold bounds derived from haproxy.hold.
type Timeouts struct {
	// Hold is the agent's own limit on holding a connection (haproxy.hold).
	Hold time.Duration
	// Processing is SPOE's `timeout processing`: Hold + ProcessingMargin.
	Processing time.Duration
	// InspectDelay is the frontend's `tcp-request inspect-delay`:
	// Hold + InspectMargin.
	InspectDelay time.Duration
	// SPOAServer is `timeout server` of the SPOA backend: above InspectDelay
	// (a held answer must not look like a dead agent) and above SPOE's
	// `timeout idle`.
	SPOAServer time.Duration
}

// HoldTimeouts derives the SPOE bounds from the agent's hold.
func HoldTimeouts(hold time.Duration) Timeouts {
	t := Timeouts{
		Hold:         hold,
		Processing:   hold + ProcessingMargin,
		InspectDelay: hold + InspectMargin,
	}
	t.SPOAServer = max(t.InspectDelay+10*time.Second, minSPOAServerTimeout)
	return t
}

// Spec is what Generate renders HAProxy's configuration from: the settings
// HAProxy and the daemon must agree on, and every pool. The daemon fills it
// from its config file; each field's comment names the config key it comes
// from, and Problems name the fields by those keys.
type Spec struct {
	// Cluster (daemon.cluster) names the cluster in the files' comments and
	// on the stats page.
	Cluster string
	// RuntimeSocket (haproxy.runtime_socket) is HAProxy's admin socket, an
	// absolute path.
	RuntimeSocket string
	// StateFile (haproxy.state_file) is HAProxy's server-state file, an
	// absolute path.
	StateFile string
	// Log (haproxy.log) is where HAProxy logs: "stdout", "stderr", a path
	// like "/dev/log" or an address like "127.0.0.1:514".
	Log string
	// Placeholder (haproxy.placeholder) is the ip:port a server without a
	// builder points at.
	Placeholder string
	// AgentListen (haproxy.agent_listen) is where the daemon's agent-check
	// responder listens (host:port).
	AgentListen string
	// SPOAListen (haproxy.spoa_listen) is where the daemon's SPOE agent
	// listens (host:port).
	SPOAListen string
	// StatsListen (haproxy.stats_listen) is where HAProxy serves its stats
	// page (host:port); "" leaves the page out.
	StatsListen string
	// Hold (haproxy.hold) is how long the SPOE agent holds a connection
	// while a builder starts; the SPOE bounds derive from it (HoldTimeouts).
	Hold time.Duration
	// CheckInterval (haproxy.check_interval) is the interval of the health
	// checks.
	CheckInterval time.Duration
	// AgentInterval (haproxy.agent_interval) is the interval of the agent
	// checks (CheckInterval when 0).
	AgentInterval time.Duration
	// Pools are the pools, in config order: pool i is named in problems as
	// "pool[i]", with its name when it has one.
	Pools []PoolSpec
}

// PoolSpec is one pool of a Spec.
type PoolSpec struct {
	// Name (name) names the pool's frontend, backend and SPOE engine.
	Name string
	// Frontend (frontend) is where HAProxy accepts the pool's SSH
	// connections (host:port).
	Frontend string
	// MaxBuilders (max_builders) is the number of slots: one server each.
	MaxBuilders int
	// MaxJobs (max_jobs) is each server's maxconn.
	MaxJobs int
}

// Problem is one thing wrong with Generate's input.
type Problem struct {
	// Key names the value, as a dotted TOML path of the daemon's config
	// file: "haproxy.hold", "pool[1] (name \"arm\").max_builders" (pools are
	// counted from 0; the name is shown when the pool has one), or "pool"
	// for the list of pools as a whole.
	Key string
	// Message says what is wrong and how to fix it.
	Message string
}

func (p Problem) String() string { return p.Key + ": " + p.Message }

// Problems is every problem found, one per line in Error.
type Problems []Problem

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Options are the inputs of Generate that are not in the config file.
type Options struct {
	// SPOEPath is the absolute path HAProxy reads the SPOE file
	// (Files.SPOEConf) from.
	SPOEPath string
}

// Files is the generated configuration.
type Files struct {
	// HAProxyCfg is haproxy.cfg.
	HAProxyCfg []byte
	// SPOEConf is the SPOE file, to be written at Options.SPOEPath.
	SPOEConf []byte
}

//go:embed templates/*.tmpl
var templateFS embed.FS

var templates = template.Must(template.New("").Funcs(template.FuncMap{
	"duration": formatDuration,
	"quoted":   quoted,
}).ParseFS(templateFS, "templates/*.tmpl"))

// Generate renders HAProxy's configuration and SPOE file for every pool of
// spec (docs/design.md §3.4). Its error lists every problem found, as
// Problems naming the config key.
func Generate(spec Spec, opts Options) (Files, error) {
	data, err := newTemplateData(spec, opts)
	if err != nil {
		return Files{}, err
	}
	var hc, sc bytes.Buffer
	if err := templates.ExecuteTemplate(&hc, "haproxy.cfg.tmpl", data); err != nil {
		return Files{}, fmt.Errorf("render haproxy.cfg: %w", err)
	}
	if err := templates.ExecuteTemplate(&sc, "spoe.conf.tmpl", data); err != nil {
		return Files{}, fmt.Errorf("render spoe file: %w", err)
	}
	return Files{HAProxyCfg: hc.Bytes(), SPOEConf: sc.Bytes()}, nil
}

// txnVar is the transaction-scope name of a variable HAProxy's SPOE filter
// sets itself under the agent's prefix: txnVar(SPOEVarError) is txn.nba.err.
func txnVar(name string) string { return "txn." + wire.VarPrefix + "." + name }

// poolKey names the i'th pool as the daemon's config problems do:
// pool[1] or, when the pool has a name, pool[1] (name "arm").
func poolKey(i int, name string) string {
	if name == "" {
		return fmt.Sprintf("pool[%d]", i)
	}
	return fmt.Sprintf("pool[%d] (name %q)", i, name)
}

// splitAddr splits host:port and checks the port.
func splitAddr(addr string) (host, port string, err error) {
	host, port, err = net.SplitHostPort(addr)
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			return "", "", fmt.Errorf("%q is not host:port (%s)", addr, ae.Err)
		}
		return "", "", fmt.Errorf("%q is not host:port", addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return "", "", fmt.Errorf("port %q in %q is not a number from 1 to 65535", port, addr)
	}
	if host != "" && !safeWord.MatchString(host) {
		return "", "", fmt.Errorf("host %q in %q cannot be written into HAProxy's config", host, addr)
	}
	return host, port, nil
}

// dialAddr is where HAProxy connects to reach a daemon listener at addr: a
// wildcard host (listen on all addresses) is reached on loopback.
func dialAddr(addr string) (host, port string, err error) {
	host, port, err = splitAddr(addr)
	if err != nil {
		return "", "", err
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return host, port, nil
}

func wildcard(host string) bool { return host == "" || host == "0.0.0.0" || host == "::" }

// overlaps reports whether listeners on a and b would take the same port.
func overlaps(a, b string) bool {
	ha, pa, err := net.SplitHostPort(a)
	if err != nil {
		return false
	}
	hb, pb, err := net.SplitHostPort(b)
	if err != nil {
		return false
	}
	return pa == pb && (ha == hb || wildcard(ha) || wildcard(hb))
}

// formatDuration writes d in HAProxy's time format with the largest exact
// unit ("190s", "2m", "24h", "1500ms"); below a millisecond rounds up.
func formatDuration(d time.Duration) string {
	switch {
	case d <= 0:
		return "0"
	case d%time.Hour == 0:
		return strconv.FormatInt(int64(d/time.Hour), 10) + "h"
	case d%time.Minute == 0:
		return strconv.FormatInt(int64(d/time.Minute), 10) + "m"
	case d%time.Second == 0:
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	ms := (d + time.Millisecond - 1) / time.Millisecond
	return strconv.FormatInt(int64(ms), 10) + "ms"
}

// goDuration writes d as the config file does: a Go duration without
// trailing zero units ("5m", not "5m0s").
func goDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// quoted is s in HAProxy's weak (double) quotes.
func quoted(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, `$`, `\$`)
	return `"` + r.Replace(s) + `"`
}

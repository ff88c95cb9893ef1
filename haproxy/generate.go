package haproxy

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"text/template"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
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
	// and agent checks.
	CheckInterval time.Duration
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

// templateData is everything the templates print. Durations are written by
// the template function "duration" (formatDuration).
type templateData struct {
	Cluster       string
	Log           string // the global log line after "log"
	RuntimeSocket string
	StateFile     string
	SPOEPath      string

	Timeouts         Timeouts
	ProcessingMargin time.Duration
	InspectMargin    time.Duration
	Session          time.Duration // timeout client/server
	SPOEIdle         time.Duration
	CheckInterval    time.Duration

	AgentAddr string // agent-addr: where the agent-check responder is reached
	AgentPort string
	SPOAAddr  string // host:port of the SPOE agent, as a server address
	StatsBind string // "" leaves the stats page out
	Pools     []poolData

	SPOABackend string
	VarPrefix   string
	Message     string
	Group       string
	// Full variable names, for haproxy.cfg.
	VarSlot    string // sess.nba.slot
	VarVerdict string // sess.nba.verdict
	VarError   string // txn.nba.err
	VarPTime   string // txn.nba.ptime
	// Bare variable names, for the SPOE file and the log labels.
	NameSlot, NameVerdict, NameError, NamePTime string
	Reject                                      string
	Args                                        argNames
}

type argNames struct {
	Pool, Src, Sport, Backend, Queue, BeConn, NbSrv, ID string
}

type poolData struct {
	Name        string
	Frontend    string // bind address
	Backend     string // nba_<pool>: the frontend and the backend
	Engine      string // nba-<pool>
	MaxJobs     int
	Weight      int
	Slots       []string // slot1..slotN
	Host        string   // PlaceholderHost
	Port        int      // PlaceholderPort
	Placeholder string
	InitAddr    string
}

var (
	// safeName is what a pool name may be to appear in HAProxy's files
	// unquoted (the daemon's config allows a subset).
	safeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	// safeWord is what a path or log target may be to appear unquoted.
	safeWord = regexp.MustCompile(`^[A-Za-z0-9_./:@+=,%\[\]-]+$`)
)

func newTemplateData(h Spec, opts Options) (*templateData, error) {
	var ps Problems
	add := func(key, format string, args ...any) {
		ps = append(ps, Problem{Key: key, Message: fmt.Sprintf(format, args...)})
	}
	phHost, phPortText, phErr := net.SplitHostPort(h.Placeholder)
	phPort, perr := strconv.Atoi(phPortText)
	if phErr != nil || perr != nil {
		add("haproxy.placeholder", "%q is not ip:port; write it like \"192.0.2.1:22\"", h.Placeholder)
	}
	phIP := phHost
	d := &templateData{
		Cluster:          h.Cluster,
		RuntimeSocket:    h.RuntimeSocket,
		StateFile:        h.StateFile,
		SPOEPath:         opts.SPOEPath,
		Timeouts:         HoldTimeouts(h.Hold),
		ProcessingMargin: ProcessingMargin,
		InspectMargin:    InspectMargin,
		Session:          SessionTimeout,
		SPOEIdle:         SPOEIdleTimeout,
		CheckInterval:    h.CheckInterval,
		SPOABackend:      SPOABackend,
		VarPrefix:        wire.VarPrefix,
		Message:          wire.Message,
		Group:            SPOEGroup,
		VarSlot:          wire.SessionVar(wire.VarSlot),
		VarVerdict:       wire.SessionVar(wire.VarVerdict),
		VarError:         txnVar(SPOEVarError),
		VarPTime:         txnVar(SPOEVarProcessTime),
		NameSlot:         wire.VarSlot,
		NameVerdict:      wire.VarVerdict,
		NameError:        SPOEVarError,
		NamePTime:        SPOEVarProcessTime,
		Reject:           wire.VerdictReject,
		Args: argNames{
			Pool: wire.ArgPool, Src: wire.ArgSrc, Sport: wire.ArgSport, Backend: wire.ArgBackend,
			Queue: wire.ArgQueue, BeConn: wire.ArgBeConn, NbSrv: wire.ArgNbSrv, ID: wire.ArgID,
		},
	}

	if !safeWord.MatchString(d.Cluster) {
		add("daemon.cluster", "%q cannot be written into HAProxy's config; use letters, digits and '-'", d.Cluster)
	}
	switch {
	case h.RuntimeSocket == "":
		add("haproxy.runtime_socket", `is required to generate HAProxy's config: it is HAProxy's admin socket, which the daemon uses; set it, like "/run/haproxy/admin.sock"`)
	case !filepath.IsAbs(h.RuntimeSocket) || !safeWord.MatchString(h.RuntimeSocket):
		add("haproxy.runtime_socket", "%q must be an absolute path without spaces, quotes, '#', '$' or '\\'", h.RuntimeSocket)
	}
	switch {
	case h.StateFile == "":
		add("haproxy.state_file", `is required; HAProxy keeps slot addresses across reloads there; like "/var/lib/haproxy/nix-builder-autoscaler.state"`)
	case !filepath.IsAbs(h.StateFile) || !safeWord.MatchString(h.StateFile):
		add("haproxy.state_file", "%q must be an absolute path without spaces, quotes, '#', '$' or '\\'", h.StateFile)
	}
	switch {
	case opts.SPOEPath == "":
		ps = append(ps, Problem{Key: "SPOE file path", Message: "is required: the absolute path HAProxy reads the SPOE file from"})
	case !filepath.IsAbs(opts.SPOEPath) || !safeWord.MatchString(opts.SPOEPath):
		ps = append(ps, Problem{Key: "SPOE file path", Message: fmt.Sprintf("%q must be an absolute path without spaces, quotes, '#', '$' or '\\'", opts.SPOEPath)})
	}

	switch h.Log {
	case "":
		add("haproxy.log", `is required; "/dev/log" for syslog, or "stdout" when HAProxy runs in the foreground`)
	case "stdout", "stderr":
		d.Log = h.Log + " format raw local0 info"
	default:
		if !safeWord.MatchString(h.Log) {
			add("haproxy.log", "%q cannot be written into HAProxy's config; give a path like \"/dev/log\" or an address like \"127.0.0.1:514\"", h.Log)
		}
		d.Log = h.Log + " local0 info"
	}

	if h.Hold <= 0 {
		add("haproxy.hold", "must be more than zero: the SPOE agent holds a connection that long while a builder starts; like \"3m\"")
	} else if t := d.Timeouts; !(t.Hold < t.Processing && t.Processing <= t.InspectDelay && t.InspectDelay < SessionTimeout) {
		add("haproxy.hold", "%s is too long: hold < SPOE timeout processing (%s) <= tcp-request inspect-delay (%s) < timeout client (%s) must hold; lower it",
			goDuration(h.Hold), formatDuration(t.Processing), formatDuration(t.InspectDelay), formatDuration(SessionTimeout))
	}
	if h.CheckInterval <= 0 {
		add("haproxy.check_interval", `must be more than zero; like "1s"`)
	}

	var err error
	if d.AgentAddr, d.AgentPort, err = dialAddr(h.AgentListen); err != nil {
		add("haproxy.agent_listen", "%v; HAProxy's agent checks connect there; write it like \"127.0.0.1:5555\"", err)
	}
	if host, port, err := dialAddr(h.SPOAListen); err != nil {
		add("haproxy.spoa_listen", "%v; HAProxy's SPOE connects there; write it like \"127.0.0.1:12345\"", err)
	} else {
		d.SPOAAddr = net.JoinHostPort(host, port)
	}
	if h.StatsListen != "" {
		if _, _, err := splitAddr(h.StatsListen); err != nil {
			add("haproxy.stats_listen", "%v; write it like \"127.0.0.1:8404\", or \"\" for no stats page", err)
		} else {
			d.StatsBind = h.StatsListen
		}
	}

	if len(h.Pools) == 0 {
		add("pool", "at least one [[pool]] is required")
	}
	type bound struct{ key, addr string }
	var binds []bound
	if d.StatsBind != "" {
		binds = append(binds, bound{"haproxy.stats_listen", d.StatsBind})
	}
	for i, p := range h.Pools {
		key := poolKey(i, p.Name)
		if !safeName.MatchString(p.Name) {
			add(key+".name", "%q cannot be an HAProxy proxy name; use letters, digits, '_' and '-'", p.Name)
		}
		if p.MaxBuilders < 1 {
			add(key+".max_builders", "must be at least 1: each builder is one HAProxy server")
		}
		if p.MaxJobs < 1 {
			add(key+".max_jobs", "must be at least 1: it is each server's maxconn")
		}
		switch _, _, err := splitAddr(p.Frontend); {
		case p.Frontend == "":
			add(key+".frontend", `is required to generate HAProxy's config: it is where HAProxy accepts this pool's SSH connections; like "0.0.0.0:2222"`)
		case err != nil:
			add(key+".frontend", "%v; write it like \"0.0.0.0:2222\"", err)
		default:
			for _, b := range binds {
				if overlaps(b.addr, p.Frontend) {
					add(key+".frontend", "%q overlaps %s (%q); give each its own port", p.Frontend, b.key, b.addr)
				}
			}
			for _, l := range []bound{{"haproxy.agent_listen", h.AgentListen}, {"haproxy.spoa_listen", h.SPOAListen}} {
				if overlaps(l.addr, p.Frontend) {
					add(key+".frontend", "%q overlaps %s (%q), where the daemon listens; give each its own port", p.Frontend, l.key, l.addr)
				}
			}
			binds = append(binds, bound{key + ".frontend", p.Frontend})
		}
		pd := poolData{
			Name:        p.Name,
			Frontend:    p.Frontend,
			Backend:     Backend(p.Name),
			Engine:      Engine(p.Name),
			MaxJobs:     p.MaxJobs,
			Weight:      scaler.DefaultWeight,
			Host:        PlaceholderHost,
			Placeholder: phIP,
			Port:        phPort,
			InitAddr:    "last," + phIP,
		}
		for n := 1; n <= p.MaxBuilders; n++ {
			pd.Slots = append(pd.Slots, "slot"+strconv.Itoa(n))
		}
		d.Pools = append(d.Pools, pd)
	}
	if d.StatsBind != "" {
		for _, l := range []bound{{"haproxy.agent_listen", h.AgentListen}, {"haproxy.spoa_listen", h.SPOAListen}} {
			if overlaps(l.addr, d.StatsBind) {
				add("haproxy.stats_listen", "%q overlaps %s (%q), where the daemon listens; give each its own port", d.StatsBind, l.key, l.addr)
			}
		}
	}
	if len(ps) > 0 {
		return nil, ps
	}
	return d, nil
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

package haproxy

import (
	"cmp"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/spoa/wire"
)

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
	AgentInterval    time.Duration

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
	phIP, phPort := parsePlaceholder(&ps, h.Placeholder)
	d := baseTemplateData(h, opts)
	checkPaths(&ps, h, opts)
	d.Log = logLine(&ps, h.Log)
	checkTimeouts(&ps, h, d.Timeouts)
	setListeners(&ps, d, h)
	setPools(&ps, d, h, phIP, phPort)
	if len(ps) > 0 {
		return nil, ps
	}
	return d, nil
}

// add appends a problem with key and a formatted message.
func (ps *Problems) add(key, format string, args ...any) {
	*ps = append(*ps, Problem{Key: key, Message: fmt.Sprintf(format, args...)})
}

// parsePlaceholder splits haproxy.placeholder into the IP and port written on
// every slot's server line.
func parsePlaceholder(ps *Problems, placeholder string) (ip string, port int) {
	phHost, phPortText, phErr := net.SplitHostPort(placeholder)
	phPort, perr := strconv.Atoi(phPortText)
	if phErr != nil || perr != nil {
		ps.add("haproxy.placeholder", "%q is not ip:port; write it like \"192.0.2.1:22\"", placeholder)
	}
	return phHost, phPort
}

// baseTemplateData is the template data that is copied from h, opts and the
// SPOE wire contract without checks.
func baseTemplateData(h Spec, opts Options) *templateData {
	return &templateData{
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
		AgentInterval:    cmp.Or(h.AgentInterval, h.CheckInterval),
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
}

// checkPaths checks the cluster name and the paths written into HAProxy's
// files.
func checkPaths(ps *Problems, h Spec, opts Options) {
	if !safeWord.MatchString(h.Cluster) {
		ps.add("daemon.cluster", "%q cannot be written into HAProxy's config; use letters, digits and '-'", h.Cluster)
	}
	switch {
	case h.RuntimeSocket == "":
		ps.add("haproxy.runtime_socket", `is required to generate HAProxy's config: it is HAProxy's admin socket, which the daemon uses; set it, like "/run/haproxy/admin.sock"`)
	case !filepath.IsAbs(h.RuntimeSocket) || !safeWord.MatchString(h.RuntimeSocket):
		ps.add("haproxy.runtime_socket", "%q must be an absolute path without spaces, quotes, '#', '$' or '\\'", h.RuntimeSocket)
	}
	switch {
	case h.StateFile == "":
		ps.add("haproxy.state_file", `is required; HAProxy keeps slot addresses across reloads there; like "/var/lib/haproxy/nix-builder-autoscaler.state"`)
	case !filepath.IsAbs(h.StateFile) || !safeWord.MatchString(h.StateFile):
		ps.add("haproxy.state_file", "%q must be an absolute path without spaces, quotes, '#', '$' or '\\'", h.StateFile)
	}
	switch {
	case opts.SPOEPath == "":
		*ps = append(*ps, Problem{Key: "SPOE file path", Message: "is required: the absolute path HAProxy reads the SPOE file from"})
	case !filepath.IsAbs(opts.SPOEPath) || !safeWord.MatchString(opts.SPOEPath):
		*ps = append(*ps, Problem{Key: "SPOE file path", Message: fmt.Sprintf("%q must be an absolute path without spaces, quotes, '#', '$' or '\\'", opts.SPOEPath)})
	}
}

// logLine is the global log line after "log" for haproxy.log.
func logLine(ps *Problems, log string) string {
	switch log {
	case "":
		ps.add("haproxy.log", `is required; "/dev/log" for syslog, or "stdout" when HAProxy runs in the foreground`)
		return ""
	case "stdout", "stderr":
		return log + " format raw local0 info"
	default:
		if !safeWord.MatchString(log) {
			ps.add("haproxy.log", "%q cannot be written into HAProxy's config; give a path like \"/dev/log\" or an address like \"127.0.0.1:514\"", log)
		}
		return log + " local0 info"
	}
}

// checkTimeouts checks haproxy.hold against the SPOE bounds t derived from
// it, and haproxy.check_interval.
func checkTimeouts(ps *Problems, h Spec, t Timeouts) {
	if h.Hold <= 0 {
		ps.add("haproxy.hold", "must be more than zero: the SPOE agent holds a connection that long while a builder starts; like \"3m\"")
	} else if !(t.Hold < t.Processing && t.Processing <= t.InspectDelay && t.InspectDelay < SessionTimeout) {
		ps.add("haproxy.hold", "%s is too long: hold < SPOE timeout processing (%s) <= tcp-request inspect-delay (%s) < timeout client (%s) must hold; lower it",
			goDuration(h.Hold), formatDuration(t.Processing), formatDuration(t.InspectDelay), formatDuration(SessionTimeout))
	}
	if h.CheckInterval <= 0 {
		ps.add("haproxy.check_interval", `must be more than zero; like "1s"`)
	}
}

// setListeners sets where HAProxy reaches the daemon's agent-check responder
// and SPOE agent, and where it serves its stats page.
func setListeners(ps *Problems, d *templateData, h Spec) {
	var err error
	if d.AgentAddr, d.AgentPort, err = dialAddr(h.AgentListen); err != nil {
		ps.add("haproxy.agent_listen", "%v; HAProxy's agent checks connect there; write it like \"127.0.0.1:5555\"", err)
	}
	if host, port, err := dialAddr(h.SPOAListen); err != nil {
		ps.add("haproxy.spoa_listen", "%v; HAProxy's SPOE connects there; write it like \"127.0.0.1:12345\"", err)
	} else {
		d.SPOAAddr = net.JoinHostPort(host, port)
	}
	if h.StatsListen != "" {
		if _, _, err := splitAddr(h.StatsListen); err != nil {
			ps.add("haproxy.stats_listen", "%v; write it like \"127.0.0.1:8404\", or \"\" for no stats page", err)
		} else {
			d.StatsBind = h.StatsListen
		}
	}
}

// listenAddr is an address HAProxy or the daemon listens on, with the config key
// that sets it.
type listenAddr struct{ key, addr string }

// daemonListeners are the addresses the daemon listens on for HAProxy.
func daemonListeners(h Spec) []listenAddr {
	return []listenAddr{{"haproxy.agent_listen", h.AgentListen}, {"haproxy.spoa_listen", h.SPOAListen}}
}

// setPools checks every pool and adds its data to d; no two of HAProxy's
// and the daemon's listeners may share a port.
func setPools(ps *Problems, d *templateData, h Spec, phIP string, phPort int) {
	if len(h.Pools) == 0 {
		ps.add("pool", "at least one [[pool]] is required")
	}
	var binds []listenAddr
	if d.StatsBind != "" {
		binds = append(binds, listenAddr{"haproxy.stats_listen", d.StatsBind})
	}
	for i, p := range h.Pools {
		key := poolKey(i, p.Name)
		checkPool(ps, key, p)
		binds = checkFrontend(ps, key, p.Frontend, h, binds)
		d.Pools = append(d.Pools, newPoolData(p, phIP, phPort))
	}
	if d.StatsBind != "" {
		for _, l := range daemonListeners(h) {
			if overlaps(l.addr, d.StatsBind) {
				ps.add("haproxy.stats_listen", "%q overlaps %s (%q), where the daemon listens; give each its own port", d.StatsBind, l.key, l.addr)
			}
		}
	}
}

// checkPool checks the pool's name and sizes; key names the pool.
func checkPool(ps *Problems, key string, p PoolSpec) {
	if !safeName.MatchString(p.Name) {
		ps.add(key+".name", "%q cannot be an HAProxy proxy name; use letters, digits, '_' and '-'", p.Name)
	}
	if p.MaxBuilders < 1 {
		ps.add(key+".max_builders", "must be at least 1: each builder is one HAProxy server")
	}
	if p.MaxJobs < 1 {
		ps.add(key+".max_jobs", "must be at least 1: it is each server's maxconn")
	}
}

// checkFrontend checks a pool's frontend address against the listeners bound
// so far (binds) and the daemon's, and returns binds with it added when it
// is valid.
func checkFrontend(ps *Problems, key, frontend string, h Spec, binds []listenAddr) []listenAddr {
	switch _, _, err := splitAddr(frontend); {
	case frontend == "":
		ps.add(key+".frontend", `is required to generate HAProxy's config: it is where HAProxy accepts this pool's SSH connections; like "0.0.0.0:2222"`)
	case err != nil:
		ps.add(key+".frontend", "%v; write it like \"0.0.0.0:2222\"", err)
	default:
		for _, b := range binds {
			if overlaps(b.addr, frontend) {
				ps.add(key+".frontend", "%q overlaps %s (%q); give each its own port", frontend, b.key, b.addr)
			}
		}
		for _, l := range daemonListeners(h) {
			if overlaps(l.addr, frontend) {
				ps.add(key+".frontend", "%q overlaps %s (%q), where the daemon listens; give each its own port", frontend, l.key, l.addr)
			}
		}
		binds = append(binds, listenAddr{key + ".frontend", frontend})
	}
	return binds
}

// newPoolData is the template data of pool p, whose slots point at the
// placeholder phIP:phPort.
func newPoolData(p PoolSpec, phIP string, phPort int) poolData {
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
	return pd
}

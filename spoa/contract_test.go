package spoa

import (
	"bufio"
	"bytes"
	"log/slog"
	"maps"
	"net"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/negasus/haproxy-spoe-go/action"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/spoa/wire"
)

// TestGeneratedConfigAgreesWithAgent generates HAProxy's configuration and
// SPOE file, reads the SPOE contract out of the generated text (the message
// each frontend sends and its arguments, the variables HAProxy reads back)
// and drives the agent's real NOTIFY handler with exactly that message: the
// agent must answer it, use the arguments it needs by the names HAProxy
// sends, and set exactly the variables HAProxy reads, in the scope HAProxy
// reads them from.
func TestGeneratedConfigAgreesWithAgent(t *testing.T) {
	pools := []string{"x86", "arm"}
	spec := haproxy.Spec{
		Cluster:       "contract",
		RuntimeSocket: "/run/haproxy/admin.sock",
		StateFile:     "/var/lib/haproxy/nba.state",
		Log:           "stdout",
		Placeholder:   "192.0.2.1:22",
		AgentListen:   "127.0.0.1:5555",
		SPOAListen:    "127.0.0.1:12345",
		Hold:          time.Minute,
		CheckInterval: time.Second,
	}
	maxJobs := map[string]int{}
	for i, p := range pools {
		spec.Pools = append(spec.Pools, haproxy.PoolSpec{Name: p, Frontend: "0.0.0.0:" + []string{"2222", "2223"}[i], MaxBuilders: 2, MaxJobs: 2})
		maxJobs[p] = 2
	}
	files, err := haproxy.Generate(spec, haproxy.Options{SPOEPath: "/etc/haproxy/nba-spoe.conf"})
	if err != nil {
		t.Fatal(err)
	}
	scopes := parseSPOEFile(t, files.SPOEConf)
	cfg := parseHAProxyCfg(t, files.HAProxyCfg)

	// Variables HAProxy's SPOE filter sets itself (set-on-error,
	// set-process-time, always in the transaction scope); every other
	// variable of the prefix that haproxy.cfg reads is the agent's.
	prefixes := map[string]bool{}
	own := map[string]bool{}
	for _, sc := range scopes {
		prefixes[sc.varPrefix] = true
		for _, n := range []string{sc.setOnError, sc.setProcessTime} {
			if n != "" {
				own["txn."+sc.varPrefix+"."+n] = true
			}
		}
	}
	if len(prefixes) != 1 {
		t.Fatalf("SPOE scopes use var-prefixes %v, want one", prefixes)
	}
	readByHAProxy := map[string]bool{}
	for v := range cfg.varRefs {
		if !own[v] {
			readByHAProxy[v] = true
		}
	}
	setByAgent := map[string]bool{}

	for _, pool := range pools {
		t.Run(pool, func(t *testing.T) {
			fe, ok := cfg.frontends[haproxy.Backend(pool)]
			if !ok {
				t.Fatalf("haproxy.cfg has no frontend %s", haproxy.Backend(pool))
			}
			sc, ok := scopes[fe.engine]
			if !ok {
				t.Fatalf("frontend's SPOE engine %q has no [%s] scope in the SPOE file", fe.engine, fe.engine)
			}
			// The messages HAProxy sends on a connection: those of the
			// groups the frontend sends (its agent must list each group),
			// and those the agent lists that have an event.
			var sent []string
			for _, g := range fe.groups {
				if g.engine != fe.engine {
					t.Errorf("frontend sends group %s of engine %s, but its filter is engine %s", g.group, g.engine, fe.engine)
				}
				if !slices.Contains(sc.agentGroups, g.group) {
					t.Errorf("frontend sends group %s, which the SPOE agent of %s does not list (groups %v)", g.group, fe.engine, sc.agentGroups)
				}
				msgs, ok := sc.groups[g.group]
				if !ok {
					t.Fatalf("SPOE scope %s has no spoe-group %s", fe.engine, g.group)
				}
				sent = append(sent, msgs...)
			}
			for _, m := range sc.agentMessages {
				if sc.messages[m].event != "" {
					sent = append(sent, m)
				}
			}
			if len(sent) != 1 {
				t.Fatalf("a connection to frontend %s sends SPOE messages %v, want exactly one", fe.name, sent)
			}
			msg, ok := sc.messages[sent[0]]
			if !ok {
				t.Fatalf("SPOE scope %s has no spoe-message %s", fe.engine, sent[0])
			}
			var argNames []string
			for _, a := range msg.args {
				argNames = append(argNames, a.name)
			}
			if !slices.Equal(argNames, wire.Args) {
				t.Errorf("spoe-message %s args %v, want wire.Args %v", msg.name, argNames, wire.Args)
			}

			// Values as HAProxy encodes them: strings, the client
			// address as an IP, integers as int64 (SMP_T_SINT).
			const (
				queue  = 3
				beConn = 5
				nbSrv  = 7
				sport  = 40001
			)
			values := map[string]any{}
			for _, a := range msg.args {
				switch {
				case strings.HasPrefix(a.expr, "str(") && strings.HasSuffix(a.expr, ")"):
					values[a.name] = strings.TrimSuffix(strings.TrimPrefix(a.expr, "str("), ")")
				case a.expr == "src":
					values[a.name] = net.IPv4(127, 0, 0, 1).To4()
				case a.expr == "src_port":
					values[a.name] = int64(sport)
				case a.expr == "queue("+fe.backend+")":
					values[a.name] = int64(queue)
				case a.expr == "be_conn("+fe.backend+")":
					values[a.name] = int64(beConn)
				case a.expr == "nbsrv("+fe.backend+")":
					values[a.name] = int64(nbSrv)
				case a.expr == "uuid()":
					values[a.name] = "0f8fad5b-d9cb-469f-a165-70867728950e"
				default:
					t.Fatalf("spoe-message %s sends %s=%s, which this test cannot stand in for; teach it", msg.name, a.name, a.expr)
				}
			}
			notify := func() *request.Request {
				req, m := newRequest(msg.name)
				for _, a := range msg.args {
					m.KV.Add(a.name, values[a.name])
				}
				return req
			}
			// answer runs the agent's NOTIFY handler on one message and
			// returns the variables it set, as HAProxy names them.
			answer := func(a *Agent) map[string]any {
				req := notify()
				a.handle(req)
				set := map[string]any{}
				for _, act := range req.Actions {
					if act.Type != action.TypeSetVar {
						t.Errorf("agent answered with action type %d, want only set-var", act.Type)
						continue
					}
					name := haproxyScope(t, act.Scope) + "." + sc.varPrefix + "." + act.Name
					set[name] = act.Value
					setByAgent[name] = true
				}
				return set
			}

			// A slot is ready: the agent answers the variable the backend's
			// use-server reads, registered with the SPOE agent.
			var logs bytes.Buffer
			reg := prometheus.NewRegistry()
			a := New(Options{MaxJobs: maxJobs, Hold: time.Millisecond, Registerer: reg,
				Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			a.Update(viewOf(observed([]scaler.Slot{{Pool: pool, Name: "slot1", State: scaler.Ready, Weight: 100, Address: "10.0.0.1:22"}}, nil)))
			be, ok := cfg.backends[fe.backend]
			if !ok || be.useServerVar == "" {
				t.Fatalf("haproxy.cfg backend %s has no use-server %%[var(...)]", fe.backend)
			}
			if got := answer(a); len(got) != 1 || got[be.useServerVar] != "slot1" {
				t.Errorf("agent set %v for a connection to a pool with a ready slot; want only %s=slot1 (use-server of backend %s)", got, be.useServerVar, be.name)
			}
			// The arguments the agent reads for its metrics arrive under
			// the names HAProxy sends.
			for _, g := range []struct {
				name string
				vec  *prometheus.GaugeVec
				want float64
			}{{"queue", a.m.queue, queue}, {"be_conn", a.m.beConn, beConn}, {"nbsrv", a.m.nbSrv, nbSrv}} {
				var m dto.Metric
				if err := g.vec.WithLabelValues(pool).Write(&m); err != nil {
					t.Fatal(err)
				}
				if got := m.GetGauge().GetValue(); got != g.want {
					t.Errorf("agent's %s gauge = %v after a message carrying %v; the agent does not read the argument HAProxy sends it in", g.name, got, g.want)
				}
			}

			// No builder comes up within the hold: the agent answers the
			// verdict the frontend rejects on, and logs the client address
			// and port from the message.
			a.Update(viewOf(observed(nil, nil)))
			if got := answer(a); len(got) != 1 || fe.rejectVar == "" || got[fe.rejectVar] != fe.rejectValue {
				t.Errorf("agent set %v when no builder came up; want only %s=%s (frontend %s's reject rule)", got, fe.rejectVar, fe.rejectValue, fe.name)
			}
			if want := "client=127.0.0.1:40001"; !strings.Contains(logs.String(), want) {
				t.Errorf("agent's rejection log lacks %s (the src and sport arguments):\n%s", want, logs.String())
			}

			// Every variable the agent may set is registered with its SPOE
			// agent (register-var-names), and nothing else is.
			var registered []string
			for v := range readByHAProxy {
				registered = append(registered, strings.TrimPrefix(v[strings.Index(v, ".")+1:], sc.varPrefix+"."))
			}
			slices.Sort(registered)
			got := slices.Sorted(slices.Values(sc.registerVarNames))
			if !slices.Equal(got, registered) {
				t.Errorf("SPOE agent of %s registers %v; haproxy.cfg reads the agent's variables %v", fe.engine, got, registered)
			}
		})
	}

	if !maps.Equal(setByAgent, readByHAProxy) {
		t.Errorf("the agent sets %v; haproxy.cfg reads the agent's variables %v (and HAProxy's own %v)",
			slices.Sorted(maps.Keys(setByAgent)), slices.Sorted(maps.Keys(readByHAProxy)), slices.Sorted(maps.Keys(own)))
	}
}

// haproxyScope is HAProxy's name of a variable scope of SPOP.
func haproxyScope(t *testing.T, s action.Scope) string {
	switch s {
	case action.ScopeProcess:
		return "proc"
	case action.ScopeSession:
		return "sess"
	case action.ScopeTransaction:
		return "txn"
	case action.ScopeRequest:
		return "req"
	case action.ScopeResponse:
		return "res"
	}
	t.Fatalf("unknown SPOP variable scope %d", s)
	return ""
}

type spoeArg struct{ name, expr string }

type spoeMessage struct {
	name  string
	args  []spoeArg
	event string
}

// spoeScope is one [engine] section of an SPOE file.
type spoeScope struct {
	agentGroups, agentMessages []string
	varPrefix                  string
	setOnError, setProcessTime string
	registerVarNames           []string
	messages                   map[string]*spoeMessage
	groups                     map[string][]string
}

// parseSPOEFile reads the parts of an SPOE file the contract is made of.
func parseSPOEFile(t *testing.T, conf []byte) map[string]*spoeScope {
	t.Helper()
	scopes := map[string]*spoeScope{}
	var sc *spoeScope
	var section, name string
	sc0 := bufio.NewScanner(bytes.NewReader(conf))
	for n := 1; sc0.Scan(); n++ {
		line := strings.TrimSpace(sc0.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			sc = &spoeScope{messages: map[string]*spoeMessage{}, groups: map[string][]string{}}
			scopes[line[1:len(line)-1]] = sc
			section = ""
			continue
		}
		f := strings.Fields(line)
		if sc == nil {
			t.Fatalf("SPOE file line %d outside a scope: %s", n, line)
		}
		switch f[0] {
		case "spoe-agent", "spoe-message", "spoe-group":
			if len(f) != 2 {
				t.Fatalf("SPOE file line %d: %s", n, line)
			}
			section, name = f[0], f[1]
			switch section {
			case "spoe-message":
				sc.messages[name] = &spoeMessage{name: name}
			case "spoe-group":
				sc.groups[name] = nil
			}
			continue
		}
		switch section + " " + f[0] {
		case "spoe-agent groups":
			sc.agentGroups = append(sc.agentGroups, f[1:]...)
		case "spoe-agent messages":
			sc.agentMessages = append(sc.agentMessages, f[1:]...)
		case "spoe-agent register-var-names":
			sc.registerVarNames = append(sc.registerVarNames, f[1:]...)
		case "spoe-agent option":
			if len(f) == 3 {
				switch f[1] {
				case "var-prefix":
					sc.varPrefix = f[2]
				case "set-on-error":
					sc.setOnError = f[2]
				case "set-process-time":
					sc.setProcessTime = f[2]
				}
			}
		case "spoe-message args":
			for _, a := range f[1:] {
				k, v, ok := strings.Cut(a, "=")
				if !ok {
					t.Fatalf("SPOE file line %d: argument %q is not name=expression", n, a)
				}
				sc.messages[name].args = append(sc.messages[name].args, spoeArg{k, v})
			}
		case "spoe-message event":
			sc.messages[name].event = strings.Join(f[1:], " ")
		case "spoe-group messages":
			sc.groups[name] = append(sc.groups[name], f[1:]...)
		}
	}
	if len(scopes) == 0 {
		t.Fatal("SPOE file has no scope")
	}
	return scopes
}

type cfgFrontend struct {
	name, engine, backend  string
	groups                 []struct{ engine, group string }
	rejectVar, rejectValue string
}

type cfgBackend struct{ name, useServerVar string }

type haproxyCfg struct {
	frontends map[string]*cfgFrontend
	backends  map[string]*cfgBackend
	varRefs   map[string]bool // every var(...) read anywhere
}

var (
	varRef       = regexp.MustCompile(`var\(([^),]+)\)`)
	sendGroup    = regexp.MustCompile(`^tcp-request content send-spoe-group (\S+) (\S+)`)
	rejectOnVar  = regexp.MustCompile(`^tcp-request content reject if \{ var\(([^)]+)\) -m str (\S+) \}$`)
	useServerVar = regexp.MustCompile(`^use-server %\[var\(([^)]+)\)\] if \{ var\(([^)]+)\) -m found \}$`)
)

// parseHAProxyCfg reads the parts of haproxy.cfg that use the SPOE contract.
func parseHAProxyCfg(t *testing.T, cfg []byte) haproxyCfg {
	t.Helper()
	c := haproxyCfg{frontends: map[string]*cfgFrontend{}, backends: map[string]*cfgBackend{}, varRefs: map[string]bool{}}
	var fe *cfgFrontend
	var be *cfgBackend
	s := bufio.NewScanner(bytes.NewReader(cfg))
	for n := 1; s.Scan(); n++ {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		for _, m := range varRef.FindAllStringSubmatch(line, -1) {
			c.varRefs[m[1]] = true
		}
		f := strings.Fields(line)
		switch f[0] {
		case "global", "defaults", "frontend", "backend", "listen":
			fe, be = nil, nil
			switch f[0] {
			case "frontend":
				fe = &cfgFrontend{name: f[1]}
				c.frontends[f[1]] = fe
			case "backend":
				be = &cfgBackend{name: f[1]}
				c.backends[f[1]] = be
			}
			continue
		}
		switch {
		case fe != nil && len(f) >= 4 && f[0] == "filter" && f[1] == "spoe" && f[2] == "engine":
			fe.engine = f[3]
		case fe != nil && f[0] == "default_backend":
			fe.backend = f[1]
		case fe != nil && sendGroup.MatchString(line):
			m := sendGroup.FindStringSubmatch(line)
			fe.groups = append(fe.groups, struct{ engine, group string }{m[1], m[2]})
		case fe != nil && rejectOnVar.MatchString(line):
			m := rejectOnVar.FindStringSubmatch(line)
			fe.rejectVar, fe.rejectValue = m[1], m[2]
		case be != nil && useServerVar.MatchString(line):
			m := useServerVar.FindStringSubmatch(line)
			if m[1] != m[2] {
				t.Errorf("haproxy.cfg line %d uses server %s if %s is found", n, m[1], m[2])
			}
			be.useServerVar = m[1]
		}
	}
	return c
}

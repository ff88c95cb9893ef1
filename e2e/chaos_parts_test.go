package e2e

// The fault injectors and stand-ins of the chaos test (chaos_test.go):
//
//   - ec2Proxy sits between the daemon and moto_server. It forwards the
//     EC2 Query API, answers some requests itself with the errors EC2 gives
//     under pressure (RequestLimitExceeded, InsufficientInstanceCapacity),
//     can hold a RunInstances or TerminateInstances answer that moto already
//     carried out so the daemon can be killed at exactly that point, and
//     tells the builder farm which instances exist.
//   - builderFarm plays the instances' hosts: an SSH-banner server per
//     instance on its own loopback address, announced on a fake tailnet
//     (discoverytest) under the name the daemon looks for. It records which
//     client sessions are open on which instance.
//   - flakyPort is a TCP forwarder in front of the daemon's SPOA and
//     agent-check listeners that can refuse connections for a while.
//
// moto, HAProxy, the daemon binary and the AWS SDK are the real ones; these
// parts only add faults and hosts moto cannot produce.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery/discoverytest"
)

// EC2 actions the proxy treats specially.
const (
	actRun       = "RunInstances"
	actTerminate = "TerminateInstances"
)

// ec2Proxy forwards the EC2 Query API to moto, injecting faults.
type ec2Proxy struct {
	t      testing.TB
	target string
	srv    *httptest.Server
	client *http.Client

	// onLaunched is told the ids of instances RunInstances created.
	onLaunched func(ids []string)
	// beforeTerminate is told the ids of a TerminateInstances request
	// before moto carries it out (where the chaos test checks that none
	// of them is busy); afterTerminate once moto did.
	beforeTerminate, afterTerminate func(ids []string)

	mu sync.Mutex
	// rng decides background faults.
	rng *rand.Rand
	// Background fault rates, per request.
	throttleRate, capacityRate float64
	// Fault windows: every request throttled with rate 0.7 / every
	// RunInstances out of capacity until these times.
	throttleUntil, outageUntil time.Time
	// trap, when set, holds the next successful answer to its action.
	trap *trap
	// Counters: injected faults by code, calls by action.
	injected map[string]int
	calls    map[string]int
	// inflight counts requests being handled: after a kill the test waits
	// for moto to finish what the dead daemon asked.
	inflight atomic.Int64
}

// trap holds one answer of action that moto already carried out: fired is
// closed when it caught one, and the answer is dropped once release is
// closed (the daemon that asked is dead by then).
type trap struct {
	action  string
	fired   chan struct{}
	release chan struct{}
}

func newEC2Proxy(t testing.TB, target string, seed uint64) *ec2Proxy {
	p := &ec2Proxy{t: t, target: strings.TrimRight(target, "/"), client: &http.Client{Timeout: 30 * time.Second},
		rng: rand.New(rand.NewPCG(seed, 0xec2)), injected: map[string]int{}, calls: map[string]int{}}
	p.srv = httptest.NewServer(p)
	t.Cleanup(p.close)
	return p
}

func (p *ec2Proxy) URL() string { return p.srv.URL }

func (p *ec2Proxy) close() {
	p.mu.Lock()
	if tr := p.trap; tr != nil {
		p.trap = nil
		select {
		case <-tr.release:
		default:
			close(tr.release)
		}
	}
	p.mu.Unlock()
	p.srv.Close()
}

// setRates sets the background fault rates.
func (p *ec2Proxy) setRates(throttle, capacity float64) {
	p.mu.Lock()
	p.throttleRate, p.capacityRate = throttle, capacity
	p.mu.Unlock()
}

// throttleFor makes most requests fail with RequestLimitExceeded for d.
func (p *ec2Proxy) throttleFor(d time.Duration) {
	p.mu.Lock()
	p.throttleUntil = time.Now().Add(d)
	p.mu.Unlock()
}

// outageFor makes every RunInstances fail with InsufficientInstanceCapacity
// for d: no offering of any type in any zone has capacity.
func (p *ec2Proxy) outageFor(d time.Duration) {
	p.mu.Lock()
	p.outageUntil = time.Now().Add(d)
	p.mu.Unlock()
}

// setTrap arms a trap for the next successful answer to action.
func (p *ec2Proxy) setTrap(action string) *trap {
	tr := &trap{action: action, fired: make(chan struct{}), release: make(chan struct{})}
	p.mu.Lock()
	p.trap = tr
	p.mu.Unlock()
	return tr
}

// disarm removes tr if it has not fired, and lets a held answer go.
func (p *ec2Proxy) disarm(tr *trap) {
	p.mu.Lock()
	if p.trap == tr {
		p.trap = nil
	}
	p.mu.Unlock()
	select {
	case <-tr.release:
	default:
		close(tr.release)
	}
}

// counts returns copies of the counters.
func (p *ec2Proxy) counts() (injected, calls map[string]int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	injected, calls = map[string]int{}, map[string]int{}
	for k, v := range p.injected {
		injected[k] = v
	}
	for k, v := range p.calls {
		calls[k] = v
	}
	return injected, calls
}

// fault decides whether to fail a request of action, and with what.
func (p *ec2Proxy) fault(action string) (code string, status int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	rate := p.throttleRate
	if now.Before(p.throttleUntil) {
		rate = 0.7
	}
	if p.rng.Float64() < rate {
		p.injected["RequestLimitExceeded"]++
		return "RequestLimitExceeded", http.StatusServiceUnavailable
	}
	if action == actRun && (now.Before(p.outageUntil) || p.rng.Float64() < p.capacityRate) {
		p.injected["InsufficientInstanceCapacity"]++
		return "InsufficientInstanceCapacity", http.StatusInternalServerError
	}
	return "", 0
}

func (p *ec2Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.inflight.Add(1)
	defer p.inflight.Add(-1)
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	form, _ := url.ParseQuery(string(body))
	action := form.Get("Action")
	p.mu.Lock()
	p.calls[action]++
	p.mu.Unlock()

	if code, status := p.fault(action); code != "" {
		w.Header().Set("Content-Type", "text/xml")
		w.WriteHeader(status)
		fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>%s</Code><Message>injected by the chaos test</Message></Error></Errors><RequestID>chaos</RequestID></Response>`, code)
		return
	}
	var ids []string
	if action == actTerminate {
		for k, v := range form {
			if strings.HasPrefix(k, "InstanceId.") {
				ids = append(ids, v...)
			}
		}
		slices.Sort(ids)
		if p.beforeTerminate != nil {
			p.beforeTerminate(ids)
		}
	}

	// Not the caller's context: a daemon killed mid-call must not stop
	// moto's answer from reaching the farm (moto carries the call out
	// anyway).
	req, err := http.NewRequestWithContext(context.WithoutCancel(r.Context()), r.Method, p.target+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	for k, v := range r.Header {
		req.Header[k] = v
	}
	resp, err := p.client.Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	out, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	ok := resp.StatusCode == http.StatusOK
	switch {
	case ok && action == actRun && p.onLaunched != nil:
		p.onLaunched(instanceIDs(out))
	case ok && action == actTerminate && p.afterTerminate != nil:
		p.afterTerminate(ids)
	}
	if ok {
		p.mu.Lock()
		tr := p.trap
		if tr != nil && tr.action == action {
			p.trap = nil
		} else {
			tr = nil
		}
		p.mu.Unlock()
		if tr != nil {
			// Moto did it; the daemon never hears so.
			close(tr.fired)
			<-tr.release
			panic(http.ErrAbortHandler)
		}
	}
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = w.Write(out)
}

var instanceIDRE = regexp.MustCompile(`<instanceId>(i-[0-9a-f]+)</instanceId>`)

// instanceIDs are the instance ids in a RunInstances answer.
func instanceIDs(xml []byte) []string {
	var ids []string
	for _, m := range instanceIDRE.FindAllSubmatch(xml, -1) {
		if id := string(m[1]); !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	return ids
}

// builderFarm runs a stand-in host per instance: an SSH-banner server on a
// loopback address of its own (127.77.x.y, all on one port), announced on
// the fake tailnet as nix-builder-<instance id>.
type builderFarm struct {
	port int
	ts   *discoverytest.LocalAPI
	rng  *rand.Rand

	mu      sync.Mutex
	next    int
	hosts   map[string]*fakeHost
	gone    map[string]bool // instances whose host was stopped: never started again
	started int
}

type fakeHost struct {
	id, ip string
	ln     net.Listener
	// conns maps each open connection to the session id the client sent
	// ("" until it sent one; HAProxy's health checks never do).
	conns map[net.Conn]string
}

// sessionPrefix starts the identification line a chaos client sends after
// the banner; the session id follows.
const sessionPrefix = "SSH-2.0-chaos-session-"

func newBuilderFarm(t testing.TB, port int, seed uint64) *builderFarm {
	f := &builderFarm{port: port, ts: discoverytest.Start(t), rng: rand.New(rand.NewPCG(seed, 0xfa)),
		hosts: map[string]*fakeHost{}, gone: map[string]bool{}}
	t.Cleanup(f.stopAll)
	return f
}

// launched boots hosts for new instances after a short random delay, the
// way an instance takes a while to show up on the tailnet.
func (f *builderFarm) launched(ids []string) {
	for _, id := range ids {
		f.mu.Lock()
		d := time.Duration(50+f.rng.IntN(400)) * time.Millisecond
		f.mu.Unlock()
		time.AfterFunc(d, func() { f.start(id) })
	}
}

func (f *builderFarm) start(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gone[id] || f.hosts[id] != nil {
		return
	}
	f.next++
	ip := fmt.Sprintf("127.77.%d.%d", f.next/250, f.next%250+1)
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(f.port)))
	if err != nil {
		// The instance never comes up: the daemon's boot timeout covers it.
		return
	}
	h := &fakeHost{id: id, ip: ip, ln: ln, conns: map[net.Conn]string{}}
	f.hosts[id] = h
	f.started++
	go f.serve(h)
	f.publishLocked()
}

func (f *builderFarm) serve(h *fakeHost) {
	for {
		c, err := h.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		if f.hosts[h.id] != h {
			f.mu.Unlock()
			c.Close()
			return
		}
		h.conns[c] = ""
		f.mu.Unlock()
		go f.session(h, c)
	}
}

func (f *builderFarm) session(h *fakeHost, c net.Conn) {
	defer func() {
		f.mu.Lock()
		delete(h.conns, c)
		f.mu.Unlock()
		c.Close()
	}()
	if _, err := fmt.Fprintf(c, "SSH-2.0-OpenSSH_9.9 chaos-%s\r\n", h.id); err != nil {
		return
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return
	}
	if sid, ok := strings.CutPrefix(strings.TrimSpace(line), sessionPrefix); ok {
		f.mu.Lock()
		h.conns[c] = sid
		f.mu.Unlock()
	}
	_, _ = io.Copy(io.Discard, c)
}

// sessions returns the session ids open on instance id.
func (f *builderFarm) sessions(id string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := f.hosts[id]
	if h == nil {
		return nil
	}
	var out []string
	for _, sid := range h.conns {
		if sid != "" {
			out = append(out, sid)
		}
	}
	return out
}

// stop takes instance id's host down for good: off the tailnet, listener
// and connections closed.
func (f *builderFarm) stop(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gone[id] = true
	h := f.hosts[id]
	if h == nil {
		return
	}
	delete(f.hosts, id)
	h.ln.Close()
	for c := range h.conns {
		c.Close()
	}
	f.publishLocked()
}

// running returns the ids of instances whose host is up.
func (f *builderFarm) running() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for id := range f.hosts {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

func (f *builderFarm) stopAll() {
	for _, id := range f.running() {
		f.stop(id)
	}
}

func (f *builderFarm) publishLocked() {
	peers := make([]discoverytest.Peer, 0, len(f.hosts))
	for _, h := range f.hosts {
		peers = append(peers, discoverytest.NewPeer("n"+h.id, "nix-builder-"+h.id, h.ip, true))
	}
	f.ts.SetPeers(peers...)
}

// flakyPort forwards a loopback TCP port to target and can refuse
// connections for a while, as a daemon listener that is down would: while
// refusing, it resets every connection at once. It keeps its listener open
// throughout, so nothing else can take the port meanwhile.
type flakyPort struct {
	addr, target string
	ln           net.Listener

	mu       sync.Mutex
	refusing bool
	conns    map[net.Conn]bool
}

func newFlakyPort(t testing.TB, addr, target string) *flakyPort {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("flaky port %s: %v", addr, err)
	}
	f := &flakyPort{addr: addr, target: target, ln: ln, conns: map[net.Conn]bool{}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			refusing := f.refusing
			f.mu.Unlock()
			if refusing {
				if tc, ok := c.(*net.TCPConn); ok {
					_ = tc.SetLinger(0) // RST, as a closed port answers
				}
				c.Close()
				continue
			}
			go f.forward(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		f.refuse()
	})
	return f
}

func (f *flakyPort) forward(c net.Conn) {
	up, err := net.DialTimeout("tcp", f.target, 2*time.Second)
	if err != nil {
		c.Close()
		return
	}
	f.mu.Lock()
	if f.refusing {
		f.mu.Unlock()
		c.Close()
		up.Close()
		return
	}
	f.conns[c], f.conns[up] = true, true
	f.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	<-done
	f.mu.Lock()
	delete(f.conns, c)
	delete(f.conns, up)
	f.mu.Unlock()
}

// refuse resets new connections and closes every forwarded one until
// reopen.
func (f *flakyPort) refuse() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refusing = true
	for c := range f.conns {
		c.Close()
	}
}

// reopen forwards connections again.
func (f *flakyPort) reopen() {
	f.mu.Lock()
	f.refusing = false
	f.mu.Unlock()
}

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/syncbuf"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// A real tailnet: headscale (the open-source control server) on a bridge
// the test creates, a tailscaled for the daemon's own node, and one
// tailscaled per builder inside the builder's network namespace. The
// daemon runs in-process with the real discovery (discovery.Wrap over a
// provider that boots builders into the tailnet) and a real HAProxy.
// docs/tailscale.md describes it; scripts/tailnet-tools builds the tools.

// Addresses of the test's tailnet. The tailnet prefix stays clear of
// 100.64.0.0/16, which e2e/nixbuilder gives its network-namespace builders
// on the host's main table at the same time.
const (
	tnHostIP    = "10.213.0.1" // the bridge, on the host: headscale listens here
	tnNetPrefix = "10.213.0."  // builders' bridge addresses: .10, .11, ...
	tnTailnetV4 = "100.77.0.0/16"
)

// tailnetTools returns the directory holding tailscaled, tailscale and
// headscale; the test fails when they are not built.
func tailnetTools(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root: creates network namespaces, a bridge and a kernel TUN interface (scripts/test runs as root)")
	}
	if dir := os.Getenv("NBA_TAILNET_TOOLS"); dir != "" {
		return dir
	}
	out, err := exec.Command("../scripts/tailnet-tools", "--check").Output()
	if err != nil {
		var ee *exec.ExitError
		msg := err.Error()
		if errors.As(err, &ee) {
			msg = strings.TrimSpace(string(ee.Stderr))
		}
		t.Fatalf("tailscaled, tailscale and headscale are not built: run scripts/tailnet-tools (scripts/test does): %s", msg)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

// tnProc is a process the test started, stopped by its PID in cleanup.
type tnProc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	log  *syncbuf.Buffer
}

// tnStart starts argv with its output in a buffer shown if the test fails,
// and stops it (SIGTERM, then SIGKILL) when the test ends.
func tnStart(t *testing.T, name string, env []string, argv ...string) *tnProc {
	t.Helper()
	p := &tnProc{name: name, cmd: exec.Command(argv[0], argv[1:]...), done: make(chan struct{}), log: &syncbuf.Buffer{}}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			out := p.log.String()
			if len(out) > 20000 {
				out = "[...]\n" + out[len(out)-20000:]
			}
			t.Logf("%s (pid %d) output:\n%s", name, p.cmd.Process.Pid, out)
		}
	})
	return p
}

// stop sends SIGTERM to the process (by its PID) and SIGKILL if it has not
// exited 10 s later; idempotent.
func (p *tnProc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

func (p *tnProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// run runs a command bounded by testwait.Bound (a hang guard) and returns
// its standard output; it fails the test with its output on error.
func tnRun(t *testing.T, argv ...string) string {
	t.Helper()
	out, err := tnTry(argv...)
	if err != nil {
		t.Fatalf("%s: %v", strings.Join(argv, " "), err)
	}
	return out
}

func tnTry(argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s%s", err, stderr.String(), stdout.String())
	}
	return stdout.String(), nil
}

// tailnet is the running control server and the network around it.
type tailnet struct {
	t        *testing.T
	tools    string
	dir      string
	tok      string // makes interface and namespace names unique to this run
	bridge   string
	url      string // headscale's server_url
	hsConfig string
	authKey  string
	apiKey   string
}

func tnToken(t *testing.T) string {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// startTailnet creates the bridge, starts headscale on it and makes a
// user, a reusable pre-auth key and an API key.
func startTailnet(t *testing.T, tools string) *tailnet {
	t.Helper()
	tn := &tailnet{t: t, tools: tools, dir: daemontest.ShortDir(t), tok: tnToken(t)}
	tn.bridge = "tnbr" + tn.tok
	tnRun(t, "ip", "link", "add", tn.bridge, "type", "bridge")
	t.Cleanup(func() { _, _ = tnTry("ip", "link", "del", tn.bridge) })
	tnRun(t, "ip", "addr", "add", tnHostIP+"/24", "dev", tn.bridge)
	tnRun(t, "ip", "link", "set", tn.bridge, "up")

	port := haproxytest.FreePort(t)
	tn.url = fmt.Sprintf("http://%s:%d", tnHostIP, port)
	tn.hsConfig = filepath.Join(tn.dir, "headscale.yaml")
	cfg := fmt.Sprintf(`server_url: %[1]s
listen_addr: %[2]s:%[3]d
metrics_listen_addr: 127.0.0.1:%[4]d
grpc_listen_addr: 127.0.0.1:%[5]d
grpc_allow_insecure: false
noise:
  private_key_path: %[6]s/noise_private.key
prefixes:
  v4: %[7]s
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: true
    region_id: 999
    region_code: test
    region_name: test
    stun_listen_addr: %[2]s:%[8]d
    private_key_path: %[6]s/derp_server_private.key
    automatically_add_embedded_derp_region: true
    ipv4: %[2]s
  urls: []
  paths: []
  auto_update_enabled: false
disable_check_updates: true
ephemeral_node_inactivity_timeout: 30m
database:
  type: sqlite
  sqlite:
    path: %[6]s/db.sqlite
log:
  level: info
policy:
  mode: file
  path: ""
dns:
  magic_dns: false
  base_domain: tailnet.test
  override_local_dns: false
unix_socket: %[6]s/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
`, tn.url, tnHostIP, port, haproxytest.FreePort(t), haproxytest.FreePort(t), tn.dir, tnTailnetV4, haproxytest.FreePort(t))
	if err := os.WriteFile(tn.hsConfig, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	hs := tnStart(t, "headscale", nil, filepath.Join(tools, "headscale"), "serve", "--config", tn.hsConfig)
	testwait.Until(t, "headscale answering on "+tn.url, func() bool {
		if hs.exited() {
			t.Fatalf("headscale exited:\n%s", hs.log.String())
		}
		resp, err := http.Get(tn.url + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	tn.headscale("users", "create", "nba")
	var users []struct {
		ID   json.Number `json:"id"`
		Name string      `json:"name"`
	}
	tn.headscaleJSON(&users, "users", "list")
	if len(users) != 1 {
		t.Fatalf("headscale users list: %+v, want the one user", users)
	}
	var key struct {
		Key string `json:"key"`
	}
	tn.headscaleJSON(&key, "preauthkeys", "create", "--user", users[0].ID.String(), "--reusable", "--expiration", "1h")
	if key.Key == "" {
		t.Fatal("headscale preauthkeys create printed no key")
	}
	tn.authKey = key.Key
	lines := strings.Split(strings.TrimSpace(tn.headscale("apikeys", "create", "--expiration", "1h")), "\n")
	tn.apiKey = strings.TrimSpace(lines[len(lines)-1])
	return tn
}

func (tn *tailnet) headscale(args ...string) string {
	tn.t.Helper()
	return tnRun(tn.t, append([]string{filepath.Join(tn.tools, "headscale"), "--config", tn.hsConfig}, args...)...)
}

func (tn *tailnet) headscaleJSON(v any, args ...string) {
	tn.t.Helper()
	out := tn.headscale(append(args, "--output", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		tn.t.Fatalf("headscale %s: %v in %q", strings.Join(args, " "), err, out)
	}
}

// tsNode is one tailscaled joined to the tailnet.
type tsNode struct {
	socket string
	proc   *tnProc
	netns  string // "" in the host's namespace
}

// join starts tailscaled with kernel TUN interface tun (in netns unless it
// is empty) and brings it up as hostname.
func (tn *tailnet) join(t *testing.T, netns, tun, hostname string) *tsNode {
	t.Helper()
	dir := filepath.Join(tn.dir, hostname)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	n := &tsNode{socket: filepath.Join(dir, "ts.sock"), netns: netns}
	argv := []string{filepath.Join(tn.tools, "tailscaled"), "--state=" + filepath.Join(dir, "state"),
		"--statedir=" + dir, "--socket=" + n.socket, "--tun=" + tun, "--port=0", "--no-logs-no-support"}
	if netns != "" {
		argv = append([]string{"ip", "netns", "exec", netns}, argv...)
	}
	n.proc = tnStart(t, "tailscaled "+hostname, nil, argv...)
	t.Cleanup(func() {
		// tailscaled removes its interface, routes and rules when it
		// stops; --cleanup removes what a killed one left.
		n.proc.stop()
		cl := []string{filepath.Join(tn.tools, "tailscaled"), "--cleanup", "--tun=" + tun, "--socket=" + n.socket}
		if netns != "" {
			cl = append([]string{"ip", "netns", "exec", netns}, cl...)
		}
		_, _ = tnTry(cl...)
	})
	testwait.Until(t, "tailscaled "+hostname+" LocalAPI socket", func() bool {
		if n.proc.exited() {
			t.Fatalf("tailscaled %s exited:\n%s", hostname, n.proc.log.String())
		}
		_, err := os.Stat(n.socket)
		return err == nil
	})
	up := []string{filepath.Join(tn.tools, "tailscale"), "--socket=" + n.socket, "up", "--login-server=" + tn.url,
		"--authkey=" + tn.authKey, "--hostname=" + hostname, "--accept-dns=false", "--netfilter-mode=off", "--timeout=90s"}
	tnRun(t, up...)
	return n
}

// ipv4 is the node's own tailnet IPv4 address.
func (n *tsNode) ipv4(t *testing.T) string {
	t.Helper()
	st, err := discovery.NewLocalAPI(n.socket).Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ip, ok := st.Self.IPv4()
	if !ok {
		t.Fatalf("node has no IPv4 address: %+v", st.Self)
	}
	return ip.String()
}

// tnProvider is a provider whose builders are network namespaces: Launch
// returns a running instance at once and, in the background, boots it:
// creates its namespace and veth pair on the bridge, joins the tailnet
// from inside with kernel TUN under the host name discovery expects, and
// starts a stand-in builder (an SSH banner) on port 22 of its tailnet
// address. Like EC2 with Tailscale discovery, it never reports an
// Address: discovery has to find it on the tailnet.
type tnProvider struct {
	t    *testing.T
	tn   *tailnet
	name func(scaler.Instance) (string, error) // discovery's host name

	mu       sync.Mutex
	n        int
	inst     map[string]*scaler.Instance
	builders map[string]*tnBuilder
	wg       sync.WaitGroup
}

type tnBuilder struct {
	netns   string
	node    *tsNode
	standin *tnProc
	ip      string
}

func (p *tnProvider) Launch(_ context.Context, req scaler.LaunchRequest) (scaler.Instance, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n++
	in := scaler.Instance{ID: fmt.Sprintf("tn%d", p.n), Pool: req.Pool, Slot: req.Slot, LaunchID: req.LaunchID,
		State: scaler.InstanceRunning, LaunchedAt: time.Now()}
	p.inst[in.ID] = &in
	n := p.n
	p.wg.Go(func() { p.boot(in, n) })
	return in, nil
}

// boot brings builder in up; failures are test errors (its goroutine may
// not call Fatal).
func (p *tnProvider) boot(in scaler.Instance, n int) {
	t := p.t
	name, err := p.name(in)
	if err != nil {
		t.Errorf("host name of %s: %v", in.ID, err)
		return
	}
	b := &tnBuilder{netns: fmt.Sprintf("tnb%s-%d", p.tn.tok, n)}
	hostVeth, nsVeth := fmt.Sprintf("tnv%s%d", p.tn.tok, n), fmt.Sprintf("tnp%s%d", p.tn.tok, n)
	steps := [][]string{
		{"ip", "netns", "add", b.netns},
		{"ip", "link", "add", hostVeth, "type", "veth", "peer", "name", nsVeth},
		{"ip", "link", "set", nsVeth, "netns", b.netns},
		{"ip", "link", "set", hostVeth, "master", p.tn.bridge, "up"},
		{"ip", "-n", b.netns, "addr", "add", tnNetPrefix + strconv.Itoa(9+n) + "/24", "dev", nsVeth},
		{"ip", "-n", b.netns, "link", "set", nsVeth, "up"},
		{"ip", "-n", b.netns, "link", "set", "lo", "up"},
	}
	p.mu.Lock()
	p.builders[in.ID] = b
	p.mu.Unlock()
	for _, s := range steps {
		if _, err := tnTry(s...); err != nil {
			t.Errorf("builder %s: %s: %v", in.ID, strings.Join(s, " "), err)
			return
		}
	}
	// join calls Fatal on failure, which a goroutine may not: run it so
	// that a failure ends only this goroutine, then report it.
	ok := false
	func() {
		defer func() {
			if !ok {
				t.Errorf("builder %s did not join the tailnet (see the tailscaled output)", in.ID)
			}
		}()
		node := p.tn.join(t, b.netns, "tailscale0", name)
		ip := node.ipv4(t)
		p.mu.Lock()
		b.node, b.ip = node, ip
		p.mu.Unlock()
		ok = true
	}()
	if !ok {
		return
	}
	// The stand-in builder: this test binary as the local provider's
	// builder, inside the namespace, on the builder's tailnet address.
	standin := tnStart(t, "stand-in "+in.ID, []string{daemontest.EnvBuilder + "=1"},
		"ip", "netns", "exec", b.netns, os.Args[0], "--listen", net.JoinHostPort(b.ip, "22"), "--marker", in.ID)
	p.mu.Lock()
	b.standin = standin
	p.mu.Unlock()
}

func (p *tnProvider) Terminate(_ context.Context, id string) error {
	p.mu.Lock()
	in, ok := p.inst[id]
	b := p.builders[id]
	if ok {
		in.State = scaler.InstanceTerminated
	}
	p.mu.Unlock()
	if b != nil && b.standin != nil {
		b.standin.stop()
	}
	return nil
}

func (p *tnProvider) List(context.Context) ([]scaler.Instance, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []scaler.Instance
	for _, in := range p.inst {
		out = append(out, *in)
	}
	return out, nil
}

// cleanup waits for the boots and deletes the namespaces (their veth
// pairs go with them); the processes are stopped by their own cleanups,
// which run before this one.
func (p *tnProvider) cleanup() {
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, b := range p.builders {
		_, _ = tnTry("ip", "netns", "del", b.netns)
	}
}

// TestTailnetDiscoveryThroughHAProxy: a builder joins a real tailnet
// (headscale) from its own network namespace; the daemon finds its tailnet
// address through the LocalAPI of its own node, binds it into a real
// HAProxy, and a connection through HAProxy's frontend reaches the
// builder's SSH banner over the tailnet (WireGuard between the host's
// tailscaled and the builder's).
func TestTailnetDiscoveryThroughHAProxy(t *testing.T) {
	tools := tailnetTools(t)
	tn := startTailnet(t, tools)
	// The daemon's node, in the host's namespace with a kernel TUN
	// interface, so that HAProxy on the host reaches builders' tailnet
	// addresses.
	self := tn.join(t, "", "tnd"+tn.tok, "nba-daemon")
	t.Logf("daemon's node: %s", self.ipv4(t))

	opts := discovery.Options{
		Pools:    map[string]discovery.PoolSource{"x86": {Source: discovery.SourceTailscale}},
		LocalAPI: discovery.NewLocalAPI(self.socket),
		Cluster:  "tailnet",
	}
	prov := &tnProvider{t: t, tn: tn, inst: map[string]*scaler.Instance{}, builders: map[string]*tnBuilder{}}
	var wrapped *discovery.Provider
	// Set before the builder is terminated (tnDeleteDevice).
	var deleteDevice func(context.Context, string) error
	opts.DeleteDevice = func(ctx context.Context, id string) error {
		if deleteDevice == nil {
			return errors.New("no device deletion in this part of the test")
		}
		return deleteDevice(ctx, id)
	}
	prov.name = func(in scaler.Instance) (string, error) { return wrapped.Hostname(in) }
	t.Cleanup(prov.cleanup) // runs after the daemon's and the processes' cleanups
	s := startStackWith(t, "max_builders = 1", "10s", func(o *daemon.Options) {
		opts.Logger = o.Logger
		wrapped = discovery.Wrap(prov, opts)
		o.Providers = map[string]scaler.Provider{"x86": wrapped}
	})

	r := s.reserve("tailnet-1")
	st := s.stat(r.Slot)
	host, port, err := net.SplitHostPort(st["addr"])
	if err != nil {
		t.Fatalf("HAProxy server %s addr %q: %v", r.Slot, st["addr"], err)
	}
	_, tailnetNet, _ := net.ParseCIDR(tnTailnetV4)
	if ip := net.ParseIP(host); ip == nil || !tailnetNet.Contains(ip) || port != "22" {
		t.Fatalf("HAProxy server %s points at %s, want the builder's tailnet address (in %s) port 22", r.Slot, st["addr"], tnTailnetV4)
	}
	prov.mu.Lock()
	var b *tnBuilder
	for _, x := range prov.builders {
		b = x
	}
	prov.mu.Unlock()
	if b == nil || b.ip != host {
		t.Fatalf("HAProxy points at %s; the builder's node has %+v", host, b)
	}
	_, banner, err := s.dial()
	if err != nil || banner != "SSH-2.0-nba_standin" {
		t.Fatalf("through HAProxy: banner %q, %v; want the stand-in's", banner, err)
	}
	t.Logf("reached the builder at %s over the tailnet through HAProxy's frontend %s", st["addr"], s.frontend)

	tnDeleteDevice(t, tn, s, self, wrapped, &deleteDevice, r.InstanceID, host)
}

// tnDeleteDevice checks device deletion against headscale for the builder
// (instance id, tailnet address ip): the daemon's Tailscale API client
// deletes nothing there (headscale answers Tailscale's device path with
// 404, which the client takes for "already gone"); discovery's Terminate,
// given a DeleteDevice that speaks headscale's own API, deletes the node
// whose ID it read from the daemon node's LocalAPI.
func tnDeleteDevice(t *testing.T, tn *tailnet, s *stack, self *tsNode, wrapped *discovery.Provider, deleteDevice *func(context.Context, string) error, instance, ip string) {
	t.Helper()
	st, err := discovery.NewLocalAPI(self.socket).Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var id string
	for _, peer := range st.Peer {
		if a, ok := peer.IPv4(); ok && a.String() == ip {
			id = peer.ID
		}
	}
	if id == "" {
		t.Fatalf("no peer with address %s in the daemon node's status", ip)
	}
	nodes := func() map[string]bool {
		var list []struct {
			ID json.Number `json:"id"`
		}
		tn.headscaleJSON(&list, "nodes", "list")
		m := map[string]bool{}
		for _, n := range list {
			m[n.ID.String()] = true
		}
		return m
	}
	if !nodes()[id] {
		t.Fatalf("the builder's stable node ID %q (from the LocalAPI) is not a headscale node ID: %v", id, nodes())
	}

	// Tailscale's API, as the daemon's client calls it.
	status := tnHTTP(t, http.MethodDelete, tn.url+"/api/v2/device/"+id, tn.apiKey)
	err = discovery.NewTailscaleAPI(tn.url, "-", tn.apiKey).DeleteDevice(t.Context(), id)
	t.Logf("headscale: DELETE /api/v2/device/%s = %d; the daemon's DeleteDevice(%s) = %v", id, status, id, err)
	// headscale answers every path it does not route with an empty 200
	// page, so the client reports success and nothing is deleted.
	if err != nil || !nodes()[id] {
		t.Fatalf("headscale's answer to Tailscale's device path changed (status %d, DeleteDevice %v, node listed %v): update docs/tailscale.md",
			status, err, nodes()[id])
	}

	// discovery's Terminate with headscale's own API, DELETE
	// /api/v1/node/{id}, which takes the same ID. The daemon is stopped
	// first so that its rounds do not act on the builder meanwhile.
	s.h.Stop()
	*deleteDevice = func(ctx context.Context, node string) error {
		if code := tnHTTP(t, http.MethodDelete, tn.url+"/api/v1/node/"+node, tn.apiKey); code != http.StatusOK {
			return fmt.Errorf("headscale DELETE /api/v1/node/%s: %d", node, code)
		}
		return nil
	}
	if err := wrapped.Terminate(t.Context(), instance); err != nil {
		t.Fatal(err)
	}
	if nodes()[id] {
		t.Fatalf("headscale still lists node %s after discovery's Terminate of %s", id, instance)
	}
}

// tnHTTP sends a request with bearer token key and returns the status.
func tnHTTP(t *testing.T, method, url, key string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

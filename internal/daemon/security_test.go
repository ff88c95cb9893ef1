package daemon_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/syncbuf"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// secToken is the TCP API token of the secrets tests; it must never show up
// anywhere but in the token file and the Authorization header.
const secToken = "nba-SECRET-7f3c9d2e4b1a86f0c5d7e9a1b3c5d7e9"

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// withLog sends the daemon's log, at debug level, into buf.
func withLog(buf *syncbuf.Buffer) daemontest.Option {
	return func(o *daemon.Options) {
		o.Logger = slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
}

func TestUnixSocketModeGroupAndDirectory(t *testing.T) {
	dir := daemontest.ShortDir(t)
	// The socket's directory does not exist yet: ListenUnix creates it.
	path := filepath.Join(dir, "run", "nba", "d.sock")
	old := syscall.Umask(0) // the most permissive umask a service could run with
	defer syscall.Umask(old)
	group := os.Getgid()
	if os.Geteuid() == 0 {
		group = 1 // root may give the socket any group: use one it is not in
	}
	l, err := daemon.ListenUnix(path, strconv.Itoa(group))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode = %v, want a socket with 0660", fi.Mode())
	}
	if gid := fi.Sys().(*syscall.Stat_t).Gid; int(gid) != group {
		t.Errorf("socket group = %d, want the configured %d", gid, group)
	}
	for d := filepath.Dir(path); d != dir; d = filepath.Dir(d) {
		di, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if di.Mode().Perm()&0o022 != 0 {
			t.Errorf("socket directory %s has mode %v: group- or world-writable", d, di.Mode().Perm())
		}
	}
	// A second daemon must not take over a live socket.
	if l2, err := daemon.ListenUnix(path, ""); err == nil {
		l2.Close()
		t.Error("ListenUnix on a live socket succeeded; want an error")
	}
	// An unknown group is an error, never a socket left with the default group.
	l.Close()
	if l3, err := daemon.ListenUnix(path, "no-such-group-nba"); err == nil {
		l3.Close()
		t.Error("ListenUnix with an unknown group succeeded; want an error")
	}
}

// TestUnixSocketOfRunningDaemon checks the socket the daemon itself serves.
func TestUnixSocketOfRunningDaemon(t *testing.T) {
	cfg := daemontest.Config(t, "max_builders = 1")
	h := daemontest.Start(t, cfg)
	fi, err := os.Stat(h.Socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("daemon socket mode = %v, want 0660", fi.Mode().Perm())
	}
	di, err := os.Stat(filepath.Dir(h.Socket))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm()&0o002 != 0 {
		t.Errorf("socket directory mode = %v: world-writable", di.Mode().Perm())
	}
}

// TestDefaultsBindLoopback: out of the box nothing listens beyond loopback,
// and the TCP API is off.
func TestDefaultsBindLoopback(t *testing.T) {
	def := config.Default()
	if def.Daemon.Listen != "" {
		t.Errorf("daemon.listen defaults to %q; want no TCP API unless configured", def.Daemon.Listen)
	}
	for key, addr := range map[string]string{
		"daemon.metrics_listen": def.Daemon.MetricsListen, "haproxy.agent_listen": def.HAProxy.AgentListen,
		"haproxy.spoa_listen": def.HAProxy.SPOAListen, "haproxy.stats_listen": def.HAProxy.StatsListen,
	} {
		host, _, err := net.SplitHostPort(addr)
		ip := net.ParseIP(host)
		if err != nil || ip == nil || !ip.IsLoopback() {
			t.Errorf("%s defaults to %q; want a loopback address", key, addr)
		}
	}
}

// startHAProxyDaemon starts a daemon with HAProxy integration on (its
// runtime socket need not exist) and the agent-check and SPOA listeners at
// the given addresses.
func startHAProxyDaemon(t *testing.T, agent, spoa string, logs *syncbuf.Buffer) *daemontest.Harness {
	t.Helper()
	dir := daemontest.ShortDir(t)
	cfg := daemontest.ConfigWithDaemon(t, fmt.Sprintf(`
[haproxy]
runtime_socket = "%s/haproxy.sock"
agent_listen = %q
spoa_listen = %q
`, dir, agent, spoa), `max_builders = 1
frontend = "127.0.0.1:2222"`)
	return daemontest.Start(t, cfg, withLog(logs))
}

func TestSPOAAndAgentWarnWhenNotLoopback(t *testing.T) {
	var logs syncbuf.Buffer
	h := startHAProxyDaemon(t, "0.0.0.0:0", "0.0.0.0:0", &logs)
	h.Stop()
	out := logs.String()
	for _, key := range []string{"haproxy.agent_listen", "haproxy.spoa_listen"} {
		found := false
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "level=WARN") && strings.Contains(line, key) && strings.Contains(line, "loopback") {
				found = true
			}
		}
		if !found {
			t.Errorf("no warning that %s is not loopback; log:\n%s", key, out)
		}
	}
}

func TestSPOAAndAgentQuietOnLoopback(t *testing.T) {
	var logs syncbuf.Buffer
	h := startHAProxyDaemon(t, "127.0.0.1:0", "127.0.0.1:0", &logs)
	for _, a := range []net.Addr{h.Daemon.AgentAddr(), h.Daemon.SPOAAddr()} {
		if ta, ok := a.(*net.TCPAddr); !ok || !ta.IP.IsLoopback() {
			t.Errorf("listener at %v; want loopback", a)
		}
	}
	h.Stop()
	if strings.Contains(logs.String(), "not a loopback") {
		t.Errorf("loopback listeners warned:\n%s", logs.String())
	}
}

// secretDaemon starts a daemon with a TCP API guarded by secToken and a
// metrics listener.
func secretDaemon(t *testing.T, logs *syncbuf.Buffer) (h *daemontest.Harness, apiURL, metricsURL string) {
	t.Helper()
	dir := daemontest.ShortDir(t)
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(secToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	listen, metrics := freeAddr(t), freeAddr(t)
	cfg := daemontest.ConfigWithDaemon(t, fmt.Sprintf("listen = %q\ntoken_file = %q\nlog_level = \"debug\"", listen, tokenFile), `max_builders = 1`)
	cfg.Daemon.MetricsListen = metrics // daemontest turns metrics off
	h = daemontest.Start(t, cfg, withLog(logs))
	return h, "http://" + listen, "http://" + metrics + "/metrics"
}

func rawStatus(t *testing.T, method, url, auth string) int {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func TestTCPAPIRequiresToken(t *testing.T) {
	var logs syncbuf.Buffer
	h, apiURL, _ := secretDaemon(t, &logs)
	_ = h
	for _, auth := range []string{"", "Bearer ", "Bearer wrong", secToken, "Bearer " + secToken[:len(secToken)-1], "Basic " + secToken} {
		for _, ep := range []struct{ method, path string }{{"GET", "/v1/status"}, {"GET", "/v1/reservations"}, {"POST", "/v1/reconcile"}, {"GET", "/v1/events"}} {
			if got := rawStatus(t, ep.method, apiURL+ep.path, auth); got != http.StatusUnauthorized {
				t.Errorf("%s %s with Authorization %q: status %d, want 401", ep.method, ep.path, auth, got)
			}
		}
	}
	if got := rawStatus(t, "GET", apiURL+"/v1/status", "Bearer "+secToken); got != http.StatusOK {
		t.Errorf("GET /v1/status with the token: status %d, want 200", got)
	}
	if got := rawStatus(t, "GET", apiURL+"/healthz", ""); got != http.StatusOK {
		t.Errorf("GET /healthz without a token: status %d, want 200", got)
	}
}

// TestSecretsStayOut uses the TCP API with its token, right and wrong, and
// checks that the token shows up in no log line, metric, event or answer.
func TestSecretsStayOut(t *testing.T) {
	var logs syncbuf.Buffer
	h, apiURL, metricsURL := secretDaemon(t, &logs)
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound) // a hang guard
	defer cancel()
	c := api.NewHTTPClient(apiURL, secToken)
	r, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "sec-1", System: "x86_64-linux", Owner: "ci"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Heartbeat(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Reservations(ctx, api.ReservationQuery{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Status(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Release(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	// Wrong tokens that contain the real one, so a log of the header would show it.
	for _, bad := range []string{"Bearer " + secToken + "x", secToken, "Bearer x" + secToken} {
		if got := rawStatus(t, "GET", apiURL+"/v1/status", bad); got != http.StatusUnauthorized {
			t.Errorf("Authorization %q: status %d, want 401", bad, got)
		}
	}
	wrong := api.NewHTTPClient(apiURL, secToken+"-wrong")
	if _, err := wrong.Status(ctx); err == nil {
		t.Error("a wrong token was accepted")
	} else if strings.Contains(err.Error(), secToken) {
		t.Errorf("the client's error quotes the token: %v", err)
	}

	resp, err := http.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || len(metrics) == 0 {
		t.Fatalf("GET /metrics: %s, %d bytes", resp.Status, len(metrics))
	}
	if strings.Contains(string(metrics), secToken) {
		t.Error("/metrics contains the API token")
	}
	events, err := h.Daemon.Store().Events(ctx, store.EventFilter{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(events) == 0 {
		t.Error("no events recorded; the test did not exercise the event log")
	}
	for _, ev := range events {
		if strings.Contains(fmt.Sprintf("%+v", ev), secToken) {
			t.Errorf("event %+v contains the API token", ev)
		}
	}
	el, err := c.Events(ctx, api.EventQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(fmt.Sprintf("%+v", el), secToken) {
		t.Error("GET /v1/events contains the API token")
	}
	h.Stop()
	out := logs.String()
	if !strings.Contains(out, "reservation created") {
		t.Errorf("the log does not show the API calls; log:\n%s", out)
	}
	if strings.Contains(out, secToken) {
		t.Errorf("the daemon log contains the API token:\n%s", out)
	}
	// Nor does the state on disk.
	filepath.WalkDir(filepath.Join(filepath.Dir(h.Socket), "state"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), secToken) {
			t.Errorf("%s contains the API token", p)
		}
		return nil
	})
}

// TestHeaderSizeBounded: an oversized request header is refused with 431,
// on the TCP API (before the token check) and on the unix socket.
func TestHeaderSizeBounded(t *testing.T) {
	var logs syncbuf.Buffer
	h, apiURL, _ := secretDaemon(t, &logs)
	big := strings.Repeat("a", 64<<10)
	send := func(network, addr string) string {
		conn, err := net.DialTimeout(network, addr, testwait.Bound)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(testwait.Bound)) // a hang guard
		fmt.Fprintf(conn, "GET /v1/status HTTP/1.1\r\nHost: d\r\nAuthorization: Bearer %s\r\nX-Big: %s\r\n\r\n", secToken, big)
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			t.Fatalf("%s: no status line: %v", network, err)
		}
		return strings.TrimSpace(line)
	}
	if got := send("tcp", strings.TrimPrefix(apiURL, "http://")); !strings.Contains(got, " 431 ") {
		t.Errorf("TCP API with a %d-byte header: %q, want 431", len(big), got)
	}
	if got := send("unix", h.Socket); !strings.Contains(got, " 431 ") {
		t.Errorf("unix socket with a %d-byte header: %q, want 431", len(big), got)
	}
}

// TestUnixSocketRefusesWorldWritableDirectory: in a directory anyone can
// write, anyone could replace the socket with their own.
func TestUnixSocketRefusesWorldWritableDirectory(t *testing.T) {
	dir := daemontest.ShortDir(t)
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil { // past the umask
		t.Fatal(err)
	}
	l, err := daemon.ListenUnix(filepath.Join(open, "d.sock"), "")
	if err == nil {
		l.Close()
		t.Fatal("listened in a world-writable directory")
	}
	if !strings.Contains(err.Error(), "writable by everyone") {
		t.Errorf("error %q does not say why", err)
	}
}

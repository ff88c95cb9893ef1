package haproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// banner is a stand-in builder: it writes an SSH banner to every connection
// and keeps it open until the peer closes it or the test ends.
type banner struct {
	Addr string // 127.0.0.1:port
	Port int
}

func startBanner(t *testing.T) banner {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return // listener closed
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				_, _ = io.WriteString(c, "SSH-2.0-test\r\n")
				_, _ = io.Copy(io.Discard, c) // until the peer or cleanup closes it
				c.Close()
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return banner{Addr: l.Addr().String(), Port: l.Addr().(*net.TCPAddr).Port}
}

// standInAgent is a stand-in agent-check responder: it reads the line
// HAProxy sends (agent-send) and answers replies[line], or "maint".
type standInAgent struct {
	Port int

	mu       sync.Mutex
	answered map[string]int // by line, without its line end
}

func startAgent(t *testing.T, replies map[string]string) *standInAgent {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &standInAgent{Port: l.Addr().(*net.TCPAddr).Port, answered: map[string]int{}}
	serveLines(t, l, testwait.Bound, func(line string) (string, bool) {
		line = strings.TrimSpace(line)
		reply, ok := replies[line]
		if !ok {
			reply = "maint"
		}
		a.mu.Lock()
		a.answered[line]++
		a.mu.Unlock()
		return reply + "\n", true
	})
	return a
}

// Answered returns how many times the agent was asked about line (the
// agent-send text without its line end) and began its answer. HAProxy runs
// one agent check of a server at a time, so once this grew by 2, HAProxy has
// applied at least one answer given after the count was read.
func (a *standInAgent) Answered(line string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.answered[line]
}

// serveLines answers every connection to l: it reads one line (within
// deadline, a hang guard; a short read gives what arrived) and writes what
// answer returns for it, if answer says to answer.
// The listener is closed, and its handlers waited for, when the test ends.
func serveLines(t *testing.T, l net.Listener, deadline time.Duration, answer func(line string) (string, bool)) {
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(deadline))
				line, _ := bufio.NewReader(c).ReadString('\n')
				if reply, ok := answer(line); ok {
					_, _ = io.WriteString(c, reply)
				}
			})
		}
	})
	t.Cleanup(func() { l.Close(); wg.Wait() })
}

// fakeSocket is a runtime socket that answers canned text and records the
// commands it got, for answers a real HAProxy will not give on demand.
type fakeSocket struct {
	Path string
	mu   sync.Mutex
	cmds []string
}

func startFakeSocket(t *testing.T, answer func(cmd string) string) *fakeSocket {
	t.Helper()
	f := &fakeSocket{Path: filepath.Join(haproxytest.Dir(t), "fake.sock")}
	l, err := net.Listen("unix", f.Path)
	if err != nil {
		t.Fatal(err)
	}
	serveLines(t, l, testwait.Bound, func(line string) (string, bool) {
		if !strings.HasSuffix(line, "\n") {
			return "", false
		}
		cmd := strings.TrimSuffix(line, "\n")
		f.mu.Lock()
		f.cmds = append(f.cmds, cmd)
		f.mu.Unlock()
		return answer(cmd), true
	})
	return f
}

func (f *fakeSocket) Commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.cmds...)
}

// poolBackend is one pool's frontend and backend in the style of the
// generated configuration, without SPOE and agent-check (tests drive state
// through the runtime API instead).
func poolBackend(pool string, frontendPort, slots int) string {
	var b strings.Builder
	if frontendPort > 0 {
		fmt.Fprintf(&b, "frontend %s\n    bind 127.0.0.1:%d\n    default_backend %s\n", Backend(pool), frontendPort, Backend(pool))
	}
	fmt.Fprintf(&b, `backend %s
    balance leastconn
    option tcp-check
    tcp-check expect rstring ^SSH-2\.0-
    default-server check inter 100ms fall 2 rise 1 maxconn 4 weight 100
`, Backend(pool))
	for i := 1; i <= slots; i++ {
		fmt.Fprintf(&b, "    server slot%d slot.nba.invalid:22 init-addr last,%s disabled\n", i, Placeholder)
	}
	return b.String()
}

const testGlobal = `global
    stats socket DIR/admin.sock mode 600 level admin
    stats timeout 30s

defaults
    mode tcp
    timeout connect 1s
    timeout client 1m
    timeout server 1m
    timeout queue 5s
    # Without it a check must finish within its inter (100ms), and a busy
    # machine may not run a stand-in's goroutine that soon: the server would
    # flap DOWN. Connecting is still bounded by inter.
    timeout check 1m
`

// spoaBackend is the SPOE agent backend, checked with a plain TCP connect
// against addr (a real SPOA would be checked with option spop-check).
func spoaBackend(addr string) string {
	return fmt.Sprintf("backend %s\n    mode tcp\n    server spoa1 %s check inter 100ms fall 1 rise 1\n", SPOABackend, addr)
}

func TestExecAndSetServerAddr(t *testing.T) {
	h := haproxytest.Start(t, haproxytest.Dir(t), testGlobal+poolBackend("x86", 0, 2))
	c := NewClient(h.Socket, testwait.Bound)
	ctx := t.Context()

	out, err := c.Exec(ctx, "show servers state "+Backend("x86"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, "1\n# be_id") {
		t.Errorf("show servers state answered %q", out)
	}

	if err := c.SetServerAddr(ctx, Backend("x86"), "slot1", "127.0.0.1", 2222); err != nil {
		t.Fatalf("SetServerAddr: %v", err)
	}
	// Setting the same address again is success too ("no need to change").
	if err := c.SetServerAddr(ctx, Backend("x86"), "slot1", "127.0.0.1", 2222); err != nil {
		t.Fatalf("SetServerAddr again: %v", err)
	}
	if err := c.SetServerAddr(ctx, Backend("x86"), "slot2", "fd7a:0:0::1", 22); err != nil {
		t.Fatalf("SetServerAddr IPv6: %v", err)
	}
	states, err := c.ShowServersState(ctx, Backend("x86"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, s := range states {
		got[s.Server()] = s.Addr()
	}
	want := map[string]string{"slot1": "127.0.0.1:2222", "slot2": "[fd7a::1]:22"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("servers state addresses = %v, want %v", got, want)
	}
	stats, err := c.ShowStat(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stats {
		if s.Proxy() == Backend("x86") && s.Server() == "slot1" && s.Addr() != "127.0.0.1:2222" {
			t.Errorf("show stat addr of slot1 = %q, want 127.0.0.1:2222", s.Addr())
		}
	}

	// HAProxy's refusals become CommandErrors quoting its answer.
	for _, tc := range []struct {
		backend, server string
		quote           string
		notFound        bool
	}{
		{Backend("x86"), "slot9", "No such server.", true},
		{Backend("nope"), "slot1", "No such backend.", true},
	} {
		err := c.SetServerAddr(ctx, tc.backend, tc.server, "127.0.0.1", 22)
		var ce *CommandError
		if !errors.As(err, &ce) {
			t.Errorf("SetServerAddr(%s/%s) = %v, want a CommandError", tc.backend, tc.server, err)
			continue
		}
		if !strings.Contains(err.Error(), tc.quote) || errors.Is(err, ErrNotFound) != tc.notFound {
			t.Errorf("SetServerAddr(%s/%s) = %v; want it to quote %q, ErrNotFound %v", tc.backend, tc.server, err, tc.quote, tc.notFound)
		}
		if errors.Is(err, ErrUnreachable) {
			t.Errorf("a refusal is not ErrUnreachable: %v", err)
		}
	}
	if _, err := c.ShowServersState(ctx, Backend("nope")); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "Can't find backend.") {
		t.Errorf("ShowServersState(unknown) = %v, want ErrNotFound quoting HAProxy", err)
	}
	// Refused before HAProxy sees them.
	for _, tc := range []struct {
		backend, server, ip string
		port                int
		want                string
	}{
		{Backend("x86"), "slot1", "builder.example", 22, "not an IP address"},
		{Backend("x86"), "slot1", "127.0.0.1", 99999, "outside 1..65535"},
		{Backend("x86"), "slot1", "127.0.0.1", 0, "outside 1..65535"},
		{Backend("x86"), "slot1; shutdown sessions", "127.0.0.1", 22, "invalid backend/server name"},
		{"", "slot1", "127.0.0.1", 22, "invalid backend/server name"},
		{Backend("x86"), "slot1", "fe80::1%eth0", 22, "zones"},
	} {
		err := c.SetServerAddr(ctx, tc.backend, tc.server, tc.ip, tc.port)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("SetServerAddr(%q, %q, %q, %d) = %v, want an error saying %q", tc.backend, tc.server, tc.ip, tc.port, err, tc.want)
		}
	}
	if _, err := c.Exec(ctx, "show info\nshow stat"); err == nil {
		t.Error("Exec accepted a command with a newline")
	}
}

func TestSetServerAddrAnswers(t *testing.T) {
	// Answers of HAProxy 2.6.12 to `set server ... addr`, captured by hand.
	for _, tc := range []struct {
		answer string
		ok     bool
	}{
		{"IP changed from '192.0.2.1' to '127.0.0.1', port changed from '22' to '24023' by 'stats socket command'\n\n", true},
		{"no need to change the addr, no need to change the port by 'stats socket command'\n\n", true},
		{"IP changed from '127.0.0.1' to '::1', port changed from '34463' to '24023' by 'stats socket command'\n\n", true},
		{"no need to change the addr, port changed from '22' to '0' by 'stats socket command'\n\n", true},
		{"\n", true},
		{"No such server.\n\n", false},
		{"No such backend.\n\n", false},
		{"Require 'backend/server'.\n\n", false},
		{"Invalid addr 'foo.example' by 'stats socket command'\n\n", false},
		{"no need to change the addr, problem converting port 'abc' to an int by 'stats socket command'\n\n", false},
		{"no need to change the addr, can't change <port> to port map because it is incompatible with current health check port configuration (use 'port' statement from the 'server' directive. by 'stats socket command'\n\n", false},
		{"set server <b>/<s> addr requires an address and optionally a port.\n\n", false},
		{"Permission denied\n\n", false},
		{"Unknown command, but maybe one of the following ones is a better match:\n  help\n\n", false},
	} {
		err := checkSetAddrAnswer("set server b/s addr 1.2.3.4 port 22", tc.answer)
		if (err == nil) != tc.ok {
			t.Errorf("answer %q: err = %v, want ok=%v", tc.answer, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), strings.TrimSpace(strings.SplitN(tc.answer, "\n", 2)[0])) {
			t.Errorf("error %q does not quote HAProxy's answer %q", err, tc.answer)
		}
	}
}

func TestClientUnreachable(t *testing.T) {
	ctx := t.Context()
	dir := haproxytest.Dir(t)

	t.Run("missing socket", func(t *testing.T) {
		path := filepath.Join(dir, "missing.sock")
		_, err := NewClient(path, time.Second).ShowStat(ctx)
		if !errors.Is(err, ErrUnreachable) || !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("err = %v, want ErrUnreachable and fs.ErrNotExist", err)
		}
		for _, want := range []string{path, "HAProxy is not running", "runtime_socket"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not say %q", err, want)
			}
		}
	})

	t.Run("stale socket", func(t *testing.T) {
		path := filepath.Join(dir, "stale.sock")
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		l.Close()
		_, err = NewClient(path, time.Second).Exec(ctx, "show info")
		if !errors.Is(err, ErrUnreachable) || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("err = %v, want ErrUnreachable and ECONNREFUSED", err)
		}
		for _, want := range []string{path, "not running"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not say %q", err, want)
			}
		}
	})

	t.Run("path too long", func(t *testing.T) {
		path := filepath.Join(dir, strings.Repeat("x", 120)+".sock")
		_, err := NewClient(path, time.Second).Exec(ctx, "show info")
		if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "bytes long") {
			t.Errorf("err = %v, want ErrUnreachable saying the path is too long", err)
		}
	})

	t.Run("no answer", func(t *testing.T) {
		// A socket that accepts and never answers: the client's timeout ends it.
		path := filepath.Join(dir, "mute.sock")
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		var (
			received atomic.Int64 // commands the socket got
			wg       sync.WaitGroup
			mu       sync.Mutex
			conns    []net.Conn
		)
		wg.Go(func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
				wg.Go(func() {
					if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
						received.Add(1)
					}
					_, _ = io.Copy(io.Discard, c)
					c.Close()
				})
			}
		})
		t.Cleanup(func() {
			l.Close()
			mu.Lock()
			for _, c := range conns { // a call that ignored its limits still waits
				c.Close()
			}
			mu.Unlock()
			wg.Wait()
		})

		// exec runs Exec in the background and returns its error; a call
		// that ignores its limits runs into the hang guard.
		exec := func(ctx context.Context, c *Client) <-chan error {
			errc := make(chan error, 1)
			go func() {
				_, err := c.Exec(ctx, "show stat")
				errc <- err
			}()
			return errc
		}
		wait := func(errc <-chan error, limit string) error {
			t.Helper()
			select {
			case err := <-errc:
				return err
			case <-time.After(testwait.Bound):
				t.Fatalf("Exec still waiting for the mute socket after %v: %s did not end it", testwait.Bound, limit)
				return nil
			}
		}

		err = wait(exec(ctx, NewClient(path, 200*time.Millisecond)), "the client's 200ms timeout")
		if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "timed out") || !strings.Contains(err.Error(), path) {
			t.Errorf("err = %v, want ErrUnreachable saying it timed out, with the path", err)
		}

		// The caller's deadline bounds the call too: the client's own limit
		// (an hour) is far beyond the hang guard.
		dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		err = wait(exec(dctx, NewClient(path, time.Hour)), "the context's 100ms deadline")
		if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "timed out") {
			t.Errorf("err = %v, want a timeout", err)
		}

		// Cancelling ends the call at once and is not "unreachable": cancel
		// once the command has reached the socket, while Exec waits for the
		// answer.
		cctx, cancel2 := context.WithCancel(ctx)
		defer cancel2()
		before := received.Load()
		errc := exec(cctx, NewClient(path, time.Hour))
		testwait.Until(t, "the mute socket to get the command", func() bool { return received.Load() > before })
		cancel2()
		err = wait(errc, "cancelling its context")
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnreachable) {
			t.Errorf("err = %v, want context.Canceled only", err)
		}
	})
}

func TestClassifyDialError(t *testing.T) {
	const sock = "/run/haproxy/admin.sock"
	opErr := func(errno syscall.Errno) error {
		return &net.OpError{Op: "dial", Net: "unix", Addr: &net.UnixAddr{Name: sock, Net: "unix"},
			Err: os.NewSyscallError("connect", errno)}
	}
	for _, tc := range []struct {
		name string
		sock string // sock when empty
		err  error
		perm permInfo
		want []string
		not  []string
	}{
		{name: "missing", err: opErr(syscall.ENOENT),
			want: []string{sock, "does not exist", "HAProxy is not running", "runtime_socket"}, not: []string{"permission"}},
		{name: "refused", err: opErr(syscall.ECONNREFUSED),
			want: []string{sock, "connection refused", "not running"}, not: []string{"permission"}},
		{name: "denied", err: opErr(syscall.EACCES),
			perm: permInfo{User: "nix-builder-autoscaler (uid 990)", Owner: "haproxy", Group: "haproxy", Mode: "0600"},
			want: []string{sock, "permission denied", "owner haproxy, group haproxy, mode 0600",
				"runs as nix-builder-autoscaler (uid 990)", "read and write access", "mode 660 group haproxy"},
			not: []string{"not running"}},
		{name: "denied, root group", err: opErr(syscall.EACCES),
			perm: permInfo{User: "nba (uid 990)", Owner: "root", Group: "root", Mode: "0600"},
			want: []string{"permission denied", "runs as nba (uid 990)", "group <a group of that user>"}},
		{name: "denied, directory not searchable", err: opErr(syscall.EACCES),
			perm: permInfo{User: "nba (uid 990)", Detail: "stat " + sock + ": permission denied"},
			want: []string{"permission denied", "search access to its directory", "runs as nba (uid 990)"}},
		{name: "denied, nothing known", err: opErr(syscall.EPERM),
			want: []string{"permission denied", "the daemon's user"}},
		{name: "other", err: opErr(syscall.ENOTSOCK),
			want: []string{sock, "cannot connect"}, not: []string{"permission", "not running"}},
		{name: "path too long", err: opErr(syscall.EINVAL), sock: "/" + strings.Repeat("d", 120) + "/admin.sock",
			want: []string{"bytes long", "more than the 107"}},
		{name: "einval, short path", err: opErr(syscall.EINVAL),
			want: []string{sock, "cannot connect"}, not: []string{"permission", "not running"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := sock
			if tc.sock != "" {
				path = tc.sock
			}
			err := classifyDialError(path, tc.err, tc.perm)
			if !errors.Is(err, ErrUnreachable) || !errors.Is(err, tc.err) {
				t.Errorf("%v: want it to wrap ErrUnreachable and the cause", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(strings.ToLower(err.Error()), n) {
					t.Errorf("error %q should not say %q", err, n)
				}
			}
		})
	}
}

func TestLookupPerm(t *testing.T) {
	// The impure half of the permission message: it describes a real socket.
	path := filepath.Join(haproxytest.Dir(t), "p.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	p := lookupPerm(path)
	if p.Mode != "0600" || p.Owner == "" || p.Group == "" || !strings.Contains(p.User, fmt.Sprintf("uid %d", os.Getuid())) {
		t.Errorf("lookupPerm = %+v", p)
	}
	if p := lookupPerm(filepath.Join(filepath.Dir(path), "none.sock")); p.Detail == "" {
		t.Errorf("lookupPerm of a missing socket = %+v, want a Detail", p)
	}
}

// Package haproxytest starts a real HAProxy for tests: a config written to a
// temporary directory, HAProxy in the foreground, stopped by its PID when
// the test ends.
package haproxytest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/syncbuf"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// Binary returns the haproxy binary; without one the test fails, saying how
// to install it (scripts/test installs it).
func Binary(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("haproxy")
	if err != nil {
		t.Fatalf("haproxy not found: install Debian's haproxy package (scripts/test does): %v", err)
	}
	return p
}

// Instance is a running HAProxy.
type Instance struct {
	t      testing.TB
	Dir    string // holds haproxy.cfg, the runtime socket and the state file
	Socket string // the runtime (admin) socket
	Config string // path of haproxy.cfg
	cmd    *exec.Cmd
	done   chan struct{}
	log    *syncbuf.Buffer
}

// Dir makes a short temporary directory (unix socket paths are limited to
// 108 bytes) removed when the test ends.
func Dir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbah")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Start writes cfg to dir/haproxy.cfg and runs HAProxy on it. In cfg, the
// string DIR is replaced by dir. The config must declare
// `stats socket DIR/admin.sock level admin`. Start returns once the socket
// answers; HAProxy is stopped, and its log shown if the test failed, at the
// end of the test.
func Start(t testing.TB, dir, cfg string) *Instance {
	t.Helper()
	bin := Binary(t)
	cfg = strings.ReplaceAll(cfg, "DIR", dir)
	h := &Instance{t: t, Dir: dir, Socket: filepath.Join(dir, "admin.sock"), Config: filepath.Join(dir, "haproxy.cfg"), log: &syncbuf.Buffer{}}
	if err := os.WriteFile(h.Config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-f", h.Config).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c rejects the config: %v\n%s\n--- config:\n%s", err, out, cfg)
	}
	h.start()
	t.Cleanup(func() {
		h.Stop()
		if t.Failed() {
			t.Logf("haproxy log:\n%s", h.log.String())
		}
	})
	return h
}

func (h *Instance) start() {
	h.t.Helper()
	_ = os.Remove(h.Socket)
	h.cmd = exec.Command(Binary(h.t), "-db", "-f", h.Config)
	h.cmd.Stdout, h.cmd.Stderr = h.log, h.log
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := h.cmd.Start(); err != nil {
		h.t.Fatalf("start haproxy: %v", err)
	}
	h.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) {
		_ = cmd.Wait()
		close(done)
	}(h.cmd, h.done)
	exited := false
	answers := testwait.Poll(testwait.Bound, func() bool {
		select {
		case <-h.done:
			exited = true
			return true
		default:
		}
		c, err := net.Dial("unix", h.Socket)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	switch {
	case exited:
		h.t.Fatalf("haproxy exited at start:\n%s", h.log.String())
	case !answers:
		h.t.Fatalf("haproxy runtime socket %s still does not answer after %v: stuck\n%s", h.Socket, testwait.Bound, h.log.String())
	}
}

// Stop stops HAProxy (SIGTERM, then SIGKILL) and waits for it. Idempotent.
func (h *Instance) Stop() {
	if h.cmd == nil || h.cmd.Process == nil {
		return
	}
	select {
	case <-h.done:
		return
	default:
	}
	_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-h.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
		<-h.done
	}
}

// Restart stops HAProxy and starts it again on the same config: servers come
// back with their configured (placeholder) addresses unless a state file
// says otherwise.
func (h *Instance) Restart() {
	h.t.Helper()
	h.Stop()
	h.start()
}

// Log returns what HAProxy printed so far (with `log stdout` in the config,
// its traffic log too).
func (h *Instance) Log() string { return h.log.String() }

// Cmd sends one runtime-API command and returns the answer.
func (h *Instance) Cmd(cmd string) string {
	h.t.Helper()
	// The bounds are hang guards: a busy machine may take seconds to answer.
	c, err := net.DialTimeout("unix", h.Socket, testwait.Bound)
	if err != nil {
		h.t.Fatalf("runtime socket: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(testwait.Bound))
	if _, err := fmt.Fprintf(c, "%s\n", cmd); err != nil {
		h.t.Fatalf("runtime %q: %v", cmd, err)
	}
	var out bytes.Buffer
	if _, err := out.ReadFrom(c); err != nil {
		h.t.Fatalf("runtime %q: reading the answer: %v (got %q)", cmd, err, out.String())
	}
	return out.String()
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

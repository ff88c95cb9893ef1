package apiserver

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// serveLikeDaemon serves h on a loopback listener with the settings of the
// daemon's http.Server (internal/daemon newHTTPServer) and returns its
// address.
func serveLikeDaemon(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, MaxHeaderBytes: 16 << 10, IdleTimeout: 2 * time.Minute}
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { hs.Close() })
	return ln.Addr().String()
}

// rawExchange sends req on a new connection, sends nothing more, and reads
// until the server closes the connection. It returns the answer's status
// line and whether the server closed the connection; only a hang (no close
// within testwait.Bound) reports false.
func rawExchange(t *testing.T, addr, req string) (status string, closed bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(testwait.Bound))
	br := bufio.NewReader(c)
	status, _ = br.ReadString('\n')
	_, err = io.Copy(io.Discard, br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return strings.TrimSpace(status), false
	}
	return strings.TrimSpace(status), true
}

// TestUnauthenticatedBodylessPostIsRefusedAtOnce: a POST without the token
// that announces a body and sends none gets its 401, and the connection is
// closed, without the server waiting for the body (it used to wait for
// ever, before even answering).
func TestUnauthenticatedBodylessPostIsRefusedAtOnce(t *testing.T) {
	ts := newTestServer(t)
	addr := serveLikeDaemon(t, RequireToken("secret-token", ts.srv.Handler()))
	for _, path := range []string{"/v1/reservations", "/v1/reservations/r1/heartbeat", "/nowhere"} {
		status, closed := rawExchange(t, addr, "POST "+path+" HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
		if !strings.HasPrefix(status, "HTTP/1.1 401") {
			t.Errorf("POST %s without token, no body: status line %q, want 401", path, status)
		}
		if !closed {
			t.Errorf("POST %s without token, no body: connection still open after %s", path, testwait.Bound)
		}
	}
}

// TestStalledBodyTimesOut: an authenticated client that announces a body
// and never sends it is cut off after the body read timeout.
func TestStalledBodyTimesOut(t *testing.T) {
	ts := newTestServer(t, func(o *Options) { o.BodyReadTimeout = 50 * time.Millisecond })
	addr := serveLikeDaemon(t, RequireToken("secret-token", ts.srv.Handler()))
	for _, path := range []string{"/v1/reservations", "/v1/slots/x86/slot1/drain"} {
		status, closed := rawExchange(t, addr, "POST "+path+" HTTP/1.1\r\nHost: d\r\nAuthorization: Bearer secret-token\r\nContent-Length: 1000\r\n\r\n{")
		if !closed {
			t.Errorf("POST %s, body never sent: connection still open after %s", path, testwait.Bound)
		}
		if !strings.HasPrefix(status, "HTTP/1.1 4") {
			t.Errorf("POST %s, body never sent: status line %q, want 4xx", path, status)
		}
	}
}

// heldScaler's rounds wait until release is closed (or their context ends).
type heldScaler struct {
	Scaler
	release chan struct{}
	ended   chan error
}

func (h *heldScaler) Reconcile(ctx context.Context) error {
	select {
	case <-h.release:
		return h.Scaler.Reconcile(ctx)
	case <-ctx.Done():
		h.ended <- ctx.Err()
		return ctx.Err()
	}
}

// TestBodyDeadlineIsLifted: once a body has been read, the body deadline
// no longer applies (net/http clears a connection's read deadline when a
// body ends): a handler that then waits (weight waits for the reconcile
// round that applies it) is not cut off when it passes. It guards the
// deadline's placement: armed before the body, never after it.
func TestBodyDeadlineIsLifted(t *testing.T) {
	held := &heldScaler{release: make(chan struct{}), ended: make(chan error, 1)}
	ts := newTestServer(t, func(o *Options) {
		o.BodyReadTimeout = 20 * time.Millisecond
		held.Scaler = o.Scaler
		o.Scaler = held
	})
	addr := serveLikeDaemon(t, ts.srv.Handler())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	body := `{"weight":5}`
	if _, err := io.WriteString(c, "POST /v1/slots/x86/slot1/weight HTTP/1.1\r\nHost: d\r\nContent-Length: "+
		strconv.Itoa(len(body))+"\r\n\r\n"+body); err != nil {
		t.Fatal(err)
	}
	// Far past the body deadline, the round must still be waiting: a
	// deadline left armed would have ended the request's context.
	select {
	case err := <-held.ended:
		t.Fatalf("the request's round ended (%v) while it waited: the body deadline cut it off", err)
	case <-time.After(50 * ts.srv.o.BodyReadTimeout):
	}
	close(held.release)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("weight after the round: %d, want 200", resp.StatusCode)
	}
}

// TestWrongMethodCode: a 405 says method_not_allowed, not bad_request.
func TestWrongMethodCode(t *testing.T) {
	ts := newTestServer(t)
	for _, c := range []struct{ method, path string }{{"PUT", "/v1/reservations"}, {"POST", "/v1/status"}, {"GET", "/v1/reservations/r1/heartbeat"}} {
		wantError(t, ts.do(c.method, c.path, ""), http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, "method not allowed")
	}
}

// TestRequireTokenComparesDigests: subtle.ConstantTimeCompare returns at
// once when its inputs differ in length, which tells an attacker the
// token's length; RequireToken must compare fixed-length SHA-256 digests.
func TestRequireTokenComparesDigests(t *testing.T) {
	src, err := os.ReadFile("server.go")
	if err != nil {
		t.Fatal(err)
	}
	body := string(regexp.MustCompile(`(?s)func RequireToken\(.*?\n}\n`).Find(src))
	if body == "" {
		t.Fatal("RequireToken not found in server.go")
	}
	if n := strings.Count(body, "sha256.Sum256("); n != 2 {
		t.Errorf("RequireToken hashes %d values with sha256.Sum256, want 2 (the expected and the received header):\n%s", n, body)
	}
	if !regexp.MustCompile(`subtle\.ConstantTimeCompare\(\w+\[:\], \w+\[:\]\)`).MatchString(body) {
		t.Errorf("RequireToken does not compare the two digests with subtle.ConstantTimeCompare:\n%s", body)
	}
}

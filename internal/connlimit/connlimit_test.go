package connlimit

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// serveAccepts accepts on l until it closes, handing each connection to got.
func serveAccepts(t *testing.T, l *Listener) <-chan *Conn {
	t.Helper()
	got := make(chan *Conn, 64)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(got)
				return
			}
			got <- c.(*Conn)
		}
	}()
	return got
}

func listen(t *testing.T, n int) *Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := New(ln, n)
	t.Cleanup(func() { l.Close() })
	return l
}

func dial(t *testing.T, l *Listener) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedByPeer reports whether the server closed c: a read ends in EOF or a
// reset. The deadline only guards against a hang.
func closedByPeer(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// stillOpen reports whether c is open after a short wait: a read times out.
func stillOpen(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func accept(t *testing.T, got <-chan *Conn) *Conn {
	t.Helper()
	select {
	case c := <-got:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted")
		return nil
	}
}

func TestFullListenerEvictsOldestNewFirst(t *testing.T) {
	l := listen(t, 3)
	got := serveAccepts(t, l)
	var clients []net.Conn
	var conns []*Conn
	for range 3 {
		clients = append(clients, dial(t, l))
		conns = append(conns, accept(t, got))
	}
	conns[1].Idle() // proved itself: goes after every new one
	c4 := dial(t, l)
	accept(t, got)
	if !closedByPeer(clients[0]) {
		t.Fatal("the oldest new connection was not closed")
	}
	if !stillOpen(clients[1]) || !stillOpen(clients[2]) || !stillOpen(c4) {
		t.Fatal("a connection other than the oldest new one was closed")
	}
	dial(t, l)
	accept(t, got)
	if !closedByPeer(clients[2]) {
		t.Fatal("the second new connection was not closed before the idle one")
	}
	dial(t, l)
	accept(t, got)
	if !closedByPeer(c4) {
		t.Fatal("new connections go before idle ones")
	}
	if !stillOpen(clients[1]) {
		t.Fatal("the idle connection was closed while new ones were left")
	}
	if s := l.Stats(); s.Open != 3 || s.Evicted != 3 || s.Rejected != 0 {
		t.Fatalf("stats %+v, want 3 open, 3 evicted", s)
	}
}

func TestBusyConnectionsAreNeverEvicted(t *testing.T) {
	l := listen(t, 2)
	got := serveAccepts(t, l)
	a, b := dial(t, l), dial(t, l)
	accept(t, got).Busy()
	accept(t, got).Busy()
	c := dial(t, l)
	if !closedByPeer(c) {
		t.Fatal("a connection beyond a full busy listener was kept")
	}
	if !stillOpen(a) || !stillOpen(b) {
		t.Fatal("a busy connection was closed")
	}
	if s := l.Stats(); s.Rejected != 1 || s.Evicted != 0 || s.Open != 2 {
		t.Fatalf("stats %+v, want 1 rejected, 2 open", s)
	}
}

func TestIdleLongestGoesFirstAndCloseFreesPlace(t *testing.T) {
	l := listen(t, 2)
	got := serveAccepts(t, l)
	a, b := dial(t, l), dial(t, l)
	ca, cb := accept(t, got), accept(t, got)
	ca.Idle()
	cb.Idle()
	ca.Busy()
	ca.Idle() // active again: now b is the one idle longest
	dial(t, l)
	accept(t, got)
	if !closedByPeer(b) || !stillOpen(a) {
		t.Fatal("the connection idle longest was not the one closed")
	}
	ca.Close()
	if s := l.Stats(); s.Open != 1 {
		t.Fatalf("open = %d after a close, want 1", s.Open)
	}
	cb.Close() // evicted already: must not count twice
	if s := l.Stats(); s.Open != 1 {
		t.Fatalf("open = %d after closing an evicted connection, want 1", s.Open)
	}
}

// The HTTP wiring: a slow client that never finishes its headers gives way
// to a new one, a request being answered does not.
func TestHTTPSlowClientsGiveWay(t *testing.T) {
	l := listen(t, 2)
	release := make(chan struct{})
	entered := make(chan struct{}, 4)
	srv := &http.Server{Handler: Mark(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			entered <- struct{}{}
			<-release
		}
		fmt.Fprintln(w, "ok")
	}))}
	Serve(srv)
	go srv.Serve(l)
	t.Cleanup(func() { close(release); srv.Close() })

	busy := dial(t, l)
	fmt.Fprint(busy, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
	<-entered
	slow := dial(t, l)
	fmt.Fprint(slow, "GET / HTTP/1.1\r\nHost:") // never finished
	if !stillOpen(slow) {
		t.Fatal("the slow client was closed before anyone needed its place")
	}
	c := dial(t, l)
	fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("a new client was not answered: %v", err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 10))
	if strings.TrimSpace(string(body)) != "ok" {
		t.Fatalf("answer %q", body)
	}
	if !closedByPeer(slow) {
		t.Fatal("the slow client kept its place")
	}
	if !stillOpen(busy) {
		t.Fatal("the request being answered lost its connection")
	}
}

func TestConcurrentUse(t *testing.T) {
	l := listen(t, 8)
	got := serveAccepts(t, l)
	var wg sync.WaitGroup
	go func() {
		for c := range got {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.Busy()
				c.Idle()
				c.Close()
			}()
		}
	}()
	var cw sync.WaitGroup
	for range 200 {
		cw.Add(1)
		go func() {
			defer cw.Done()
			c, err := net.Dial("tcp", l.Addr().String())
			if err == nil {
				c.Close()
			}
		}()
	}
	cw.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for l.Stats().Open != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if s := l.Stats(); s.Open != 0 {
		t.Fatalf("open = %d after every connection closed", s.Open)
	}
}

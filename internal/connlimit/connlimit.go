// Package connlimit bounds the connections a listener holds open, so that no
// local process can exhaust the daemon's file descriptors or take every slot
// of a listener that HAProxy's checks and the operator depend on.
//
// A cap alone is not enough: a process that opens cap connections and sends
// nothing would lock everyone else out until its connections time out. So a
// full listener makes room instead of refusing: it closes the connection that
// has waited longest without proving anything. Each connection is in one of
// three states, set by the protocol code that reads it:
//
//   - new: accepted, no complete request yet. Evicted first, oldest first.
//   - idle: it has sent a valid request before and has nothing in flight now
//     (an HTTP keep-alive connection between requests, an SPOE connection
//     after its HELLO). Evicted only when no new connection is left, the one
//     idle longest first. Its peer sees a close and reconnects.
//   - busy: a request is being answered. Never evicted.
//
// A legitimate peer (HAProxy's agent check, an SPOE HELLO, an HTTP client)
// sends its request as soon as it connects, so it is the newest connection
// when room is made and becomes busy before an attacker's later connections
// could push it out. When every connection is busy, a new one is closed at
// once: busy connections are bounded in time by their protocol's timeouts.
package connlimit

import (
	"container/list"
	"context"
	"net"
	"net/http"
	"sync"
)

type state int

const (
	stateNew state = iota
	stateIdle
	stateBusy
)

// Stats counts what a listener did since it was made.
type Stats struct {
	Open     int    // connections open now
	Evicted  uint64 // closed to make room for a newer one
	Rejected uint64 // closed at once because every connection was busy
}

// Listener is a net.Listener that holds at most Max connections open.
// Accept returns *Conn.
type Listener struct {
	net.Listener
	max int

	onFull, onDrained func() // see OnFull, OnDrained

	mu       sync.Mutex
	waiting  [2]list.List // stateNew and stateIdle connections, oldest at the front
	open     int
	evicted  uint64
	rejected uint64
	wasFull  bool // closed a connection since it last drained
}

// New wraps ln so that at most n connections (≥ 1) are open at once.
func New(ln net.Listener, n int) *Listener {
	return &Listener{Listener: ln, max: max(n, 1)}
}

// OnFull sets a function called (on Accept's goroutine) each time the full
// listener closes a connection. Set it before the first Accept.
func (l *Listener) OnFull(f func()) { l.onFull = f }

// OnDrained sets a function called once each time a listener that was full
// is down to half its connections again (on the goroutine of the Close that
// made it so). Set it before the first Accept.
func (l *Listener) OnDrained(f func()) { l.onDrained = f }

// Accept waits for the next connection. When the listener is full it closes
// the oldest new connection, else the longest idle one; when every
// connection is busy it closes the new one and waits for another.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		conn, victim := l.admit(c)
		if victim != nil {
			victim.Close()
		}
		if (victim != nil || conn == nil) && l.onFull != nil {
			l.onFull()
		}
		if conn != nil {
			return conn, nil
		}
		c.Close()
	}
}

// admit registers c, choosing a connection to close when full. It returns
// nil for c when there is no room.
func (l *Listener) admit(c net.Conn) (*Conn, net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var victim net.Conn
	if l.open >= l.max {
		v := l.oldestWaiting()
		l.wasFull = true
		if v == nil {
			l.rejected++
			return nil, nil
		}
		l.forget(v)
		v.evicted = true
		l.evicted++
		victim = v.Conn
	}
	conn := &Conn{Conn: c, l: l, state: stateNew}
	conn.elem = l.waiting[stateNew].PushBack(conn)
	l.open++
	return conn, victim
}

func (l *Listener) oldestWaiting() *Conn {
	for i := range l.waiting {
		if e := l.waiting[i].Front(); e != nil {
			return e.Value.(*Conn)
		}
	}
	return nil
}

// forget takes c out of the waiting lists and the open count; l.mu is held.
func (l *Listener) forget(c *Conn) {
	if c.elem != nil {
		l.waiting[c.state].Remove(c.elem)
		c.elem = nil
	}
	l.open--
}

// Stats returns the listener's counts.
func (l *Listener) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Stats{Open: l.open, Evicted: l.evicted, Rejected: l.rejected}
}

// Conn is a connection accepted by a Listener.
type Conn struct {
	net.Conn
	l *Listener

	// Guarded by l.mu.
	state   state
	elem    *list.Element // in l.waiting[state] unless busy or gone
	evicted bool
	closed  bool
}

// Busy marks the connection as answering a request: it is not evicted.
func (c *Conn) Busy() { c.set(stateBusy) }

// Idle marks the connection as having proved itself and having nothing in
// flight: it may be evicted, after every new connection.
func (c *Conn) Idle() { c.set(stateIdle) }

func (c *Conn) set(s state) {
	l := c.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if c.closed || c.evicted {
		return
	}
	if c.elem != nil {
		l.waiting[c.state].Remove(c.elem)
		c.elem = nil
	}
	c.state = s
	if s != stateBusy {
		// Back of the list: the most recently active is evicted last.
		c.elem = l.waiting[s].PushBack(c)
	}
}

// Close closes the connection and frees its place.
func (c *Conn) Close() error {
	l := c.l
	drained := false
	l.mu.Lock()
	if !c.closed {
		c.closed = true
		if !c.evicted {
			l.forget(c)
		}
		if l.wasFull && l.open <= l.max/2 {
			l.wasFull, drained = false, true
		}
	}
	l.mu.Unlock()
	err := c.Conn.Close()
	if drained && l.onDrained != nil {
		l.onDrained()
	}
	return err
}

type ctxKey struct{}

// Serve sets up srv for a Listener: a request in progress makes its
// connection busy (Mark does, once the handler runs), a keep-alive
// connection waiting for its next request is idle.
func Serve(srv *http.Server) {
	prevState, prevCtx := srv.ConnState, srv.ConnContext
	srv.ConnState = func(nc net.Conn, s http.ConnState) {
		if c, ok := nc.(*Conn); ok && s == http.StateIdle {
			c.Idle()
		}
		if prevState != nil {
			prevState(nc, s)
		}
	}
	srv.ConnContext = func(ctx context.Context, nc net.Conn) context.Context {
		if prevCtx != nil {
			ctx = prevCtx(ctx, nc)
		}
		if c, ok := nc.(*Conn); ok {
			ctx = context.WithValue(ctx, ctxKey{}, c)
		}
		return ctx
	}
}

// Mark wraps h so that a request reaching it makes its connection busy.
// Put it after authentication: a connection that has not authenticated
// stays evictable. The server sets the connection idle again when the
// request is done (see Serve).
func Mark(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := r.Context().Value(ctxKey{}).(*Conn); ok {
			c.Busy()
		}
		h.ServeHTTP(w, r)
	})
}

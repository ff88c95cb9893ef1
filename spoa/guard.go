package spoa

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// The guard stands between each accepted connection and the SPOE library.
//
// The library (negasus/haproxy-spoe-go v1.0.7) trusts its peer: it slices
// frames by lengths it has not checked, type-asserts HELLO values, sizes its
// read buffer from the frame's length field (a length of 0 asks for 4 GiB),
// sets no deadlines, and starts a goroutine for every NOTIFY it reads. Its
// reader runs outside any recover, so one malformed frame from anything
// that reaches the SPOA port kills the daemon, and a slow or pipelining
// peer can hold memory and goroutines without bound. Patching a vendored
// copy would have to be redone on every upgrade and still leave the
// library's policy (no limits) in place; replacing it drops the
// implementation the design names. So the library only ever sees bytes the
// guard has read itself and proven well-formed:
//
//   - The guard reads each frame whole from the socket, its length checked
//     against the negotiated max-frame-size (a fixed cap before HELLO)
//     before anything is allocated, and decodes it completely with bounds
//     checks (spop.go). The library then parses a frame that cannot make it
//     index out of range or fail an assertion. Anything else closes the
//     connection with an AGENT-DISCONNECT carrying SPOP's status code.
//   - HELLO and DISCONNECT are handed over re-encoded with only the keys the
//     guard checked; the HELLO carries the negotiated max-frame-size,
//     because the library answers with whatever value it read.
//   - Deadlines: HELLO must be complete within HelloTimeout of accept, a
//     started frame within FrameTimeout, and a connection with nothing in
//     flight is closed after IdleTimeout, longer than HAProxy's own SPOE
//     `timeout idle` so that HAProxy normally closes first.
//   - Backpressure, not refusal: a NOTIFY is handed over only while the
//     connection has fewer than MaxInFlight unanswered and the agent fewer
//     than MaxInFlightTotal; otherwise the guard stops reading until an ACK
//     is written. The guard sees ACKs because the library writes through it.
//     The library therefore holds at most MaxInFlightTotal frames and
//     handler goroutines, and each connection one more frame being read.
//
// HAProxy itself never sends what the guard refuses: it keeps at most
// max-waiting-frames (default 20) NOTIFYs unanswered per connection, offers
// tune.bufsize-4 as max-frame-size (16380 by default) and speaks SPOP 2.0.

// guard holds what all of an agent's connections share.
type guard struct {
	o     GuardOptions
	slots chan struct{} // one token per NOTIFY in flight, over all connections
	// closed reports a connection the guard refused.
	closed func(remote net.Addr, err *protocolError)
}

// wall is the guard's clock: its times become the kernel's socket deadlines,
// which only the wall clock drives.
var wall clock.Real

func newGuard(o GuardOptions, closed func(net.Addr, *protocolError)) *guard {
	o = o.withDefaults()
	return &guard{o: o, slots: make(chan struct{}, o.MaxInFlightTotal), closed: closed}
}

// wrap guards conn; origin is the connection as accepted, whose eviction
// hook (connState) is used if it has one.
func (g *guard) wrap(conn, origin net.Conn) *guardConn {
	c := &guardConn{Conn: conn, g: g, maxFrame: uint32(g.o.MaxFrameSize),
		helloBy: wall.Now().Add(g.o.HelloTimeout), wake: make(chan struct{}, 1), done: make(chan struct{})}
	c.hook, _ = origin.(connState)
	return c
}

type phase uint8

const (
	phaseHello phase = iota // waiting for HAPROXY-HELLO
	phaseOpen               // NOTIFYs and DISCONNECT
	phaseEnded              // nothing more is handed to the library
)

type hookState uint8

const (
	hookNew hookState = iota
	hookIdle
	hookBusy
)

// guardConn is the connection the library reads from and writes to.
type guardConn struct {
	net.Conn
	g    *guard
	hook connState

	// Only the library's reader goroutine (Read) uses these.
	pending   []byte // validated bytes not yet read by the library
	phase     phase
	maxFrame  uint32
	helloBy   time.Time
	lastFrame time.Time

	wmu sync.Mutex // one frame per write, in order

	mu       sync.Mutex
	inflight int  // NOTIFYs handed over and not answered
	reading  bool // a frame has started and is not handed over yet
	lastAck  time.Time
	open     bool // HELLO accepted: the hook is in use
	hstate   hookState

	wake      chan struct{} // an ACK was written
	done      chan struct{} // the connection is closed
	closeOnce sync.Once
	closeErr  error
}

// Read hands the library validated frames. On anything the guard refuses it
// tells HAProxy why, closes the socket and reports io.EOF, which the library
// takes as a clean end.
func (c *guardConn) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		if c.phase == phaseEnded {
			return 0, io.EOF
		}
		if err := c.next(); err != nil {
			c.phase = phaseEnded
			c.refuse(err)
			return 0, io.EOF
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// next reads and checks one frame and queues what the library gets of it.
func (c *guardConn) next() error {
	raw, err := c.readFrame()
	if err != nil {
		return err
	}
	h, err := parseHead(raw[4:])
	if err != nil {
		return err
	}
	if h.typ == frameHAProxyHello {
		if c.phase != phaseHello {
			return protoErr(reasonOutOfOrder, "second HELLO")
		}
		hl, err := parseHello(h.payload, uint32(c.g.o.MaxFrameSize))
		if err != nil {
			return err
		}
		c.maxFrame, c.phase = hl.maxFrameSize, phaseOpen
		if hl.healthcheck {
			c.phase = phaseEnded // the library answers and closes
		}
		c.pending = canonicalHello(hl)
		c.handedOver(false, true)
		return nil
	}
	if c.phase != phaseOpen {
		return protoErr(reasonOutOfOrder, fmt.Sprintf("frame type %#x before HELLO", h.typ))
	}
	if h.typ == frameHAProxyDiscon {
		if err := checkDisconnect(h.payload); err != nil {
			return err
		}
		c.phase = phaseEnded
		c.pending = canonicalDisconnect()
		c.handedOver(false, false)
		return nil
	}
	if err := checkMessages(h.payload); err != nil {
		return err
	}
	if err := c.admit(); err != nil {
		return err
	}
	c.pending = raw
	return nil
}

// readFrame reads one frame, length prefix included, within its deadlines.
func (c *guardConn) readFrame() ([]byte, error) {
	var hdr [4]byte
	if err := c.awaitFrame(hdr[:1]); err != nil {
		return nil, err
	}
	c.setReading(true)
	deadline := wall.Now().Add(c.g.o.FrameTimeout)
	if c.phase == phaseHello {
		deadline = c.helloBy
	}
	if err := c.Conn.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(c.Conn, hdr[1:]); err != nil {
		return nil, c.midFrameErr(err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	switch {
	case n == 0:
		return nil, protoErr(reasonInvalidFrame, "frame length 0")
	case n > c.maxFrame:
		return nil, protoErr(reasonFrameTooBig, fmt.Sprintf("frame length %d over max-frame-size %d", n, c.maxFrame))
	}
	buf := make([]byte, 4+int(n))
	copy(buf, hdr[:])
	if _, err := io.ReadFull(c.Conn, buf[4:]); err != nil {
		return nil, c.midFrameErr(err)
	}
	c.lastFrame = wall.Now()
	return buf, nil
}

// awaitFrame reads a frame's first byte: before HELLO by the HELLO
// deadline, after it for as long as something is in flight or the
// connection has not been idle for IdleTimeout.
func (c *guardConn) awaitFrame(b []byte) error {
	for {
		deadline, expired := c.helloBy, false
		if c.phase != phaseHello {
			deadline, expired = c.idleDeadline()
		}
		if expired {
			return protoErr(reasonIdleTimeout, fmt.Sprintf("idle for %s", c.g.o.IdleTimeout))
		}
		if err := c.Conn.SetReadDeadline(deadline); err != nil {
			return err
		}
		_, err := io.ReadFull(c.Conn, b)
		switch {
		case err == nil:
			return nil
		case !errors.Is(err, os.ErrDeadlineExceeded):
			return err // io.EOF between frames is a clean close
		case c.phase == phaseHello:
			return protoErr(reasonHelloTimeout, fmt.Sprintf("no HELLO within %s", c.g.o.HelloTimeout))
		}
	}
}

// idleDeadline is when the connection will have been idle for IdleTimeout
// (later if a NOTIFY is still being answered), and whether that has passed.
func (c *guardConn) idleDeadline() (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := wall.Now()
	if c.inflight > 0 {
		return now.Add(c.g.o.IdleTimeout), false
	}
	last := c.lastFrame
	if c.lastAck.After(last) {
		last = c.lastAck
	}
	d := last.Add(c.g.o.IdleTimeout)
	return d, !now.Before(d)
}

func (c *guardConn) midFrameErr(err error) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) && c.phase == phaseHello:
		return protoErr(reasonHelloTimeout, fmt.Sprintf("HELLO not complete within %s", c.g.o.HelloTimeout))
	case errors.Is(err, os.ErrDeadlineExceeded):
		return protoErr(reasonFrameTimeout, fmt.Sprintf("frame not complete within %s", c.g.o.FrameTimeout))
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return protoErr(reasonTruncated, "connection closed mid-frame")
	}
	return err
}

// admit waits until the connection and the agent have room for one more
// NOTIFY in flight, and counts it. Not reading meanwhile is the
// backpressure: HAProxy's frames wait in the socket buffers.
func (c *guardConn) admit() error {
	for {
		c.mu.Lock()
		room := c.inflight < c.g.o.MaxInFlight
		c.mu.Unlock()
		if room {
			break // only this goroutine adds to inflight
		}
		select {
		case <-c.wake:
		case <-c.done:
			return net.ErrClosed
		}
	}
	select {
	case c.g.slots <- struct{}{}:
	case <-c.done:
		return net.ErrClosed
	}
	c.handedOver(true, false)
	return nil
}

// handedOver records that a frame went to the library.
func (c *guardConn) handedOver(notify, hello bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if notify {
		c.inflight++
	}
	if hello {
		c.open = true
	}
	c.reading = false
	c.updateHook()
}

func (c *guardConn) setReading(r bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reading = r
	c.updateHook()
}

// updateHook tells the listener whether the connection may be evicted.
// c.mu must be held, which keeps the calls in order.
func (c *guardConn) updateHook() {
	if c.hook == nil || !c.open {
		return
	}
	want := hookIdle
	if c.reading || c.inflight > 0 {
		want = hookBusy
	}
	if want == c.hstate {
		return
	}
	c.hstate = want
	if want == hookBusy {
		c.hook.Busy()
	} else {
		c.hook.Idle()
	}
}

// Write sends one frame of the library's. Each ACK in it ends a NOTIFY in
// flight, written or not: its handler has returned.
func (c *guardConn) Write(p []byte) (int, error) {
	n, err := c.writeFrame(p)
	if acks := countAcks(p); acks > 0 {
		c.acked(acks)
	}
	if err != nil {
		c.shut() // a peer that does not read is not waited for
	}
	return n, err
}

func (c *guardConn) writeFrame(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.Conn.SetWriteDeadline(time.Now().Add(c.g.o.WriteTimeout)); err != nil {
		return 0, err
	}
	return c.Conn.Write(p)
}

// countAcks counts the AGENT-ACK frames in the library's write (one frame
// per write, in practice).
func countAcks(p []byte) int {
	n := 0
	for len(p) >= 5 {
		if p[4] == frameAgentAck {
			n++
		}
		l := uint64(binary.BigEndian.Uint32(p))
		if l+4 > uint64(len(p)) {
			break
		}
		p = p[4+l:]
	}
	return n
}

func (c *guardConn) acked(n int) {
	c.mu.Lock()
	n = min(n, c.inflight)
	c.inflight -= n
	c.lastAck = wall.Now()
	c.updateHook()
	c.mu.Unlock()
	c.release(n)
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *guardConn) release(n int) {
	for range n {
		<-c.g.slots
	}
}

// refuse reports why the connection ends and, where SPOP has a status for
// it, tells HAProxy before closing. A clean close or a socket closed under
// the guard is not a refusal.
func (c *guardConn) refuse(err error) {
	var pe *protocolError
	if !errors.As(err, &pe) {
		return
	}
	c.g.closed(c.RemoteAddr(), pe)
	if info := reasonInfo[pe.reason]; info.send {
		_, _ = c.writeFrame(agentDisconnect(info.status, pe.detail))
	}
	c.shut()
}

// shut closes the socket once; blocked reads, writes and admit return.
func (c *guardConn) shut() {
	c.closeOnce.Do(func() {
		close(c.done)
		c.closeErr = c.Conn.Close()
	})
}

// Close is the library's, after all of the connection's handlers have
// returned: whatever they did not answer is no longer in flight.
func (c *guardConn) Close() error {
	c.mu.Lock()
	n := c.inflight
	c.inflight = 0
	c.mu.Unlock()
	c.release(n)
	c.shut()
	return c.closeErr
}

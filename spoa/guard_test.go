package spoa

import (
	"bufio"
	"encoding/binary"
	"net"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/negasus/haproxy-spoe-go/frame"
	"github.com/negasus/haproxy-spoe-go/payload/kv"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// helloWith is HAProxy's HELLO with key set to value (nil: removed).
func helloWith(tb testing.TB, key string, value any) []byte {
	items := helloKV()
	i := slices.IndexFunc(items, func(it kv.Item) bool { return it.Name == key })
	switch {
	case value == nil && i >= 0:
		items = slices.Delete(items, i, i+1)
	case i >= 0:
		items[i].Value = value
	default:
		items = append(items, kv.Item{Name: key, Value: value})
	}
	return encodeKVFrame(tb, frame.TypeHaproxyHello, items)
}

const fin = 1

// Each input used to panic the SPOE library's reader goroutine, which
// killed the daemon, or was accepted against the protocol. Now the agent
// answers with an AGENT-DISCONNECT carrying SPOP's status, closes that
// connection and goes on serving others.
func TestGuardRefusesMalformedInput(t *testing.T) {
	s := serve(t, GuardOptions{}, false)
	tests := []struct {
		name   string
		hello  bool // a valid handshake first
		input  []byte
		status int
		reason closeReason
	}{
		{"frame shorter than its flags", false, []byte("\x00\x00\x00\x02\x01\x00"), 4, reasonInvalidFrame},
		{"frame length 0", false, []byte("\x00\x00\x00\x00\x01"), 4, reasonInvalidFrame},
		{"frame length over the cap", false, []byte("\x7f\xff\xff\xff\x01"), 3, reasonFrameTooBig},
		{"healthcheck is a string", false, helloWith(t, "healthcheck", "yes"), 4, reasonInvalidFrame},
		{"max-frame-size is a string", false, helloWith(t, "max-frame-size", "16380"), 4, reasonInvalidFrame},
		{"max-frame-size is a uint64", false, helloWith(t, "max-frame-size", uint64(16380)), 4, reasonInvalidFrame},
		{"engine-id is a number", false, helloWith(t, "engine-id", uint32(1)), 4, reasonInvalidFrame},
		{"truncated stream-id varint", false, []byte("\x00\x00\x00\x06\x01\x00\x00\x00\x01\xf0"), 4, reasonInvalidFrame},
		{"varint longer than 10 bytes", false, rawFrame(1, fin, []byte("\x01a\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")), 4, reasonInvalidFrame},
		{"short IPv4 value in HELLO", false, rawFrame(1, fin, []byte("\x01a\x06\x7f\x00")), 4, reasonInvalidFrame},
		{"unknown typed-data type", false, rawFrame(1, fin, []byte("\x01a\x0c")), 4, reasonInvalidFrame},
		{"only version 99.0", false, helloWith(t, "supported-versions", "99.0"), 8, reasonUnsupportedVersion},
		{"no supported-versions", false, helloWith(t, "supported-versions", nil), 5, reasonNoVersion},
		{"no max-frame-size", false, helloWith(t, "max-frame-size", nil), 6, reasonNoMaxFrameSize},
		{"no capabilities", false, helloWith(t, "capabilities", nil), 7, reasonNoCapabilities},
		{"max-frame-size under 256", false, helloWith(t, "max-frame-size", uint32(100)), 9, reasonBadMaxFrameSize},
		{"HELLO without FIN", false, rawFrame(1, 0, nil), 10, reasonFragmented},
		{"fragment frame", false, rawFrame(0, fin, nil), 10, reasonFragmented},
		{"agent frame type from the peer", false, rawFrame(0x67, fin, nil), 4, reasonInvalidFrame},
		{"unknown frame type", false, rawFrame(9, fin, nil), 4, reasonInvalidFrame},
		{"NOTIFY before HELLO", false, rawFrame(3, fin, nil), 4, reasonOutOfOrder},
		{"DISCONNECT before HELLO", false, rawFrame(2, fin, nil), 4, reasonOutOfOrder},
		{"second HELLO", true, haproxyHello(t), 4, reasonOutOfOrder},
		{"NOTIFY message-name length 200", true, rawFrame(3, fin, []byte("\xc8abc")), 4, reasonInvalidFrame},
		{"NOTIFY message without nb-args", true, rawFrame(3, fin, []byte("\x03abc")), 4, reasonInvalidFrame},
		{"NOTIFY argument missing", true, rawFrame(3, fin, []byte("\x03abc\x02\x01a\x00")), 4, reasonInvalidFrame},
		{"NOTIFY short IPv4 argument", true, rawFrame(3, fin, []byte("\x03abc\x01\x03src\x06\x7f")), 4, reasonInvalidFrame},
		{"DISCONNECT without status-code", true, rawFrame(2, fin, []byte("\x07message\x08\x00")), 4, reasonInvalidFrame},
		{"frame over the negotiated max-frame-size", true, append(binary.BigEndian.AppendUint32(nil, 16381), 3), 3, reasonFrameTooBig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := s.closedFor(tt.reason)
			c := dial(t, s.addr)
			r := bufio.NewReader(c)
			if tt.hello {
				handshake(t, c, r)
			}
			if _, err := c.Write(tt.input); err != nil {
				t.Fatal(err)
			}
			if got := disconnectStatus(t, r); got != tt.status {
				t.Errorf("AGENT-DISCONNECT status %d, want %d", got, tt.status)
			}
			if got := s.closedFor(tt.reason) - before; got != 1 {
				t.Errorf("%s closes counted %v, want 1", tt.reason, got)
			}
			exchange(t, s.addr)
		})
	}
}

// A DISCONNECT carrying HELLO's keys with other types made the library's
// assertions panic; the library now only sees a canonical DISCONNECT and
// answers it.
func TestGuardDisconnectIsAnswered(t *testing.T) {
	s := serve(t, GuardOptions{}, false)
	c := dial(t, s.addr)
	r := bufio.NewReader(c)
	handshake(t, c, r)
	disc := encodeKVFrame(t, frame.TypeHaproxyDisconnect, []kv.Item{{Name: "status-code", Value: uint32(0)},
		{Name: "message", Value: "bye"}, {Name: "max-frame-size", Value: "x"}, {Name: "healthcheck", Value: uint32(1)}})
	if _, err := c.Write(disc); err != nil {
		t.Fatal(err)
	}
	if got := disconnectStatus(t, r); got != 0 {
		t.Errorf("answer to DISCONNECT has status %d, want 0", got)
	}
	exchange(t, s.addr)
}

// The agent answers the smaller of HAProxy's max-frame-size and its own,
// and holds HAProxy to it.
func TestGuardNegotiatesMaxFrameSize(t *testing.T) {
	s := serve(t, GuardOptions{}, false)
	for _, tt := range []struct{ offer, want uint32 }{{1 << 20, DefaultMaxFrameSize}, {1000, 1000}, {256, 256}} {
		c := dial(t, s.addr)
		r := bufio.NewReader(c)
		if _, err := c.Write(helloWith(t, "max-frame-size", tt.offer)); err != nil {
			t.Fatal(err)
		}
		ans, err := readAnswer(t, r)
		if err != nil || ans.typ != frame.TypeAgentHello {
			t.Fatalf("offer %d: answer %#x, %v; want AGENT-HELLO", tt.offer, ans.typ, err)
		}
		if got := ans.uint("max-frame-size"); got != tt.want {
			t.Errorf("offer %d: agent answered max-frame-size %d, want %d", tt.offer, got, tt.want)
		}
		if v, _ := ans.kv.Get("version"); v != "2.0" {
			t.Errorf("agent answered version %v, want 2.0", v)
		}
		// One byte over the negotiated size is refused before its body.
		if _, err := c.Write(append(binary.BigEndian.AppendUint32(nil, tt.want+1), 3)); err != nil {
			t.Fatal(err)
		}
		if got := disconnectStatus(t, r); got != 3 {
			t.Errorf("offer %d: frame of %d bytes got status %d, want 3", tt.offer, tt.want+1, got)
		}
	}
}

// supported-versions is a list; 2.0 anywhere in it is accepted.
func TestGuardAcceptsVersionList(t *testing.T) {
	s := serve(t, GuardOptions{}, false)
	c := dial(t, s.addr)
	r := bufio.NewReader(c)
	if _, err := c.Write(helloWith(t, "supported-versions", "1.0, 2.0 ,3.1")); err != nil {
		t.Fatal(err)
	}
	if ans, err := readAnswer(t, r); err != nil || ans.typ != frame.TypeAgentHello {
		t.Fatalf("answer %#x, %v; want AGENT-HELLO", ans.typ, err)
	}
}

// Frames claiming gigabytes made the library allocate what they claimed
// (4 GiB for a length of 0, the claim of each 512 MiB frame) and keep it.
// The guard refuses them from the length alone.
func TestGuardDoesNotAllocateClaimedLength(t *testing.T) {
	s := serve(t, GuardOptions{}, false)
	exchange(t, s.addr) // the agent's own first allocations
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	claims := [][]byte{{0, 0, 0, 0, 1}, {0x20, 0, 0, 0, 3}, {0x20, 0, 0, 0, 3}, {0xff, 0xff, 0xff, 0xff, 1}}
	var wg sync.WaitGroup
	for _, claim := range claims {
		c := dial(t, s.addr)
		wg.Go(func() {
			// The agent closes the connection while we write; the
			// write error is expected.
			_, _ = c.Write(append(claim, make([]byte, 4<<20)...))
		})
		if got := disconnectStatus(t, bufio.NewReader(c)); got != 3 && got != 4 {
			t.Errorf("claim % x: status %d, want 3 or 4", claim[:4], got)
		}
		c.Close()
	}
	wg.Wait()
	exchange(t, s.addr)
	runtime.ReadMemStats(&after)
	// The test's own 4 MiB write buffers are 16 MiB of this.
	if d := after.TotalAlloc - before.TotalAlloc; d > 64<<20 {
		t.Errorf("serving the claims allocated %d MiB", d>>20)
	}
}

// A connection that sends no HELLO, stops in the middle of a frame, or
// stays idle past the idle timeout is closed with status 2 (timeout).
func TestGuardTimeouts(t *testing.T) {
	s := serve(t, GuardOptions{HelloTimeout: 50 * time.Millisecond, FrameTimeout: 50 * time.Millisecond,
		IdleTimeout: 50 * time.Millisecond}, false)
	tests := []struct {
		name   string
		hello  bool
		input  []byte
		reason closeReason
	}{
		{"no HELLO", false, nil, reasonHelloTimeout},
		{"HELLO half sent", false, haproxyHello(t)[:10], reasonHelloTimeout},
		{"idle after HELLO", true, nil, reasonIdleTimeout},
		{"frame half sent", true, []byte{0, 0}, reasonFrameTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := s.closedFor(tt.reason)
			c := dial(t, s.addr)
			r := bufio.NewReader(c)
			if tt.hello {
				handshake(t, c, r)
			}
			if _, err := c.Write(tt.input); err != nil {
				t.Fatal(err)
			}
			if got := disconnectStatus(t, r); got != 2 {
				t.Errorf("status %d, want 2 (timeout)", got)
			}
			if got := s.closedFor(tt.reason) - before; got != 1 {
				t.Errorf("%s closes counted %v, want 1", tt.reason, got)
			}
		})
	}
}

// A NOTIFY held longer than the idle timeout (a pool at zero) keeps its
// connection: it is not idle while the agent owes an answer.
func TestGuardIdleTimeoutSparesHeldNotify(t *testing.T) {
	s := serve(t, GuardOptions{IdleTimeout: 20 * time.Millisecond}, true)
	c := dial(t, s.addr)
	r := bufio.NewReader(c)
	handshake(t, c, r)
	notify, _ := encodeNotify(1)
	if _, err := c.Write(notify); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, s.a, 1)
	time.Sleep(100 * time.Millisecond) // several idle timeouts
	s.a.Update(viewOf(observed([]scaler.Slot{readySlot("slot1", 100)}, nil)))
	ack, err := readAnswer(t, r)
	if err != nil || ack.typ != frame.TypeAgentAck {
		t.Fatalf("answer %#x, %v; want the held NOTIFY's ACK", ack.typ, err)
	}
}

// waitHeld waits until the agent holds n connections in pool x86.
func waitHeld(t *testing.T, a *Agent, n int) {
	t.Helper()
	for a.Held()["x86"] != n {
		time.Sleep(time.Millisecond)
	}
}

// NOTIFYs beyond MaxInFlight on one connection, or MaxInFlightTotal over
// all, wait unread (the library used to start a goroutine for each at
// once) and are answered once earlier ones are.
func TestGuardBoundsFramesInFlight(t *testing.T) {
	s := serve(t, GuardOptions{MaxInFlight: 2, MaxInFlightTotal: 3}, true)
	var conns []net.Conn
	var readers []*bufio.Reader
	for range 2 {
		c := dial(t, s.addr)
		r := bufio.NewReader(c)
		handshake(t, c, r)
		for id := range uint64(5) {
			notify, _ := encodeNotify(id + 1)
			if _, err := c.Write(notify); err != nil {
				t.Fatal(err)
			}
		}
		conns, readers = append(conns, c), append(readers, r)
	}
	waitHeld(t, s.a, 3)
	time.Sleep(50 * time.Millisecond) // room for more to arrive, were they read
	if got := s.a.Held()["x86"]; got != 3 {
		t.Fatalf("agent holds %d NOTIFYs, want MaxInFlightTotal 3", got)
	}
	if got := len(s.a.guard.slots); got != 3 {
		t.Errorf("frames in flight %d, want 3", got)
	}
	s.a.Update(viewOf(observed([]scaler.Slot{readySlot("slot1", 100)}, nil)))
	for i, r := range readers {
		for range 5 {
			if ack, err := readAnswer(t, r); err != nil || ack.typ != frame.TypeAgentAck {
				t.Fatalf("conn %d: answer %#x, %v; want an ACK", i, ack.typ, err)
			}
		}
	}
	for _, c := range conns {
		c.Close()
	}
	for len(s.a.guard.slots) != 0 {
		time.Sleep(time.Millisecond)
	}
}

// stateConn records the guard's eviction hook calls.
type stateConn struct {
	net.Conn
	mu    sync.Mutex
	calls []string
}

func (c *stateConn) Busy() { c.record("busy") }
func (c *stateConn) Idle() { c.record("idle") }
func (c *stateConn) record(s string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, s)
}

func (c *stateConn) seen() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.calls)
}

type stateListener struct {
	net.Listener
	accepted chan *stateConn
}

func (l *stateListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	sc := &stateConn{Conn: c}
	l.accepted <- sc
	return sc, nil
}

// A connection stays "new" until its HELLO, is idle (evictable) while
// nothing is in flight and busy while a frame is read or answered.
func TestGuardEvictionHook(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sl := &stateListener{Listener: ln, accepted: make(chan *stateConn, 1)}
	s := serveOn(t, sl, GuardOptions{}, true)
	c := dial(t, s.addr)
	sc := <-sl.accepted
	r := bufio.NewReader(c)
	hello := haproxyHello(t)
	if _, err := c.Write(hello[:3]); err != nil {
		t.Fatal(err)
	}
	if got := sc.seen(); len(got) != 0 {
		t.Fatalf("hook calls before HELLO %v, want none", got)
	}
	if _, err := c.Write(hello[3:]); err != nil {
		t.Fatal(err)
	}
	if ans, err := readAnswer(t, r); err != nil || ans.typ != frame.TypeAgentHello {
		t.Fatalf("answer %#x, %v", ans.typ, err)
	}
	waitCalls(t, sc, []string{"idle"})
	notify, _ := encodeNotify(1)
	if _, err := c.Write(notify); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, s.a, 1)
	waitCalls(t, sc, []string{"idle", "busy"})
	s.a.Update(viewOf(observed([]scaler.Slot{readySlot("slot1", 100)}, nil)))
	if ack, err := readAnswer(t, r); err != nil || ack.typ != frame.TypeAgentAck {
		t.Fatalf("answer %#x, %v; want an ACK", ack.typ, err)
	}
	waitCalls(t, sc, []string{"idle", "busy", "idle"})
}

func waitCalls(t *testing.T, sc *stateConn, want []string) {
	t.Helper()
	for !slices.Equal(sc.seen(), want) {
		if got := sc.seen(); len(got) > len(want) || !slices.Equal(got, want[:len(got)]) {
			t.Fatalf("hook calls %v, want %v", got, want)
		}
		time.Sleep(time.Millisecond)
	}
}

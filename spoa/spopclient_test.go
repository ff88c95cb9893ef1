package spoa

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/negasus/haproxy-spoe-go/frame"
	"github.com/negasus/haproxy-spoe-go/message"
	"github.com/negasus/haproxy-spoe-go/payload/kv"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// A small SPOP peer for the tests: it writes frames the way HAProxy does
// (encoded with the library's encoder or by hand, not the guard's) and
// reads the agent's answers with the library's KV decoder.

// served is an agent serving on a loopback listener.
type served struct {
	a    *Agent
	reg  *prometheus.Registry
	addr string
}

// serve starts an agent with pool x86 (one ready slot with room for many
// connections, or none with empty) on a loopback listener until the test
// ends.
func serve(tb testing.TB, g GuardOptions, empty bool) *served {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	return serveOn(tb, ln, g, empty)
}

func serveOn(tb testing.TB, ln net.Listener, g GuardOptions, empty bool) *served {
	tb.Helper()
	reg := prometheus.NewRegistry()
	a := New(Options{MaxJobs: map[string]int{"x86": 1 << 20}, Hold: time.Hour, Registerer: reg, Guard: g,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if !empty {
		a.Update(viewOf(observed([]scaler.Slot{readySlot("slot1", 100)}, nil)))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx, ln) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("Serve: %v", err)
		}
	})
	return &served{a: a, reg: reg, addr: ln.Addr().String()}
}

// closedFor is how many connections the guard closed for reason.
func (s *served) closedFor(reason closeReason) float64 {
	var m dto.Metric
	if err := s.a.m.guardClosed.WithLabelValues(reason.String()).Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func dial(tb testing.TB, addr string) net.Conn {
	tb.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// helloKV is a HAPROXY-HELLO as HAProxy 2.6 sends it.
func helloKV() []kv.Item {
	return []kv.Item{
		{Name: "supported-versions", Value: "2.0"},
		{Name: "max-frame-size", Value: uint32(16380)},
		{Name: "capabilities", Value: "pipelining,async"},
		{Name: "engine-id", Value: "1E7D3C4B-2F0A-4B7E-9E3A-5C1D2B3A4F5E"},
	}
}

// encodeKVFrame encodes a HELLO or DISCONNECT with the library's encoder.
func encodeKVFrame(tb testing.TB, typ frame.Type, items []kv.Item) []byte {
	tb.Helper()
	f := frame.NewFrame()
	f.Type = typ
	for _, it := range items {
		f.KV.Add(it.Name, it.Value)
	}
	var buf bytes.Buffer
	if _, err := f.Encode(&buf); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func haproxyHello(tb testing.TB) []byte {
	return encodeKVFrame(tb, frame.TypeHaproxyHello, helloKV())
}

// rawFrame is a frame with the given type, flags and body after the ids
// (stream-id and frame-id 0), its length computed.
func rawFrame(typ byte, flags uint32, payload []byte) []byte {
	body := []byte{typ}
	body = binary.BigEndian.AppendUint32(body, flags)
	body = append(body, 0, 0)
	body = append(body, payload...)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

// answer is one frame from the agent, its KV-LIST decoded for HELLO and
// DISCONNECT.
type answer struct {
	typ  frame.Type
	body []byte
	kv   *kv.KV
}

func (a answer) uint(key string) uint32 {
	v, _ := a.kv.Get(key)
	n, _ := v.(uint32)
	return n
}

// readAnswer reads one frame from the agent.
func readAnswer(tb testing.TB, r *bufio.Reader) (answer, error) {
	tb.Helper()
	b, err := readFrame(r, nil)
	if err != nil {
		return answer{}, err
	}
	ans := answer{typ: frame.Type(b[0]), body: b, kv: kv.NewKV()}
	if ans.typ == frame.TypeAgentHello || ans.typ == frame.TypeAgentDisconnect {
		// type, 4 flag bytes, stream-id and frame-id 0
		if len(b) < 7 {
			tb.Fatalf("agent frame % x too short", b)
		}
		if err := ans.kv.Unmarshal(b[7:]); err != nil {
			tb.Fatalf("agent frame % x: %v", b, err)
		}
	}
	return ans, nil
}

// handshake sends HAProxy's HELLO and reads the AGENT-HELLO.
func handshake(tb testing.TB, c net.Conn, r *bufio.Reader) answer {
	tb.Helper()
	if _, err := c.Write(haproxyHello(tb)); err != nil {
		tb.Fatal(err)
	}
	ans, err := readAnswer(tb, r)
	if err != nil {
		tb.Fatalf("reading AGENT-HELLO: %v", err)
	}
	if ans.typ != frame.TypeAgentHello {
		tb.Fatalf("answer to HELLO is type %#x, want AGENT-HELLO", ans.typ)
	}
	return ans
}

// exchange checks that a fresh connection gets a well-formed HAProxy
// exchange answered: HELLO, then a NOTIFY ACKed with the slot.
func exchange(tb testing.TB, addr string) {
	tb.Helper()
	c := dial(tb, addr)
	r := bufio.NewReader(c)
	handshake(tb, c, r)
	notify, err := encodeNotify(7)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := c.Write(notify); err != nil {
		tb.Fatal(err)
	}
	ack, err := readAnswer(tb, r)
	if err != nil {
		tb.Fatalf("reading ACK: %v", err)
	}
	if ack.typ != frame.TypeAgentAck || !bytes.Contains(ack.body, []byte("slot1")) {
		tb.Fatalf("answer % x; want an ACK setting slot1", ack.body)
	}
	c.Close()
}

// disconnectStatus reads the agent's answers until it closes the
// connection, and returns the status of its AGENT-DISCONNECT (-1 if none).
func disconnectStatus(tb testing.TB, r *bufio.Reader) int {
	tb.Helper()
	status := -1
	for {
		ans, err := readAnswer(tb, r)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isReset(err) {
			return status
		}
		if err != nil {
			tb.Fatalf("reading until close: %v", err)
		}
		if ans.typ == frame.TypeAgentDisconnect {
			status = int(ans.uint("status-code"))
		}
	}
}

// isReset is a connection the agent closed with our unread bytes in its
// buffer, which the kernel answers with a reset.
func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "read"
}

// newRequest is a request carrying one message named name, as the library
// hands one to the handler. It is not taken from the library's pools: a
// pooled request can share its message list with a pooled frame (the
// library's NOTIFY goroutine aliases the two before releasing both), so a
// test building one while a served connection reads frames would race with
// that connection.
func newRequest(name string) (*request.Request, *message.Message) {
	m := &message.Message{Name: name, KV: kv.NewKV()}
	return &request.Request{Messages: &message.Messages{m}}, m
}

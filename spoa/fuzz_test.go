package spoa

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/negasus/haproxy-spoe-go/frame"
	"github.com/negasus/haproxy-spoe-go/payload/kv"
)

// FuzzSPOAConn sends arbitrary bytes, as one TCP connection, to an agent
// served on loopback: through the guard into the SPOE library and the
// handler, the path HAProxy's connections take. A panic anywhere on that
// path kills the fuzzing process. Beyond that, the agent's answers must be
// whole frames in protocol order (AGENT-HELLO first and once, ACKs after
// it, at most one AGENT-DISCONNECT), every connection must end once the input does,
// and every so often a well-formed exchange on a fresh connection must
// still be answered with nothing left in flight.
func FuzzSPOAConn(f *testing.F) {
	s := serve(f, GuardOptions{HelloTimeout: 2 * time.Second, FrameTimeout: 2 * time.Second, IdleTimeout: 2 * time.Second}, false)
	hello := haproxyHello(f)
	notify, err := encodeNotify(1)
	if err != nil {
		f.Fatal(err)
	}
	disc := encodeKVFrame(f, frame.TypeHaproxyDisconnect, []kv.Item{{Name: "status-code", Value: uint32(0)}, {Name: "message", Value: "bye"}})
	cat := func(parts ...[]byte) []byte {
		var out []byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	for _, seed := range [][]byte{
		hello,
		cat(hello, notify),
		cat(hello, notify, notify, disc),
		cat(hello, notify[:len(notify)-3]),
		helloWith(f, "healthcheck", true),
		[]byte("\x00\x00\x00\x02\x01\x00"),
		[]byte("\x00\x00\x00\x00\x01"),
		[]byte("\x20\x00\x00\x00\x03"),
		[]byte("\x00\x00\x00\x06\x01\x00\x00\x00\x01\xf0"),
		helloWith(f, "healthcheck", "yes"),
		helloWith(f, "max-frame-size", "16380"),
		helloWith(f, "supported-versions", "99.0"),
		rawFrame(1, fin, []byte("\x01a\x06\x7f\x00")),
		cat(hello, rawFrame(3, fin, []byte("\xc8abc"))),
		cat(hello, rawFrame(3, fin, []byte("\x03abc"))),
		cat(hello, rawFrame(3, fin, []byte("\x03abc\x01\x03src\x06\x7f"))),
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
	} {
		f.Add(seed)
	}
	var runs atomic.Int64
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 64<<10 {
			return // bounds the time and memory of one input
		}
		c := dial(t, s.addr)
		go func() {
			// The agent may close before taking it all.
			_, _ = c.Write(data)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
		checkAnswers(t, bufio.NewReader(c))
		c.Close()
		if runs.Add(1)%50 == 0 {
			exchange(t, s.addr)
			for len(s.a.guard.slots) != 0 {
				time.Sleep(time.Millisecond)
			}
		}
	})
}

// checkAnswers reads the agent's frames until it closes the connection and
// checks their order. ACKs may follow the AGENT-DISCONNECT that answers
// HAProxy's DISCONNECT: the library answers it at once and still lets the
// NOTIFYs in flight finish.
func checkAnswers(t *testing.T, r *bufio.Reader) {
	t.Helper()
	var seen []frame.Type
	for {
		var n [4]byte
		_, err := io.ReadFull(r, n[:])
		if errors.Is(err, io.EOF) || isReset(err) {
			break
		}
		if err != nil {
			t.Fatalf("answer cut inside its length: %v", err)
		}
		size := binary.BigEndian.Uint32(n[:])
		if size == 0 || size > DefaultMaxFrameSize {
			t.Fatalf("answer of %d bytes", size)
		}
		body := make([]byte, size)
		if _, err := io.ReadFull(r, body); err != nil {
			t.Fatalf("answer cut after %d of %d bytes: %v", len(body), size, err)
		}
		seen = append(seen, frame.Type(body[0]))
	}
	disconnects := 0
	for i, typ := range seen {
		switch {
		case typ == frame.TypeAgentHello && i == 0:
		case typ == frame.TypeAgentAck && i > 0 && seen[0] == frame.TypeAgentHello:
		case typ == frame.TypeAgentDisconnect && disconnects == 0:
			disconnects++
		default:
			t.Fatalf("answers %v: type %#x at %d is out of order", seen, typ, i)
		}
	}
}

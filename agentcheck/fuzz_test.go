package agentcheck

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// fuzzSlots knows x86/slot1 (ready), x86/slot2 (booting, with an instance id
// full of characters HAProxy must never see) and fails for pool "broken".
type fuzzSlots struct{}

func (fuzzSlots) Slot(_ context.Context, key scaler.SlotKey) (scaler.Slot, error) {
	switch {
	case key.Pool == "broken":
		return scaler.Slot{}, errors.New("store down")
	case key == scaler.SlotKey{Pool: "x86", Slot: "slot1"}:
		return scaler.Slot{Pool: "x86", Name: "slot1", State: scaler.Ready, Weight: 100, InstanceID: "i-0abc", InstanceType: "m7i.xlarge", Market: "spot"}, nil
	case key == scaler.SlotKey{Pool: "x86", Slot: "slot2"}:
		return scaler.Slot{Pool: "x86", Name: "slot2", State: scaler.Booting, InstanceID: "i-1\r\nmaint #x,y\x00\xff"}, nil
	}
	return scaler.Slot{}, scaler.ErrNotFound
}

// checkReplyLine fails unless reply is one line HAProxy reads as one agent
// answer: printable ASCII, no line end, bounded.
func checkReplyLine(t *testing.T, what, reply string) {
	t.Helper()
	if len(reply) > MaxLine {
		t.Fatalf("%s: reply of %d bytes, want at most %d: %q", what, len(reply), MaxLine, reply)
	}
	for _, c := range []byte(reply) {
		if c < 0x20 || c >= 0x7f {
			t.Fatalf("%s: reply %q has byte %#x; want printable ASCII on one line", what, reply, c)
		}
	}
}

// FuzzIdentityLine sends arbitrary bytes as the identity line: the
// responder never panics and answers with exactly one line ending in "\n"
// (or, only when the store fails, closes without answering). The peer sends
// its bytes and closes its side for writing, so a line without "\n" ends
// on end of file rather than on the read timeout (TestHandle covers that):
// no goroutine and no clock, so an input is handled the same way however
// busy the machine is.
func FuzzIdentityLine(f *testing.F) {
	for _, s := range []string{
		"x86/slot1\n", "x86/slot1\r\n", "x86/slot2\n", "x86/slot9\n", "arm/slot1\n", "broken/slot1\n",
		"\n", "\r\n", "x86\n", "/\n", "x86/\n", "/slot1\n", "x86/slot1/extra\n", "x86/slot1", "x86/slot1\rmore\n",
		"x86/slot1\nx86/slot2\n", strings.Repeat("a", MaxLine-1) + "\n", strings.Repeat("a", MaxLine) + "\n",
		strings.Repeat("x", 3*MaxLine), "\x00\xff/\x80\n", "x86/slot1 #up\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4*MaxLine {
			t.Skip()
		}
		s := New(fuzzSlots{}, map[string]int{"x86": 4, "broken": 1}, nil, nil, nil)
		conn := &sentConn{in: bytes.NewReader(data)}
		s.handle(context.Background(), conn)
		if !conn.closed {
			t.Fatalf("identity %q: handle returned without closing the connection", data)
		}
		checkAnswer(t, data, conn.out.Bytes())
	})
}

// checkAnswer fails unless out is what the responder must answer to a peer
// that sent data and closed its side for writing.
func checkAnswer(t *testing.T, data, out []byte) {
	t.Helper()
	line, _, hasLF := bytes.Cut(data, []byte("\n"))
	key := string(bytes.TrimSuffix(line, []byte("\r")))
	if len(out) == 0 {
		if !hasLF || !strings.HasPrefix(key, "broken/") || len(line) >= MaxLine {
			t.Fatalf("identity %q: no reply; only a store failure may leave HAProxy without one", data)
		}
		return
	}
	if bytes.IndexByte(out, '\n') != len(out)-1 {
		t.Fatalf("identity %q: reply %q is not exactly one line ending in \\n", data, out)
	}
	reply := string(out[:len(out)-1])
	checkReplyLine(t, "identity "+string(data), reply)
	if hasLF && len(line) < MaxLine && key == "x86/slot1" {
		if !strings.HasPrefix(reply, "up ready 100% maxconn:4") {
			t.Fatalf("identity %q: reply %q, want the ready slot's", data, reply)
		}
	} else if hasLF && len(line) < MaxLine && key == "x86/slot2" {
		if !strings.HasPrefix(reply, "down #") {
			t.Fatalf("identity %q: reply %q, want the booting slot's", data, reply)
		}
	} else if reply != "maint" {
		t.Fatalf("identity %q: reply %q, want maint for an identity that names no slot", data, reply)
	}
}

// FuzzReply builds replies from arbitrary slot fields: always one line of
// printable ASCII, whatever the store holds.
func FuzzReply(f *testing.F) {
	f.Add("ready", "i-0abc", "m7i.xlarge", "spot", 100, 4)
	f.Add("booting", "i-1\nmaint", "", "", 0, 0)
	f.Add("binding", "#,\r\x00", "t\x7f", "on-demand", -5, -1)
	f.Add("ready", strings.Repeat("i", 300), strings.Repeat("t", 300), strings.Repeat("m", 300), 1<<30, 1<<30)
	f.Add("draining", "", "", "", 0, 1)
	f.Add("bogus", "", "", "", 0, 1)
	f.Fuzz(func(t *testing.T, state, id, itype, market string, weight, maxJobs int) {
		if len(id)+len(itype)+len(market)+len(state) > 4096 {
			t.Skip()
		}
		sl := scaler.Slot{Pool: "x86", Name: "slot1", State: scaler.SlotState(state), InstanceID: id, InstanceType: itype, Market: market, Weight: weight}
		reply := Reply(sl, maxJobs)
		if reply == "" {
			t.Fatalf("Reply(%+v, %d) is empty", sl, maxJobs)
		}
		checkReplyLine(t, "slot "+state, reply)
	})
}

// sentConn is the responder's side of a connection whose peer sent in and
// then closed its side for writing: reads give in, then io.EOF. What the
// responder writes is kept in out.
type sentConn struct {
	in     *bytes.Reader
	out    bytes.Buffer
	closed bool
}

func (c *sentConn) Read(p []byte) (int, error) {
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.in.Read(p)
}

func (c *sentConn) Write(p []byte) (int, error) {
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.out.Write(p)
}

func (c *sentConn) Close() error {
	c.closed = true
	return nil
}

func (c *sentConn) LocalAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5600}
}

func (c *sentConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}

func (c *sentConn) SetDeadline(time.Time) error      { return nil }
func (c *sentConn) SetReadDeadline(time.Time) error  { return nil }
func (c *sentConn) SetWriteDeadline(time.Time) error { return nil }

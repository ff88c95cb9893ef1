package agentcheck

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// connServer is one responder on a loopback listener, shared by every input
// of FuzzAgentConn (started once per process).
var connServer struct {
	once sync.Once
	addr string
	err  error
}

func fuzzAddr(t *testing.T) string {
	connServer.once.Do(func() {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			connServer.err = err
			return
		}
		connServer.addr = ln.Addr().String()
		s := New(fuzzSlots{}, map[string]int{"x86": 4, "broken": 1}, nil, nil, nil)
		// Lives as long as the fuzzing process; the listener goes with it.
		go s.Serve(context.Background(), ln)
	})
	if connServer.err != nil {
		t.Fatal(connServer.err)
	}
	return connServer.addr
}

// FuzzAgentConn sends arbitrary bytes to the responder the daemon runs: a
// real listener with its connection cap and the real read, cut into writes
// of a size the input chooses (a line may arrive in pieces). Whatever comes,
// the peer gets at most one reply line, the one FuzzIdentityLine expects,
// and a check sent right after on a new connection is answered: no input
// breaks the listener.
func FuzzAgentConn(f *testing.F) {
	for _, s := range []string{
		"x86/slot1\n", "x86/slot2\r\n", "nope\n", "", "x86/slot1", "\x00\x00\x00\x02\x01\x00",
		strings.Repeat("x", 3*MaxLine), "x86/slot1\nx86/slot2\n", "broken/slot1\n",
	} {
		f.Add(uint8(0), []byte(s))
		f.Add(uint8(3), []byte(s))
	}
	f.Fuzz(func(t *testing.T, chunk uint8, data []byte) {
		// Bounded like a line HAProxy could send, several times over.
		data = data[:min(len(data), 4*MaxLine)]
		addr := fuzzAddr(t)
		out, err := exchange(addr, data, int(chunk))
		switch {
		case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE):
			// The responder closed with unread input (bytes after the
			// line, or a line too long): the kernel may then drop the
			// reply. Only such inputs may end that way.
			line, rest, hasLF := bytes.Cut(data, []byte("\n"))
			if (hasLF && len(rest) == 0 || !hasLF) && len(line) < MaxLine {
				t.Fatalf("identity %q: connection reset without unread input: %v", data, err)
			}
		case err != nil:
			t.Fatalf("identity %q: %v", data, err)
		default:
			checkAnswer(t, data, out)
		}
		got, err := exchange(addr, []byte("x86/slot1\n"), 0)
		if err != nil || !strings.HasPrefix(string(got), "up ready 100% maxconn:4") {
			t.Fatalf("after identity %q, a check got %q, %v", data, got, err)
		}
	})
}

// exchange sends data in writes of chunk bytes (0: one write), closes its
// side for writing and reads the answer to the end.
func exchange(addr string, data []byte, chunk int) ([]byte, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	// Only a hang trips this: the responder answers at once.
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	if chunk <= 0 {
		chunk = len(data)
	}
	for len(data) > 0 {
		n := min(chunk, len(data))
		if _, err := c.Write(data[:n]); err != nil {
			return nil, err
		}
		data = data[n:]
	}
	_ = c.(*net.TCPConn).CloseWrite()
	return io.ReadAll(c)
}

package e2e

import (
	be "encoding/binary"
	"net"
	"time"
)

// hostileFrames are SPOP byte sequences that once killed the daemon or made
// it allocate gigabytes (issue figures): a frame too short for its header,
// a zero length, a 512 MiB claim, a HELLO body cut inside a varint, a HELLO
// whose max-frame-size is a string.
var hostileFrames = [][]byte{
	[]byte("\x00\x00\x00\x02\x01\x00"),
	[]byte("\x00\x00\x00\x00"),
	[]byte("\x20\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00"),
	[]byte("\x00\x00\x00\x08\x01\x00\x00\x00\x01\x00\x00\xf0"),
	spopFrame(0x01, "\x0emax-frame-size\x08\x0416384"),
}

// spopFrame frames a payload of the given type with FIN set and stream and
// frame id 0.
func spopFrame(typ byte, payload string) []byte {
	body := append([]byte{typ, 0, 0, 0, 1, 0, 0}, payload...)
	return append(be.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

// hostileTraffic plays a local attacker for one to three seconds: malformed
// SPOP frames and random bytes to the daemon's SPOE port, idle connections
// to its agent-check port, requests cut off inside their headers to its
// API socket and metrics port. Everything it opened is closed at the end;
// the invariants, HAProxy's view and the clients' work must not notice.
func (c *chaos) hostileTraffic() {
	end := time.Now().Add(time.Duration(1000+c.rng.IntN(2000)) * time.Millisecond)
	var held []net.Conn
	defer func() {
		for _, conn := range held {
			conn.Close()
		}
	}()
	dial := func(network, addr string) net.Conn {
		conn, err := net.DialTimeout(network, addr, time.Second)
		if err != nil {
			return nil
		}
		held = append(held, conn)
		_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
		return conn
	}
	for time.Now().Before(end) {
		if conn := dial("tcp", c.daemonSPOA); conn != nil {
			var b []byte
			if c.rng.IntN(4) == 0 {
				b = make([]byte, 1+c.rng.IntN(64))
				for i := range b {
					b[i] = byte(c.rng.IntN(256))
				}
			} else {
				b = hostileFrames[c.rng.IntN(len(hostileFrames))]
			}
			_, _ = conn.Write(b)
		}
		dial("tcp", c.daemonAgent)
		if conn := dial("unix", c.sock); conn != nil {
			_, _ = conn.Write([]byte("GET /v1/status HTTP/1.1\r\nHost: x\r\n"))
		}
		if conn := dial("tcp", c.metrics); conn != nil {
			_, _ = conn.Write([]byte("GET /metrics HTTP/1.1\r\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

package spoa

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

// BenchmarkHostileConnections measures what hostile peers cost the agent:
// RSS and goroutines after 1,000 connections that send nothing, 1,000 that
// complete HELLO and then stay idle (goroutines again once the silent ones
// have met the HELLO timeout, 1s here), and two that claim 512 MiB frames and
// try to send 200 MB each. Client and agent share the process, so the
// figures include the client's sockets. docs/reliability.md quotes them;
// run with -benchtime 1x.
func BenchmarkHostileConnections(b *testing.B) {
	for b.Loop() {
		s := serve(b, GuardOptions{HelloTimeout: time.Second}, false)
		base := rssKiB(b)
		g0 := runtime.NumGoroutine()
		var conns []net.Conn
		for range 1000 {
			conns = append(conns, dial(b, s.addr))
		}
		for range 1000 {
			c := dial(b, s.addr)
			handshake(b, c, bufio.NewReader(c))
			conns = append(conns, c)
		}
		b.ReportMetric(float64(rssKiB(b)-base)/1024, "idle-rss-MiB")
		b.ReportMetric(float64(runtime.NumGoroutine()-g0), "idle-goroutines")
		for _, c := range conns[:1000] {
			_, _ = io.Copy(io.Discard, c) // until the HELLO timeout closes it
		}
		time.Sleep(10 * time.Millisecond) // the library's goroutines end after the close
		b.ReportMetric(float64(runtime.NumGoroutine()-g0), "after-hello-timeout-goroutines")
		for _, c := range conns {
			c.Close()
		}
		before := rssKiB(b)
		var wg sync.WaitGroup
		chunk := make([]byte, 1<<20)
		for range 2 {
			c := dial(b, s.addr)
			wg.Go(func() {
				if _, err := c.Write([]byte{0x20, 0, 0, 0, 3}); err != nil {
					return
				}
				for range 200 {
					if _, err := c.Write(chunk); err != nil {
						return // the agent closed the connection
					}
				}
			})
		}
		wg.Wait()
		runtime.GC()
		b.ReportMetric(float64(rssKiB(b)-before)/1024, "oversized-rss-MiB")
		exchange(b, s.addr)
	}
}

// rssKiB is the process's resident set size.
func rssKiB(tb testing.TB) int {
	tb.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		tb.Skip("no /proc/self/status:", err)
	}
	for line := range bytes.Lines(status) {
		if rest, ok := bytes.CutPrefix(line, []byte("VmRSS:")); ok {
			n, err := strconv.Atoi(string(bytes.TrimSpace(bytes.TrimSuffix(bytes.TrimSpace(rest), []byte("kB")))))
			if err != nil {
				tb.Fatal(err)
			}
			return n
		}
	}
	tb.Fatal("no VmRSS in /proc/self/status")
	return 0
}

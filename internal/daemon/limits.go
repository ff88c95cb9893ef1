package daemon

import (
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/connlimit"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/metrics"
)

// Connection caps, per listener. Each listener has its own, so a process
// filling one (the TCP API, say) leaves the others to HAProxy and the
// operator; together they stay far below the file descriptors the daemon
// has (checked at start). A full listener closes the oldest connection that
// has sent no request (internal/connlimit).
const (
	// maxSocketConns: autoscalerctl and local tools.
	maxSocketConns = 64
	// maxAPIConns: Buildbot holds one long poll per gated build waiting for
	// a builder, and one heartbeat connection per running build at most.
	maxAPIConns = 1024
	// maxMetricsConns: a scraper or two.
	maxMetricsConns = 16
	// maxSPOAConns: HAProxy opens SPOE connections as its load needs, a
	// few per thread; each carries up to max-waiting-frames requests.
	maxSPOAConns = 512
)

// metricsWriteTimeout bounds a scrape, from its request to its last byte.
const metricsWriteTimeout = 30 * time.Second

// fdsBeyondListeners is what the daemon needs besides its listeners: the
// database, HAProxy's runtime socket, EC2 and Tailscale clients, logs.
const fdsBeyondListeners = 256

// reliefAfter is how long the listeners must have had room again before the
// daemon gives the memory a flood of connections made it take back to the
// system.
const reliefAfter = 5 * time.Second

// listeners caps each listener of the daemon and reports them as metrics.
type listeners struct {
	m    *metrics.Listeners
	sum  int
	poke chan struct{} // a listener was full, or drained after being full
	done chan struct{}
}

// newListeners starts the relief: a flood leaves the heap and goroutine
// stacks it grew to the runtime, which keeps them until its next collection
// (up to two minutes when nothing allocates) and releases them slowly
// after: tens of MiB of RSS for a daemon that needs a few. Once a full
// listener has emptied to half and reliefAfter has passed without one being
// full again, they are handed back at once.
func newListeners(clk clock.Clock) *listeners {
	ls := &listeners{m: metrics.NewListeners(), poke: make(chan struct{}, 1), done: make(chan struct{})}
	go ls.relieve(clk)
	return ls
}

func (ls *listeners) relieve(clk clock.Clock) {
	for {
		select {
		case <-ls.poke:
		case <-ls.done:
			return
		}
		// Wait until reliefAfter passes without another poke.
		for quiet := false; !quiet; {
			t := clk.NewTimer(reliefAfter)
			select {
			case <-ls.poke:
				t.Stop()
			case <-t.C():
				quiet = true
			case <-ls.done:
				t.Stop()
				return
			}
		}
		// Two collections: buffers pooled by net/http and the SPOE
		// library survive the first one in sync.Pool's victim cache.
		runtime.GC()
		debug.FreeOSMemory()
	}
}

func (ls *listeners) pokeRelief() {
	select {
	case ls.poke <- struct{}{}:
	default:
	}
}

// limit caps ln at n connections, reported as name.
func (ls *listeners) limit(name string, ln net.Listener, n int) *connlimit.Listener {
	l := connlimit.New(ln, n)
	l.OnFull(ls.pokeRelief)
	l.OnDrained(ls.pokeRelief)
	ls.m.Add(name, l)
	ls.sum += n
	return l
}

// stop ends the relief.
func (ls *listeners) stop() { close(ls.done) }

// limitedHTTP returns an HTTP server for a capped listener: a connection whose
// request reached h is not evicted while it is answered.
func limitedHTTP(h http.Handler) *http.Server {
	srv := newHTTPServer(connlimit.Mark(h))
	connlimit.Serve(srv)
	return srv
}

// checkFDs warns when the process may open fewer files than its listeners
// can hold: a full listener would then fail others with "too many open
// files" instead of making room.
func checkFDs(log *slog.Logger, sum int) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return
	}
	if need := uint64(sum + fdsBeyondListeners); rl.Cur < need {
		log.Warn("the open-file limit is below what the listeners may hold; raise LimitNOFILE",
			"limit", rl.Cur, "need", need)
	}
}

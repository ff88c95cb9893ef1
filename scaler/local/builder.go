package local

import (
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// Banner is the SSH identification line a stand-in sends on every
// connection.
const Banner = "SSH-2.0-nba_standin\r\n"

// BuilderMain is the stand-in builder process (the daemon binary's
// "local-builder" subcommand; args exclude the program and subcommand name).
// It listens at once on --listen, writes the address it got atomically to
// --addr-file, waits --boot-delay, then greets every connection with an SSH
// banner and holds it open, reading, until the peer closes, so a load
// balancer sees real sessions. --marker only has to be on the command line:
// it lets the provider recognise the process in /proc/<pid>/cmdline. It
// returns 0 after SIGTERM or SIGINT, 2 for bad flags, 1 for other errors.
func BuilderMain(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	fs := flag.NewFlagSet("local-builder", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on, ip:port (port 0 picks a free port)")
	addrFile := fs.String("addr-file", "", "file to write the address actually listened on to")
	bootDelay := fs.Duration("boot-delay", 0, "how long to wait before serving the SSH banner")
	marker := fs.String("marker", "", "instance id, for the provider to recognise this process")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("marker", *marker)

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Error("listen", "err", err)
		return 1
	}
	defer ln.Close()
	addr := ln.Addr().String()
	if *addrFile != "" {
		if err := writeFileAtomic(*addrFile, []byte(addr+"\n"), 0o640); err != nil {
			log.Error("write address file", "err", err)
			return 1
		}
	}
	log.Info("stand-in listening", "addr", addr, "boot_delay", *bootDelay)

	if *bootDelay > 0 {
		if clock.Sleep(ctx, clock.Real{}, *bootDelay) != nil {
			log.Info("stand-in stopped while booting")
			return 0
		}
	}
	log.Info("stand-in serving")
	if err := serveBanner(ctx, ln, log); err != nil {
		log.Error("serve", "err", err)
		return 1
	}
	log.Info("stand-in stopped")
	return 0
}

// serveBanner accepts connections on ln until ctx ends, then closes ln and
// every open connection and waits for their handlers. It returns an error
// only when ln fails for good before ctx ends.
func serveBanner(ctx context.Context, ln net.Listener, log *slog.Logger) error {
	var (
		mu     sync.Mutex
		conns  = map[net.Conn]bool{}
		wg     sync.WaitGroup
		closed bool
	)
	shut := func() {
		mu.Lock()
		defer mu.Unlock()
		if closed {
			return
		}
		closed = true
		_ = ln.Close()
		for c := range conns {
			_ = c.Close()
		}
	}
	stopWatch := context.AfterFunc(ctx, shut)
	defer func() {
		stopWatch()
		shut()
		wg.Wait()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			log.Warn("accept", "err", err) // e.g. out of file descriptors
			_ = clock.Sleep(ctx, clock.Real{}, 50*time.Millisecond)
			continue
		}
		mu.Lock()
		if closed {
			mu.Unlock()
			_ = c.Close()
			return nil
		}
		conns[c] = true
		wg.Add(1)
		mu.Unlock()
		go func() {
			defer wg.Done()
			defer func() {
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
				_ = c.Close()
			}()
			if _, err := io.WriteString(c, Banner); err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, c) // until the peer closes
		}()
	}
}

package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// launchStandin starts the stand-in process of r, records its pid, waits for
// the address it listens on and records that. On failure the process is
// stopped and r recorded as terminated.
func (p *Provider) launchStandin(ctx context.Context, r *record, pl pool) (err error) {
	addrFile := p.addrPath(r.ID)
	logFile, err := os.OpenFile(p.logPath(r.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		p.failLaunch(r, err)
		return fmt.Errorf("local provider: %w", err)
	}
	args := slices.Concat(p.builderCmd[1:], []string{
		"--listen", net.JoinHostPort(pl.Address, "0"),
		"--addr-file", addrFile,
		"--boot-delay", pl.BootDelay.String(),
		"--marker", r.Marker,
	})
	// exec.Command, not CommandContext: the instance must outlive ctx.
	cmd := exec.Command(p.builderCmd[0], args...)
	cmd.Env = append(os.Environ(), p.builderEnv...)
	cmd.Stdout = logFile // a file, not a pipe: no copier goroutine, no SIGPIPE when the daemon dies
	cmd.Stderr = logFile
	// Its own process group: a signal to the daemon's group (terminal ^C,
	// a supervisor killing the daemon) does not reach the instance.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = p.start(cmd)
	_ = logFile.Close()
	if err != nil {
		p.failLaunch(r, err)
		return fmt.Errorf("local provider: start stand-in: %w", err)
	}
	pid := cmd.Process.Pid
	// Reap the child whenever it exits (after Terminate, or on a crash) so
	// no zombie remains; Wait only ever reaps this one pid.
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	p.mu.Lock()
	p.children[r.ID] = exited
	p.mu.Unlock()

	defer func() {
		if err == nil {
			return
		}
		if serr := stopProcess(pid, r.Marker); serr != nil {
			// Leave the record live: List shows the process and the
			// reconciler terminates it.
			p.log.Error("local provider: cannot stop stand-in of failed launch",
				"instance", r.ID, "pid", pid, "err", serr)
			return
		}
		p.failLaunch(r, err)
	}()

	r.PID = pid
	p.mu.Lock()
	err = p.writeRecord(*r)
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("local provider: write record: %w", err)
	}

	addr, err := waitAddrFile(ctx, addrFile, exited)
	if err != nil {
		if tail := lastLines(readFileTail(p.logPath(r.ID)), 20); tail != "" {
			err = fmt.Errorf("%w; stand-in log:\n%s", err, tail)
		}
		return fmt.Errorf("local provider: stand-in %s (pid %d): %w", r.ID, pid, err)
	}
	r.Address = addr
	p.mu.Lock()
	err = p.writeRecord(*r)
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("local provider: write record: %w", err)
	}
	return nil
}

// waitAddrFile polls path until it holds an address, bounded by ctx and
// addrWait, and fails early when exited is closed.
func waitAddrFile(ctx context.Context, path string, exited <-chan struct{}) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, addrWait)
	defer cancel()
	t := osClock.NewTicker(pollInterval)
	defer t.Stop()
	for {
		if addr, err := readAddrFile(path); err == nil {
			return addr, nil
		}
		select {
		case <-exited:
			if addr, err := readAddrFile(path); err == nil {
				return addr, errors.New("exited right after reporting its address")
			}
			return "", errors.New("exited before reporting its address")
		case <-ctx.Done():
			return "", fmt.Errorf("no address after %s: %w", addrWait, ctx.Err())
		case <-t.C():
		}
	}
}

// osClock times waits on other processes: they run on the wall clock
// whatever the provider's clock says, as a manual clock cannot hurry them.
var osClock clock.Clock = clock.Real{}

func readAddrFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	addr := strings.TrimSpace(string(b))
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", fmt.Errorf("address file %s: %w", path, err)
	}
	return addr, nil
}

// readFileTail returns at most the last 64 KiB of a file, or "".
func readFileTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 64 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > max {
		_, _ = f.Seek(fi.Size()-max, 0)
	}
	b := make([]byte, max)
	n, _ := f.Read(b)
	return string(b[:n])
}

type procStatus int

const (
	procGone   procStatus = iota // no such process, or the pid belongs to someone else now
	procAlive                    // running, with our marker in its cmdline
	procZombie                   // exited, not yet reaped by its parent
)

// inspect reports whether pid is still the process whose cmdline contains
// marker. A zombie's cmdline is empty, so a zombie is never alive.
func inspect(pid int, marker string) procStatus {
	if pid <= 0 || marker == "" {
		return procGone
	}
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return procGone
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return procGone
	}
	if bytes.Contains(cmdline, []byte(marker)) {
		return procAlive
	}
	if len(cmdline) == 0 && isZombie(pid) {
		return procZombie
	}
	return procGone
}

func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// "pid (comm) S ...": comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] == 'Z'
}

// stopProcess sends SIGTERM to the process group of pid, waits up to
// termGrace for the process to go, then sends SIGKILL and waits up to
// killWait. It only signals while pid still carries marker, so a reused pid
// is never hit. A process that is gone, or dead but not yet reaped, is
// stopped.
func stopProcess(pid int, marker string) error {
	if inspect(pid, marker) != procAlive {
		return nil
	}
	signalGroup(pid, syscall.SIGTERM)
	if waitGone(pid, marker, termGrace) {
		return nil
	}
	if inspect(pid, marker) == procAlive {
		signalGroup(pid, syscall.SIGKILL)
	}
	if waitGone(pid, marker, killWait) {
		return nil
	}
	if inspect(pid, marker) == procAlive {
		return fmt.Errorf("process %d survived SIGKILL", pid)
	}
	return nil // a zombie: dead, its parent has not reaped it yet
}

// signalGroup signals the process group led by pid (stand-ins are started
// with Setpgid), falling back to the process alone.
func signalGroup(pid int, sig syscall.Signal) {
	if err := syscall.Kill(-pid, sig); err != nil {
		_ = syscall.Kill(pid, sig)
	}
}

// waitGone polls until pid no longer is our process (reaped, or reused) or
// d has passed; it reports whether it went.
func waitGone(pid int, marker string, d time.Duration) bool {
	deadline := osClock.Now().Add(d)
	for {
		if inspect(pid, marker) == procGone {
			return true
		}
		if osClock.Now().After(deadline) {
			return false
		}
		_ = clock.Sleep(context.Background(), osClock, pollInterval)
	}
}

// lastLines returns the last n non-empty lines of s, joined by newlines.
func lastLines(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimRight(l, "\r \t"); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

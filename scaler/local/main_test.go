package local

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// The test binary doubles as the stand-in builder and as a throwaway
// "daemon" that launches one instance and waits to be killed.
const (
	envBuilder  = "NBA_LOCAL_BUILDER"
	envDaemon   = "NBA_LOCAL_TEST_DAEMON" // value: state directory
	builderFlag = envBuilder + "=1"
)

func TestMain(m *testing.M) {
	if os.Getenv(envBuilder) == "1" {
		os.Exit(BuilderMain(stripTestFlags(os.Args[1:])))
	}
	if dir := os.Getenv(envDaemon); dir != "" {
		os.Exit(testDaemon(dir))
	}
	os.Exit(m.Run())
}

// stripTestFlags drops -test.* flags in case a runner adds them.
func stripTestFlags(args []string) []string {
	var out []string
	for _, a := range args {
		if strings.HasPrefix(a, "-test.") || strings.HasPrefix(a, "--test.") {
			continue
		}
		out = append(out, a)
	}
	return out
}

// testDaemon launches one stand-in, prints its id, and sleeps until killed
// (at most 60s).
func testDaemon(dir string) int {
	p, err := New(Options{
		Cluster:        "killed",
		StateDir:       dir,
		Pools:          map[string]PoolOptions{"x86": {Address: "127.0.0.1"}},
		BuilderCommand: []string{selfPath()},
		BuilderEnv:     []string{builderFlag},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	inst, err := p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l-killed"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(inst.ID)
	time.Sleep(60 * time.Second)
	return 0
}

func selfPath() string {
	if exe, err := os.Executable(); err == nil {
		return exe
	}
	p, _ := filepath.Abs(os.Args[0])
	return p
}

func newFakeClock() *clocktest.Clock {
	return clocktest.New(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
}

func standinOptions(t *testing.T, cluster, dir string, pools map[string]PoolOptions) Options {
	t.Helper()
	if pools == nil {
		pools = map[string]PoolOptions{"x86": {Address: "127.0.0.1"}}
	}
	return Options{
		Cluster:        cluster,
		StateDir:       dir,
		Pools:          pools,
		BuilderCommand: []string{selfPath()},
		BuilderEnv:     []string{builderFlag},
		Logger:         testLogger(t),
	}
}

func newProvider(t *testing.T, opts Options) *Provider {
	t.Helper()
	p, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return p
}

// launch launches an instance and makes sure its process is stopped by PID
// when the test ends, whatever happens to the provider.
func launch(t *testing.T, ctx context.Context, p *Provider, req scaler.LaunchRequest) scaler.Instance {
	t.Helper()
	inst, err := p.Launch(ctx, req)
	if err != nil {
		t.Fatalf("Launch(%+v): %v", req, err)
	}
	r, err := p.readRecord(inst.ID)
	if err != nil {
		t.Fatalf("read record of %s: %v", inst.ID, err)
	}
	if r.PID != 0 {
		killOnCleanup(t, r.PID, r.Marker)
	}
	return inst
}

// killOnCleanup SIGKILLs pid (and its group) at the end of the test if it
// still is the process carrying marker.
func killOnCleanup(t *testing.T, pid int, marker string) {
	t.Helper()
	t.Cleanup(func() {
		if inspect(pid, marker) != procAlive {
			return
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		if !waitGoneOrZombie(pid, marker) {
			t.Errorf("cleanup: process %d still alive %v after SIGKILL", pid, testwait.Bound)
		}
	})
}

// waitGoneOrZombie waits until pid is no longer a live process with marker
// (a zombie counts as gone: it is dead, its parent may be a non-reaping
// init) and reports whether it went. The bound (testwait.Bound) is a hang
// guard: only a process that was never stopped reaches it.
func waitGoneOrZombie(pid int, marker string) bool {
	return testwait.Poll(testwait.Bound, func() bool { return inspect(pid, marker) != procAlive })
}

// readBanner connects to addr and returns the first line it sends.
func readBanner(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, testwait.Bound)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(testwait.Bound)) // a hang guard
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read banner from %s: %v (got %q)", addr, err, line)
	}
	return line
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func findInstance(t *testing.T, list []scaler.Instance, id string) (scaler.Instance, bool) {
	t.Helper()
	for _, inst := range list {
		if inst.ID == id {
			return inst, true
		}
	}
	return scaler.Instance{}, false
}

func mustList(t *testing.T, p *Provider) []scaler.Instance {
	t.Helper()
	list, err := p.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	return list
}

func isESRCH(err error) bool { return errors.Is(err, syscall.ESRCH) }

// exitCode waits for cmd to exit and returns its exit code. The bound
// (testwait.Bound) is a hang guard.
func exitCode(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatalf("wait: %v", err)
		}
		return 0
	case <-time.After(testwait.Bound):
		t.Fatalf("process %d still running %s later: stuck", cmd.Process.Pid, testwait.Bound)
		return -1
	}
}

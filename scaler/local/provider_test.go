package local

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

func TestNewRejectsBadOptions(t *testing.T) {
	dir := t.TempDir()
	builder := []string{selfPath()}
	tests := []struct {
		name string
		opts Options
		want string // substring of the error
	}{
		{"no cluster", Options{StateDir: dir, Pools: map[string]PoolOptions{"a": {}}, BuilderCommand: builder}, "cluster"},
		{"no state dir", Options{Cluster: "c", Pools: map[string]PoolOptions{"a": {}}, BuilderCommand: builder}, "state directory"},
		{"no pools", Options{Cluster: "c", StateDir: dir, BuilderCommand: builder}, "no pools"},
		{"no builder command", Options{Cluster: "c", StateDir: dir, Pools: map[string]PoolOptions{"a": {}}}, "builder command"},
		{"not loopback", Options{Cluster: "c", StateDir: dir, Pools: map[string]PoolOptions{"a": {Address: "192.0.2.1"}}, BuilderCommand: builder}, "loopback"},
		{"launch without terminate", Options{Cluster: "c", StateDir: dir, Pools: map[string]PoolOptions{"a": {LaunchCommand: "echo"}}}, "go together"},
		{"bad template", Options{Cluster: "c", StateDir: dir, Pools: map[string]PoolOptions{"a": {LaunchCommand: "{{.Nope", TerminateCommand: "true"}}}, "launch command"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New: got error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestStandinLifecycle(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	clock := newFakeClock()
	opts := standinOptions(t, "c1", dir, nil)
	opts.Clock = clock
	p := newProvider(t, opts)
	ctx := context.Background()

	req := scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "launch-1"}
	inst := launch(t, ctx, p, req)

	if !idPattern.MatchString(inst.ID) {
		t.Errorf("Launch: id %q does not look like local-<16 hex>", inst.ID)
	}
	host, _, err := net.SplitHostPort(inst.Address)
	if err != nil || host != "127.0.0.1" {
		t.Fatalf("Launch: address %q, want 127.0.0.1:<port>", inst.Address)
	}
	want := scaler.Instance{
		ID: inst.ID, Pool: "x86", Slot: "slot1", LaunchID: "launch-1",
		State: scaler.InstanceRunning, Address: inst.Address,
		LaunchedAt: clock.Now(), Type: "local", Market: "local",
	}
	if inst != want {
		t.Errorf("Launch:\n got %+v\nwant %+v", inst, want)
	}

	list := mustList(t, p)
	if len(list) != 1 || list[0] != want {
		t.Errorf("List after launch:\n got %+v\nwant [%+v]", list, want)
	}
	if got := readBanner(t, inst.Address); got != Banner {
		t.Errorf("banner: got %q, want %q", got, Banner)
	}

	r, err := p.readRecord(inst.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(r.PID, 0); err != nil {
		t.Fatalf("kill -0 %d before Terminate: %v", r.PID, err)
	}
	// A stand-in leads its own process group, so it outlives the daemon's.
	if pgid, err := syscall.Getpgid(r.PID); err != nil || pgid != r.PID {
		t.Errorf("process group of %d: got %d (%v), want %d", r.PID, pgid, err, r.PID)
	}

	if err := p.Terminate(ctx, inst.ID); err != nil {
		t.Fatalf("Terminate: %v", err)
	}
	// Terminate returns once the stand-in is dead; the provider's reaper
	// may not have collected the zombie yet, and does so by itself.
	if inspect(r.PID, r.Marker) == procAlive {
		t.Errorf("stand-in %d still runs after Terminate", r.PID)
	}
	if !testwait.Poll(testwait.Bound, func() bool { return isESRCH(syscall.Kill(r.PID, 0)) }) {
		t.Errorf("stand-in %d never reaped after Terminate", r.PID)
	}
	list = mustList(t, p)
	want.State = scaler.InstanceTerminated
	want.StateReason = ReasonRequested
	if len(list) != 1 || list[0] != want {
		t.Errorf("List after Terminate:\n got %+v\nwant [%+v]", list, want)
	}

	for _, id := range []string{inst.ID, "local-0123456789abcdef", "i-0123456789abcdef0", "../../etc/passwd"} {
		if err := p.Terminate(ctx, id); err != nil {
			t.Errorf("Terminate(%q) again/unknown: got %v, want nil", id, err)
		}
	}

	// Terminated records are kept for an hour, then deleted.
	clock.Advance(59 * time.Minute)
	if got := len(mustList(t, p)); got != 1 {
		t.Errorf("List 59m after Terminate: got %d instances, want 1", got)
	}
	clock.Advance(2 * time.Minute)
	if got := mustList(t, p); len(got) != 0 {
		t.Errorf("List 61m after Terminate: got %+v, want none", got)
	}
	if _, err := os.Stat(p.recordPath(inst.ID)); !os.IsNotExist(err) {
		t.Errorf("record after expiry: stat error %v, want not exist", err)
	}
}

// TestBootDelay: a stand-in accepts connections at once, so Launch returns
// it running with an address, but sends its banner only once its boot delay
// has passed.
func TestBootDelay(t *testing.T) {
	t.Parallel()
	p := newProvider(t, standinOptions(t, "c1", t.TempDir(), map[string]PoolOptions{
		"x86":  {Address: "127.0.0.1", BootDelay: 300 * time.Millisecond},
		"slow": {Address: "127.0.0.1", BootDelay: time.Hour},
	}))
	ctx := context.Background()

	// After its delay the stand-in serves the banner.
	inst := launch(t, ctx, p, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
	if inst.State != scaler.InstanceRunning || inst.Address == "" {
		t.Fatalf("Launch: got %+v, want running with an address", inst)
	}
	if got := readBanner(t, inst.Address); got != Banner {
		t.Errorf("banner: got %q, want %q", got, Banner)
	}
	if err := p.Terminate(ctx, inst.ID); err != nil {
		t.Errorf("Terminate: %v", err)
	}

	// Before it, nothing: a connection made while the stand-in boots (its
	// delay is an hour) gets no byte until the stand-in is stopped, and the
	// stand-in says it stopped while booting.
	slow := launch(t, ctx, p, scaler.LaunchRequest{Pool: "slow", Slot: "slot1", LaunchID: "l2"})
	if slow.State != scaler.InstanceRunning || slow.Address == "" {
		t.Fatalf("Launch while booting: got %+v, want running with an address", slow)
	}
	c, err := net.DialTimeout("tcp", slow.Address, testwait.Bound)
	if err != nil {
		t.Fatalf("dial the booting stand-in: %v", err)
	}
	defer c.Close()
	if err := p.Terminate(ctx, slow.ID); err != nil {
		t.Fatalf("Terminate: %v", err)
	}
	// Terminate returns once the process is gone: a banner it sent would
	// be waiting in the connection before the end of the stream.
	_ = c.SetReadDeadline(time.Now().Add(testwait.Bound)) // a hang guard
	got, err := io.ReadAll(c)
	if len(got) != 0 || isTimeout(err) {
		t.Errorf("connection to a stand-in stopped while booting: read %q (%v), want nothing and the connection closed", got, err)
	}
	if log := readFileTail(p.logPath(slow.ID)); !strings.Contains(log, "stand-in stopped while booting") {
		t.Errorf("stand-in log does not say it stopped while booting:\n%s", log)
	}
}

func TestSecondProviderSeesSameInstances(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := context.Background()
	a1 := newProvider(t, standinOptions(t, "a", dir, nil))
	b := newProvider(t, standinOptions(t, "b", dir, nil))
	instA := launch(t, ctx, a1, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "la"})
	instB := launch(t, ctx, b, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "lb"})

	// A daemon restart: a new Provider on the same state directory.
	a2 := newProvider(t, standinOptions(t, "a", dir, nil))
	tests := []struct {
		name string
		p    *Provider
		want scaler.Instance
	}{
		{"restarted provider of cluster a", a2, instA},
		{"provider of cluster b", b, instB},
	}
	for _, tt := range tests {
		got := mustList(t, tt.p)
		if len(got) != 1 || !sameInstance(got[0], tt.want) {
			t.Errorf("%s: List:\n got %+v\nwant [%+v]", tt.name, got, tt.want)
		}
	}

	if err := a2.Terminate(ctx, instA.ID); err != nil {
		t.Fatalf("Terminate through the restarted provider: %v", err)
	}
	if got, _ := findInstance(t, mustList(t, a1), instA.ID); got.State != scaler.InstanceTerminated {
		t.Errorf("old provider after Terminate: state %q, want terminated", got.State)
	}
	if got, _ := findInstance(t, mustList(t, b), instB.ID); got.State != scaler.InstanceRunning {
		t.Errorf("cluster b after terminating a's instance: state %q, want running", got.State)
	}
	if err := b.Terminate(ctx, instA.ID); err != nil {
		t.Errorf("Terminate of another cluster's instance: %v, want nil", err)
	}
	if err := b.Terminate(ctx, instB.ID); err != nil {
		t.Errorf("Terminate: %v", err)
	}
}

// sameInstance compares what List reports with what Launch returned.
func sameInstance(got, want scaler.Instance) bool {
	return got.ID == want.ID && got.Pool == want.Pool && got.Slot == want.Slot &&
		got.LaunchID == want.LaunchID && got.State == want.State &&
		got.Address == want.Address && got.LaunchedAt.Equal(want.LaunchedAt) &&
		got.Type == want.Type && got.Market == want.Market && got.StateReason == want.StateReason
}

func TestStandinOutlivesLaunchContext(t *testing.T) {
	t.Parallel()
	p := newProvider(t, standinOptions(t, "c1", t.TempDir(), nil))
	ctx, cancel := context.WithCancel(context.Background())
	inst := launch(t, ctx, p, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
	cancel()

	got, ok := findInstance(t, mustList(t, p), inst.ID)
	if !ok || got.State != scaler.InstanceRunning {
		t.Errorf("List after cancelling the launch context: got %+v, want running", got)
	}
	if b := readBanner(t, inst.Address); b != Banner {
		t.Errorf("banner: got %q, want %q", b, Banner)
	}
	if err := p.Terminate(context.Background(), inst.ID); err != nil {
		t.Errorf("Terminate: %v", err)
	}
	// Terminate returns once the process is gone, and the stand-in logs
	// "stand-in stopped" only when a SIGTERM stops it: it ran until
	// Terminate, whenever a kill tied to the context would have come (a
	// SIGKILL before then leaves no such line; one after the process is
	// gone kills nothing).
	if log := readFileTail(p.logPath(inst.ID)); !strings.Contains(log, "stand-in stopped") {
		t.Errorf("stand-in log does not say Terminate stopped it; was it killed when the launch context ended?\n%s", log)
	}
}

// TestStandinOutlivesKilledDaemon runs a daemon in its own process, kills
// it with SIGKILL, and finds its instance alive from a new Provider.
func TestStandinOutlivesKilledDaemon(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	daemon := exec.Command(selfPath())
	daemon.Env = append(os.Environ(), envDaemon+"="+dir)
	daemon.Stderr = t.Output()
	out, err := daemon.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	daemonPID := daemon.Process.Pid
	t.Cleanup(func() { _ = syscall.Kill(daemonPID, syscall.SIGKILL) })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		_ = syscall.Kill(daemonPID, syscall.SIGKILL)
		t.Fatalf("daemon printed %q: %v", line, err)
	}
	id := strings.TrimSpace(line)

	p := newProvider(t, standinOptions(t, "killed", dir, nil))
	r, err := p.readRecord(id)
	if err != nil {
		t.Fatal(err)
	}
	killOnCleanup(t, r.PID, r.Marker)

	if err := daemon.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = daemon.Wait()

	got, ok := findInstance(t, mustList(t, p), id)
	if !ok || got.State != scaler.InstanceRunning || got.Address == "" || got.LaunchID != "l-killed" {
		t.Fatalf("List after kill -9 of the daemon: got %+v, want running with an address", got)
	}
	if b := readBanner(t, got.Address); b != Banner {
		t.Errorf("banner: got %q, want %q", b, Banner)
	}
	if err := p.Terminate(context.Background(), id); err != nil {
		t.Fatalf("Terminate: %v", err)
	}
	// The orphan's new parent reaps it; a zombie is dead all the same.
	if !waitGoneOrZombie(r.PID, r.Marker) {
		t.Errorf("stand-in %d still alive after Terminate", r.PID)
	}
}

func TestListStates(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	clock := newFakeClock()
	opts := standinOptions(t, "c1", dir, nil)
	opts.Clock = clock
	p := newProvider(t, opts)
	now := clock.Now()

	// A pid that no longer exists: a child that has exited and been reaped.
	gone := exec.Command("/bin/true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	deadPID := gone.Process.Pid

	tests := []struct {
		name       string
		rec        record
		wantListed bool
		wantState  scaler.InstanceState
		wantReason string
		wantKept   bool // record file still there after List
	}{
		{
			name:       "no pid yet, young",
			rec:        record{Mode: modeStandin, LaunchedAt: now.Add(-10 * time.Second)},
			wantListed: true, wantState: scaler.InstancePending, wantKept: true,
		},
		{
			name:       "no pid, old",
			rec:        record{Mode: modeStandin, LaunchedAt: now.Add(-2 * time.Minute)},
			wantListed: true, wantState: scaler.InstanceTerminated, wantReason: "process never started", wantKept: true,
		},
		{
			name:       "pid alive but without the marker (reused pid)",
			rec:        record{Mode: modeStandin, PID: os.Getpid(), Address: "127.0.0.1:1", LaunchedAt: now.Add(-time.Hour)},
			wantListed: true, wantState: scaler.InstanceTerminated, wantReason: ReasonExited, wantKept: true,
		},
		{
			name:       "process gone",
			rec:        record{Mode: modeStandin, PID: deadPID, Address: "127.0.0.1:1", LaunchedAt: now.Add(-time.Hour)},
			wantListed: true, wantState: scaler.InstanceTerminated, wantReason: ReasonExited, wantKept: true,
		},
		{
			name:       "hook with address",
			rec:        record{Mode: modeHook, Address: "127.0.0.1:22", LaunchedAt: now.Add(-time.Hour)},
			wantListed: true, wantState: scaler.InstanceRunning, wantKept: true,
		},
		{
			// Its launch command was cut off by a daemon crash: stopped, so
			// the caller terminates it and the terminate command cleans up.
			name:       "hook without address, interrupted launch",
			rec:        record{Mode: modeHook, LaunchedAt: now.Add(-time.Second)},
			wantListed: true, wantState: scaler.InstanceStopped, wantReason: "launch command interrupted", wantKept: true,
		},
		{
			name:       "terminated 30 minutes ago",
			rec:        record{Mode: modeStandin, LaunchedAt: now.Add(-time.Hour), TerminatedAt: now.Add(-30 * time.Minute), StateReason: "x"},
			wantListed: true, wantState: scaler.InstanceTerminated, wantReason: "x", wantKept: true,
		},
		{
			name: "terminated 2 hours ago",
			rec:  record{Mode: modeStandin, LaunchedAt: now.Add(-3 * time.Hour), TerminatedAt: now.Add(-2 * time.Hour)},
		},
		{
			name:     "another cluster",
			rec:      record{Cluster: "other", Mode: modeStandin, LaunchedAt: now.Add(-3 * time.Hour), TerminatedAt: now.Add(-2 * time.Hour)},
			wantKept: true,
		},
	}
	ids := make([]string, len(tests))
	for i, tt := range tests {
		id, err := newID()
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = id
		r := tt.rec
		r.ID, r.Pool, r.Slot, r.LaunchID, r.Type, r.Market = id, "x86", "slot1", "l-"+id, "local", "local"
		if r.Cluster == "" {
			r.Cluster = "c1"
		}
		if r.Mode == modeStandin {
			r.Marker = id
		}
		if err := p.writeRecord(r); err != nil {
			t.Fatal(err)
		}
	}
	list := mustList(t, p)
	for i, tt := range tests {
		got, listed := findInstance(t, list, ids[i])
		if listed != tt.wantListed {
			t.Errorf("%s: listed %v, want %v", tt.name, listed, tt.wantListed)
			continue
		}
		if listed && (got.State != tt.wantState || got.StateReason != tt.wantReason) {
			t.Errorf("%s: got state %q reason %q, want %q %q", tt.name, got.State, got.StateReason, tt.wantState, tt.wantReason)
		}
		_, err := os.Stat(p.recordPath(ids[i]))
		if kept := err == nil; kept != tt.wantKept {
			t.Errorf("%s: record kept %v, want %v", tt.name, kept, tt.wantKept)
		}
	}
	// What List learned is persisted: the next List agrees.
	again := mustList(t, p)
	for i, tt := range tests {
		a, _ := findInstance(t, list, ids[i])
		b, _ := findInstance(t, again, ids[i])
		if a != b {
			t.Errorf("%s: second List: got %+v, want %+v", tt.name, b, a)
		}
	}
	if got := len(list); got != 7 {
		t.Errorf("List: got %d instances, want 7", got)
	}
}

func TestLaunchFailures(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tests := []struct {
		name    string
		builder []string
		req     scaler.LaunchRequest
		want    string
	}{
		{"unknown pool", []string{selfPath()}, scaler.LaunchRequest{Pool: "nope", Slot: "slot1"}, `unknown pool "nope"`},
		{"no slot", []string{selfPath()}, scaler.LaunchRequest{Pool: "x86"}, "without slot"},
		{"builder cannot start", []string{filepath.Join(dir, "missing")}, scaler.LaunchRequest{Pool: "x86", Slot: "slot1"}, "start stand-in"},
		{"builder exits at once", []string{selfPath(), "--bogus-flag"}, scaler.LaunchRequest{Pool: "x86", Slot: "slot1"}, "exited before reporting its address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := standinOptions(t, "c1", filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-")), nil)
			opts.BuilderCommand = tt.builder
			p := newProvider(t, opts)
			_, err := p.Launch(context.Background(), tt.req)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Launch: got error %v, want one containing %q", err, tt.want)
			}
			for _, inst := range mustList(t, p) {
				if inst.State != scaler.InstanceTerminated || !strings.HasPrefix(inst.StateReason, "launch failed") {
					t.Errorf("List after failed launch: got %+v, want terminated, launch failed", inst)
				}
			}
		})
	}
}

// TestBuilderMainSignals runs the stand-in directly and checks it serves,
// holds sessions open, and exits 0 on SIGTERM and SIGINT, also while booting.
func TestBuilderMainSignals(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		sig       syscall.Signal
		bootDelay time.Duration
	}{
		{"SIGTERM while serving", syscall.SIGTERM, 0},
		{"SIGINT while serving", syscall.SIGINT, 0},
		{"SIGTERM while booting", syscall.SIGTERM, time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			addrFile := filepath.Join(t.TempDir(), "addr")
			marker := "marker-" + strings.ReplaceAll(tt.name, " ", "-")
			cmd := exec.Command(selfPath(), "--listen", "127.0.0.1:0", "--addr-file", addrFile,
				"--boot-delay", tt.bootDelay.String(), "--marker", marker)
			cmd.Env = append(os.Environ(), builderFlag)
			cmd.Stderr = t.Output()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			pid := cmd.Process.Pid
			t.Cleanup(func() { _ = cmd.Process.Kill() })
			var addr string
			testwait.Until(t, "the stand-in's address file", func() bool {
				var err error
				addr, err = readAddrFile(addrFile)
				return err == nil
			})
			var session net.Conn
			if tt.bootDelay == 0 {
				var err error
				session, err = net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer session.Close()
				_ = session.SetReadDeadline(time.Now().Add(testwait.Bound)) // a hang guard
				br := bufio.NewReader(session)
				if line, err := br.ReadString('\n'); line != Banner {
					t.Fatalf("banner: got %q (%v), want %q", line, err, Banner)
				}
				// The session stays open: nothing more, no EOF, for a while.
				_ = session.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				if _, err := br.ReadByte(); !isTimeout(err) {
					t.Errorf("open session: read got %v, want a timeout", err)
				}
				_ = session.SetReadDeadline(time.Now().Add(testwait.Bound)) // a hang guard
			}
			if err := syscall.Kill(pid, tt.sig); err != nil {
				t.Fatal(err)
			}
			if got := exitCode(t, cmd); got != 0 {
				t.Errorf("exit code after %v: got %d, want 0", tt.sig, got)
			}
			if session != nil {
				if _, err := session.Read(make([]byte, 1)); err == nil {
					t.Errorf("session after %v: still open, want closed", tt.sig)
				}
			}
		})
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestBuilderMainBadFlags(t *testing.T) {
	tests := []struct {
		args []string
		want int
	}{
		{[]string{"--no-such-flag"}, 2},
		{[]string{"extra-arg"}, 2},
		{[]string{"--listen", "not-an-address"}, 1},
	}
	for _, tt := range tests {
		if got := BuilderMain(tt.args); got != tt.want {
			t.Errorf("BuilderMain(%q): got %d, want %d", tt.args, got, tt.want)
		}
	}
}

// TestConcurrentUse launches, lists and terminates from several goroutines
// at once (run with -race).
func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	p := newProvider(t, standinOptions(t, "c1", t.TempDir(), nil))
	ctx := context.Background()
	const n = 3
	insts := make([]scaler.Instance, n)
	stopList := make(chan struct{})
	listDone := make(chan struct{})
	go func() {
		defer close(listDone)
		for i := 0; i < 1000; i++ { // bounded
			select {
			case <-stopList:
				return
			default:
			}
			if _, err := p.List(ctx); err != nil {
				t.Errorf("List: %v", err)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			inst, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: fmt.Sprintf("slot%d", i+1), LaunchID: fmt.Sprint(i)})
			if err != nil {
				t.Errorf("Launch: %v", err)
				return
			}
			insts[i] = inst
		})
	}
	wg.Wait()
	for _, inst := range insts {
		if inst.ID == "" {
			continue
		}
		r, err := p.readRecord(inst.ID)
		if err != nil {
			t.Fatal(err)
		}
		killOnCleanup(t, r.PID, r.Marker)
	}
	// Each instance terminated twice at once: both succeed, one does the work.
	for _, inst := range insts {
		for range 2 {
			wg.Go(func() {
				if err := p.Terminate(ctx, inst.ID); err != nil {
					t.Errorf("Terminate(%s): %v", inst.ID, err)
				}
			})
		}
	}
	wg.Wait()
	close(stopList)
	<-listDone
	list := mustList(t, p)
	if len(list) != n {
		t.Errorf("List: got %d instances, want %d", len(list), n)
	}
	for _, inst := range list {
		if inst.State != scaler.InstanceTerminated || inst.StateReason != ReasonRequested {
			t.Errorf("List: got %+v, want terminated by request", inst)
		}
	}
}

// TestListSeesRecordsChangedBehindItsBack: List keeps records it has read,
// but a record file changed since, by another provider (a second daemon
// process, an operator's edit in place or by rename), is read again.
func TestListSeesRecordsChangedBehindItsBack(t *testing.T) {
	t.Parallel()
	p, opts := fakeClockProvider(t)
	id, err := newID()
	if err != nil {
		t.Fatal(err)
	}
	r := record{ID: id, Cluster: "c1", Pool: "x86", Slot: "slot1", LaunchID: "l-" + id, Type: "local", Market: "local",
		Mode: modeHook, Address: "127.0.0.1:22", LaunchedAt: opts.Clock.Now().Add(-time.Hour)}
	if err := p.writeRecord(r); err != nil {
		t.Fatal(err)
	}
	addrOf := func() string {
		t.Helper()
		got, ok := findInstance(t, mustList(t, p), id)
		if !ok {
			t.Fatalf("instance %s not listed", id)
		}
		return got.Address
	}
	if got := addrOf(); got != "127.0.0.1:22" {
		t.Fatalf("address %q, want 127.0.0.1:22", got)
	}
	// Another provider on the same state directory replaces it (rename).
	other := newProvider(t, opts)
	r.Address = "127.0.0.2:22"
	if err := other.writeRecord(r); err != nil {
		t.Fatal(err)
	}
	if got := addrOf(); got != "127.0.0.2:22" {
		t.Errorf("after a rename by another provider: address %q, want 127.0.0.2:22", got)
	}
	// An edit in place, to a record of another length.
	b, err := os.ReadFile(p.recordPath(id))
	if err != nil {
		t.Fatal(err)
	}
	b = bytes.Replace(b, []byte(`"127.0.0.2:22"`), []byte(`"127.0.0.33:2222"`), 1)
	f, err := os.OpenFile(p.recordPath(id), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if got := addrOf(); got != "127.0.0.33:2222" {
		t.Errorf("after an edit in place: address %q, want 127.0.0.33:2222", got)
	}
}

// TestCrashedStandinListedTerminated: a stand-in that dies on its own (a
// crashed builder) is listed terminated, with ReasonExited, by the provider
// that started it (which learns it from the reaped child, not /proc) and by
// another one on the same state directory.
func TestCrashedStandinListedTerminated(t *testing.T) {
	t.Parallel()
	p, opts := fakeClockProvider(t)
	inst := launch(t, context.Background(), p, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "launch-1"})
	r, err := p.readRecord(inst.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := findInstance(t, mustList(t, p), inst.ID); got.State != scaler.InstanceRunning {
		t.Fatalf("before the crash: %s, want running", got.State)
	}
	if err := syscall.Kill(r.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	other := newProvider(t, opts)
	var got scaler.Instance
	testwait.Until(t, "the crashed stand-in listed terminated", func() bool {
		got, _ = findInstance(t, mustList(t, p), inst.ID)
		return got.State == scaler.InstanceTerminated
	})
	if got.StateReason != ReasonExited {
		t.Errorf("reason %q, want %q", got.StateReason, ReasonExited)
	}
	if o, _ := findInstance(t, mustList(t, other), inst.ID); o.State != scaler.InstanceTerminated {
		t.Errorf("another provider lists it %s, want terminated", o.State)
	}
}

// fakeClockProvider is a stand-in provider of cluster c1 in a new state
// directory, on a manual clock; opts makes more on the same directory.
func fakeClockProvider(t *testing.T) (*Provider, Options) {
	opts := standinOptions(t, "c1", t.TempDir(), nil)
	opts.Clock = newFakeClock()
	return newProvider(t, opts), opts
}

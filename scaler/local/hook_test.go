package local

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// hookLaunch starts a stand-in in the background the way an operator's
// script would start a builder, and prints some noise and then its address.
// It waits for the address file up to 2 minutes: a hang guard, as in
// testwait.
var hookLaunch = fmt.Sprintf(`
af={{quote .StateDir}}/{{.InstanceID}}.hook-addr
%s --listen 127.0.0.1:0 --addr-file "$af" --marker {{.InstanceID}} >/dev/null 2>&1 &
echo $! > {{quote .StateDir}}/{{.InstanceID}}.hook-pid
i=0
while [ ! -s "$af" ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done
echo "starting builder for {{.Pool}}/{{.Slot}}"
cat "$af"
echo
`, shellQuote(selfPath()))

const hookTerminate = `kill "$(cat {{quote .StateDir}}/{{.InstanceID}}.hook-pid)"`

func hookOptions(t *testing.T, dir string, po PoolOptions) Options {
	t.Helper()
	return Options{
		Cluster:    "c1",
		StateDir:   dir,
		Pools:      map[string]PoolOptions{"x86": po},
		BuilderEnv: []string{builderFlag},
		Logger:     testLogger(t),
	}
}

// hookPID reads the pid the test's launch script wrote and has the process
// killed at cleanup.
func hookPID(t *testing.T, dir, id string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, id+".hook-pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	killOnCleanup(t, pid, id)
	return pid
}

func TestHookLifecycle(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := newProvider(t, hookOptions(t, dir, PoolOptions{LaunchCommand: hookLaunch, TerminateCommand: hookTerminate}))
	ctx := context.Background()

	inst, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot2", LaunchID: "l1"})
	if err != nil {
		t.Fatalf("Launch: %v", err)
	}
	pid := hookPID(t, dir, inst.ID)
	if inst.State != scaler.InstanceRunning || !strings.HasPrefix(inst.Address, "127.0.0.1:") || inst.Slot != "slot2" {
		t.Errorf("Launch: got %+v, want running at 127.0.0.1:<port> in slot2", inst)
	}
	if got := readBanner(t, inst.Address); got != Banner {
		t.Errorf("banner: got %q, want %q", got, Banner)
	}
	got, _ := findInstance(t, mustList(t, p), inst.ID)
	if !sameInstance(got, inst) {
		t.Errorf("List:\n got %+v\nwant %+v", got, inst)
	}

	if err := p.Terminate(ctx, inst.ID); err != nil {
		t.Fatalf("Terminate: %v", err)
	}
	if !waitGoneOrZombie(pid, inst.ID) {
		t.Errorf("stand-in %d still alive after the terminate command", pid)
	}
	got, _ = findInstance(t, mustList(t, p), inst.ID)
	if got.State != scaler.InstanceTerminated || got.StateReason != ReasonRequested {
		t.Errorf("List after Terminate: got %+v, want terminated by request", got)
	}
	if err := p.Terminate(ctx, inst.ID); err != nil {
		t.Errorf("second Terminate: %v, want nil", err)
	}
}

func TestHookTemplateData(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := newProvider(t, hookOptions(t, dir, PoolOptions{
		LaunchCommand: `echo "{{.Cluster}} {{.Pool}} {{.Slot}} {{.LaunchID}} {{.InstanceID}} {{.StateDir}}" > {{quote .StateDir}}/launch-data
echo "$NBA_CLUSTER $NBA_POOL $NBA_SLOT $NBA_LAUNCH_ID $NBA_INSTANCE_ID $NBA_STATE_DIR" > {{quote .StateDir}}/launch-env
echo 127.0.0.1:2222`,
		TerminateCommand: `echo "{{.InstanceID}} {{.Address}}" > {{quote .StateDir}}/terminate-data`,
	}))
	inst, err := p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l-42"})
	if err != nil {
		t.Fatalf("Launch: %v", err)
	}
	if err := p.Terminate(context.Background(), inst.ID); err != nil {
		t.Fatalf("Terminate: %v", err)
	}
	tests := []struct {
		file string
		want string
	}{
		{"launch-data", "c1 x86 slot1 l-42 " + inst.ID + " " + dir},
		{"launch-env", "c1 x86 slot1 l-42 " + inst.ID + " " + dir},
		{"terminate-data", inst.ID + " 127.0.0.1:2222"},
	}
	for _, tt := range tests {
		b, err := os.ReadFile(filepath.Join(dir, tt.file))
		if got := strings.TrimSpace(string(b)); err != nil || got != tt.want {
			t.Errorf("%s: got %q (%v), want %q", tt.file, got, err, tt.want)
		}
	}
}

func TestHookLaunchErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		launch  string
		want    []string // substrings of the error
		notWant string
	}{
		{"bad address line", `echo 127.0.0.1:22; echo "builder is up"`, []string{`pool "x86"`, `printed "builder is up" as its last line`, "host:port"}, ""},
		{"port not numeric", `echo localhost:ssh`, []string{`printed "localhost:ssh"`}, ""},
		{"no output", `true`, []string{"printed nothing"}, ""},
		{"exit status", `echo 127.0.0.1:22; echo "no capacity" >&2; exit 3`, []string{"launch command", "exit status 3", "no capacity"}, ""},
		{
			"last 20 lines of stderr",
			`i=1; while [ $i -le 30 ]; do echo "line $i" >&2; i=$((i+1)); done; exit 1`,
			[]string{"exit status 1", "line 11", "line 30"}, "line 10",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := newProvider(t, hookOptions(t, t.TempDir(), PoolOptions{LaunchCommand: tt.launch, TerminateCommand: "true"}))
			_, err := p.Launch(context.Background(), scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
			if err == nil {
				t.Fatal("Launch: got nil error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Launch error %q does not contain %q", err, w)
				}
			}
			if tt.notWant != "" && strings.Contains(err.Error(), tt.notWant) {
				t.Errorf("Launch error %q contains %q", err, tt.notWant)
			}
			list := mustList(t, p)
			if len(list) != 1 || list[0].State != scaler.InstanceTerminated {
				t.Errorf("List after failed launch: got %+v, want one terminated instance", list)
			}
		})
	}
}

func TestHookLaunchCancelled(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	// The command starts a long sleep in the background (it would outlive
	// the test if nothing killed it) and waits for it.
	p := newProvider(t, hookOptions(t, dir, PoolOptions{
		LaunchCommand:    `sleep 3600 & echo $! > {{quote .StateDir}}/sleep-pid.tmp; mv {{quote .StateDir}}/sleep-pid.tmp {{quote .StateDir}}/sleep-pid; wait`,
		TerminateCommand: "true",
	}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The context ends once the command has started the sleep: the order
	// is the test's, whatever the machine's load.
	sleepPID := make(chan int, 1)
	returned := make(chan struct{})
	go func() {
		defer cancel()
		var pid int
		testwait.Poll(testwait.Bound, func() bool {
			if b, err := os.ReadFile(filepath.Join(dir, "sleep-pid")); err == nil {
				pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
				return true
			}
			select {
			case <-returned: // Launch did not wait for its context
				return true
			default:
				return false
			}
		})
		sleepPID <- pid
	}()
	_, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
	close(returned)
	pid := <-sleepPID
	if pid <= 0 {
		t.Fatalf("the launch command never wrote the pid of its sleep; Launch: %v", err)
	}
	killOnCleanup(t, pid, "sleep")
	// Launch returned because its context ended, and says so.
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Launch: got error %v, want one wrapping %v", err, context.Canceled)
	}
	if list := mustList(t, p); len(list) != 1 || list[0].State != scaler.InstanceTerminated {
		t.Errorf("List after the cancelled launch: got %+v, want one terminated instance", list)
	}
	// The command's process group is killed with it: the sleep it left in
	// the background dies (it would otherwise run for an hour).
	if !waitGoneOrZombie(pid, "sleep") {
		t.Errorf("background sleep %d of the cancelled command still alive %v later", pid, testwait.Bound)
	}
}

func TestHookTerminateFailure(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := newProvider(t, hookOptions(t, dir, PoolOptions{
		LaunchCommand:    `echo 127.0.0.1:2222`,
		TerminateCommand: `if [ -e {{quote .StateDir}}/allow ]; then exit 0; fi; echo "api unreachable" >&2; exit 4`,
	}))
	ctx := context.Background()
	inst, err := p.Launch(ctx, scaler.LaunchRequest{Pool: "x86", Slot: "slot1", LaunchID: "l1"})
	if err != nil {
		t.Fatalf("Launch: %v", err)
	}
	err = p.Terminate(ctx, inst.ID)
	for _, w := range []string{"terminate command", "exit status 4", "api unreachable"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("Terminate: got error %v, want one containing %q", err, w)
		}
	}
	if got, _ := findInstance(t, mustList(t, p), inst.ID); got.State != scaler.InstanceRunning {
		t.Errorf("List after failed Terminate: state %q, want running (the caller retries)", got.State)
	}
	// The retry succeeds once the command does.
	if err := os.WriteFile(filepath.Join(dir, "allow"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.Terminate(ctx, inst.ID); err != nil {
		t.Fatalf("retried Terminate: %v", err)
	}
	if got, _ := findInstance(t, mustList(t, p), inst.ID); got.State != scaler.InstanceTerminated {
		t.Errorf("List after retried Terminate: state %q, want terminated", got.State)
	}
}

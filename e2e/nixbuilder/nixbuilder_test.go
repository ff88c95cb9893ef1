package nixbuilder

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

func testContext(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndex(s, ") ")
	return i >= 0 && len(s) > i+2 && s[i+2] != 'Z' && s[i+2] != 'X'
}

// expectGone fails unless nothing of b is left: processes, veth, address,
// directory.
func expectGone(t *testing.T, b *Builder) {
	t.Helper()
	for _, pid := range []int{b.SSHDPID, b.HolderPID} {
		if alive(pid) {
			t.Errorf("builder %s: pid %d still runs", b.ID, pid)
		}
	}
	if b.Veth != "" {
		idx, err := os.ReadFile("/sys/class/net/" + b.Veth + "/ifindex")
		if err == nil && strings.TrimSpace(string(idx)) == strconv.Itoa(b.VethIndex) {
			t.Errorf("builder %s: veth %s (index %d) still exists", b.ID, b.Veth, b.VethIndex)
		}
	}
	// Not checked: that b.Address refuses connections. Another builder may
	// already have the address (tests run in parallel).
	if _, err := os.Stat(b.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("builder %s: directory %s: %v, want it removed", b.ID, b.Dir, err)
	}
}

// expectNamespace checks what the launch recorded against the system.
func expectNamespace(t *testing.T, b *Builder) {
	t.Helper()
	switch b.Mode {
	case "netns":
		host, port, _ := net.SplitHostPort(b.Address)
		if !strings.HasPrefix(host, "100.64.") || port != "22" {
			t.Errorf("netns builder at %s, want 100.64.x.y:22", b.Address)
		}
		self, _ := os.Readlink("/proc/self/ns/net")
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", b.SSHDPID))
		if err != nil || ns != b.NetNS || ns == self {
			t.Errorf("sshd %d in namespace %q (%v), want %q, not ours %q", b.SSHDPID, ns, err, b.NetNS, self)
		}
		if _, err := os.Stat("/sys/class/net/" + b.Veth); err != nil {
			t.Errorf("veth %s: %v", b.Veth, err)
		}
	case "loopback":
		host, _, _ := net.SplitHostPort(b.Address)
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			t.Errorf("loopback builder at %s", b.Address)
		}
	default:
		t.Errorf("builder %s: mode %q", b.ID, b.Mode)
	}
}

func TestLaunchBuildTerminate(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)

	start := time.Now()
	b, err := e.Launch(ctx, "one")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("launch: %s (%s, sshd pid %d) in %v", b.Address, b.Mode, b.SSHDPID, time.Since(start).Round(time.Millisecond))
	expectNamespace(t, b)
	if os.Geteuid() == 0 && b.Mode != "netns" {
		t.Logf("root, but no network namespace: see %s/sshd.start.log", b.Dir)
	}

	r, err := e.BuildWith(ctx, b.Address, BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("build: %v\n%s", r.Duration.Round(time.Millisecond), r.Command)
	if len(r.OutPaths) != 1 || !strings.Contains(r.Output, r.OutPaths[0]) {
		t.Fatalf("output paths %q; output:\n%s", r.OutPaths, r.Output)
	}
	if !b.HasPath(r.OutPaths[0]) {
		t.Errorf("builder's store lacks %s: it was not built there", r.OutPaths[0])
	}
	if !strings.Contains(r.Output, "on 'ssh-ng://"+e.User+"@") {
		t.Errorf("nix-build did not say it built remotely:\n%s", r.Output)
	}

	// Build, the plain form.
	out, err := e.Build(ctx, b.Address)
	if err != nil {
		t.Fatal(err)
	}
	if last := lastLine(out); !strings.HasPrefix(last, "/nix/store/") || !b.HasPath(last) {
		t.Errorf("Build's last line %q is not an output on the builder", last)
	}

	start = time.Now()
	if err := e.Terminate(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	t.Logf("terminate: %v", time.Since(start).Round(time.Millisecond))
	expectGone(t, b)
	if err := e.Terminate(ctx, b.ID); err != nil {
		t.Errorf("second terminate: %v", err)
	}
	// The address fails at once (connection refused, or for a namespace
	// the host's unreachable route), not after a timeout.
	// Its address may already serve another test's builder (with another
	// host key), so the check is what did not happen: a connect timeout.
	if _, err := e.Build(ctx, b.Address); err == nil {
		t.Errorf("build on a terminated builder succeeded")
	} else if strings.Contains(err.Error(), "timed out") {
		t.Errorf("build on a terminated builder waited for a connect timeout:\n%v", err)
	}
}

func TestTwoBuilders(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)

	builders := make([]*Builder, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range builders {
		wg.Go(func() { builders[i], errs[i] = e.Launch(ctx, fmt.Sprintf("b%d", i)) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if builders[0].Address == builders[1].Address {
		t.Fatalf("two builders at one address %s", builders[0].Address)
	}
	results := make([]*Result, 2)
	for i, b := range builders {
		wg.Go(func() { results[i], errs[i] = e.BuildWith(ctx, b.Address, BuildOptions{}) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i, b := range builders {
		t.Logf("%s at %s (%s): built %s in %v", b.ID, b.Address, b.Mode, results[i].OutPaths[0], results[i].Duration.Round(time.Millisecond))
		if !b.HasPath(results[i].OutPaths[0]) || builders[1-i].HasPath(results[i].OutPaths[0]) {
			t.Errorf("%s's output is not (only) on %s", results[i].OutPaths[0], b.ID)
		}
	}
	for _, b := range builders {
		if err := e.Terminate(ctx, b.ID); err != nil {
			t.Fatal(err)
		}
		expectGone(t, b)
	}
}

func TestLoopbackFallback(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)
	b, err := e.Launch(ctx, "lo", "NBA_BUILDER_NETNS=0")
	if err != nil {
		t.Fatal(err)
	}
	if b.Mode != "loopback" || b.HolderPID != 0 || b.Veth != "" {
		t.Fatalf("NBA_BUILDER_NETNS=0 gave %+v", b)
	}
	expectNamespace(t, b)
	r, err := e.BuildWith(ctx, b.Address, BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loopback build at %s: %v", b.Address, r.Duration.Round(time.Millisecond))
	if err := e.Terminate(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	expectGone(t, b)
}

// TestParallelAndLegacy: several derivations over several connections to one
// builder, and the ssh:// protocol (nix-store --serve) too.
func TestParallelAndLegacy(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)
	b, err := e.Launch(ctx, "par")
	if err != nil {
		t.Fatal(err)
	}
	// Nix 2.8 hands derivations to the build hook one at a time (each
	// waits for its SSH session), so with 4 jobs they overlap rather than
	// start together; one by one they would not overlap at all. The builds
	// say when they ran, so the test sees the overlap instead of timing it.
	r, err := e.BuildWith(ctx, b.Address, BuildOptions{Derivations: 4, Sleep: 3 * time.Second, Stamp: true})
	if err != nil {
		t.Fatal(err)
	}
	overlap := MaxOverlap(r.Spans)
	t.Logf("4 derivations sleeping 3s each, 4 jobs: %v, at most %d at once", r.Duration.Round(time.Millisecond), overlap)
	if overlap < 2 {
		t.Errorf("4 builds with 4 jobs ran one at a time: %+v", r.Spans)
	}
	for _, p := range r.OutPaths {
		if !b.HasPath(p) {
			t.Errorf("builder lacks %s", p)
		}
	}
	r, err = e.BuildWith(ctx, b.Address, BuildOptions{Protocol: "ssh"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ssh:// build: %v", r.Duration.Round(time.Millisecond))
	if !b.HasPath(r.OutPaths[0]) {
		t.Errorf("builder lacks %s", r.OutPaths[0])
	}
}

// TestTerminateDuringBuild: terminate stops the sessions of running builds
// too, and the client's build fails promptly.
func TestTerminateDuringBuild(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 10*time.Minute)
	b, err := e.Launch(ctx, "busy")
	if err != nil {
		t.Fatal(err)
	}
	// The builds sleep far longer than the wait below: only a terminate
	// that stops their sessions ends nix-build within it.
	const sleep = 10 * time.Minute
	done := make(chan error, 1)
	go func() {
		_, err := e.BuildWith(ctx, b.Address, BuildOptions{Derivations: 2, Sleep: sleep})
		done <- err
	}()
	testwait.Until(t, "the builds to run on the builder", func() bool { return sessionsRunning(b, 2) })
	start := time.Now()
	if err := e.Terminate(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	t.Logf("terminate with 2 builds running: %v", time.Since(start).Round(time.Millisecond))
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("build succeeded on a terminated builder")
		}
		if ctx.Err() != nil {
			t.Fatalf("nix-build ran until the test's deadline: %v", err)
		}
	case <-time.After(testwait.Bound):
		t.Fatalf("nix-build still runs %v after its builder was terminated, with builds sleeping %v", testwait.Bound, sleep)
	}
	expectGone(t, b)
}

// sessionsRunning reports whether at least n nix-daemon sessions of b run.
func sessionsRunning(b *Builder, n int) bool {
	marker := []byte("NBA_BUILDER_DIR=" + b.Dir + "\x00")
	entries, _ := os.ReadDir("/proc")
	count := 0
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if bytes.Contains(cmdline, []byte("nix-daemon")) && bytes.Contains(env, marker) {
			count++
		}
	}
	return count >= n
}

// TestHookCommands runs LaunchCommand and TerminateCommand the way the
// daemon's local provider does: rendered as text/template with `quote`,
// run by /bin/sh -c in a process group of their own, with NBA_* set, and no
// background process holding the output open.
func TestHookCommands(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)
	stateDir := filepath.Join(e.Dir, "daemon-state")
	e.TrackStateDir(stateDir)
	data := map[string]string{
		"Cluster": "nix-builders", "Pool": "x86", "Slot": "slot1",
		"LaunchID": "l-1", "InstanceID": "local-0123456789abcdef", "StateDir": stateDir,
	}
	run := func(name, text string) string {
		t.Helper()
		tmpl, err := template.New(name).Option("missingkey=error").
			Funcs(template.FuncMap{"quote": shellQuote}).Parse(text)
		if err != nil {
			t.Fatal(err)
		}
		var script bytes.Buffer
		if err := tmpl.Execute(&script, data); err != nil {
			t.Fatal(err)
		}
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", script.String())
		cmd.Env = append(os.Environ(),
			"NBA_CLUSTER="+data["Cluster"], "NBA_POOL="+data["Pool"], "NBA_SLOT="+data["Slot"],
			"NBA_LAUNCH_ID="+data["LaunchID"], "NBA_INSTANCE_ID="+data["InstanceID"],
			"NBA_STATE_DIR="+data["StateDir"], "NBA_ADDRESS="+data["Address"])
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
		cmd.WaitDelay = time.Second
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		start := time.Now()
		err = cmd.Run()
		if errors.Is(err, exec.ErrWaitDelay) {
			t.Fatalf("%s: a background process kept the output open", name)
		}
		if err != nil {
			t.Fatalf("%s: %v\n%s", name, err, stderr.String())
		}
		t.Logf("%s (%v): %s", name, time.Since(start).Round(time.Millisecond), script.String())
		return stdout.String()
	}

	addr := lastLine(run("launch", e.LaunchCommand()))
	if _, _, err := net.SplitHostPort(addr); err != nil {
		t.Fatalf("launch printed %q last", addr)
	}
	b, err := ReadBuilder(stateDir, data["InstanceID"])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Build(ctx, addr); err != nil {
		t.Fatal(err)
	}
	data["Address"] = addr
	run("terminate", e.TerminateCommand())
	expectGone(t, b)
	run("terminate again", e.TerminateCommand())

	// The environment alone is enough too.
	data["Address"] = ""
	data["InstanceID"] = "local-fedcba9876543210"
	cmd := exec.CommandContext(ctx, e.LaunchScript)
	cmd.Env = append(os.Environ(), e.BuilderEnv()...)
	cmd.Env = append(cmd.Env, "NBA_INSTANCE_ID="+data["InstanceID"], "NBA_STATE_DIR="+stateDir)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("launch from the environment: %v", err)
	}
	if _, err := e.Build(ctx, lastLine(string(out))); err != nil {
		t.Fatal(err)
	}
	b, err = ReadBuilder(stateDir, data["InstanceID"])
	if err != nil {
		t.Fatal(err)
	}
	cmd = exec.CommandContext(ctx, e.TerminateScript)
	cmd.Env = append(os.Environ(), "NBA_INSTANCE_ID="+data["InstanceID"], "NBA_STATE_DIR="+stateDir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("terminate from the environment: %v\n%s", err, out)
	}
	expectGone(t, b)
}

// TestLaunchFailureCleansUp: a launch that fails late (sshd started, but
// not answering in time) leaves no process and no veth behind.
func TestLaunchFailureCleansUp(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)
	_, err := e.Launch(ctx, "fail", "NBA_BUILDER_WAIT=0", "NBA_BUILDER_KEEP_DIR=1")
	if err == nil {
		t.Fatal("launch with NBA_BUILDER_WAIT=0 succeeded")
	}
	t.Logf("launch failed as it should: %v", err)
	b, err := ReadBuilder(e.StateDir, "fail")
	if err != nil {
		t.Fatal(err)
	}
	if b.SSHDPID == 0 {
		t.Fatalf("sshd never started: %+v", b)
	}
	b.Dir = filepath.Join(e.Dir, "no-such-dir") // kept on purpose
	expectGone(t, b)
}

func TestLaunchRefusals(t *testing.T) {
	t.Parallel()
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)
	for _, id := range []string{"", "..", "a/b", "a b", "$(reboot)"} {
		if _, err := e.runScript(ctx, nil, e.LaunchScript, id, e.StateDir, e.HostKey, e.AuthorizedKeys); err == nil {
			t.Errorf("launch with id %q succeeded", id)
		}
	}
	if _, err := e.runScript(ctx, nil, e.LaunchScript, "x", "relative/dir", e.HostKey, e.AuthorizedKeys); err == nil {
		t.Error("launch with a relative state dir succeeded")
	}
	if _, err := e.runScript(ctx, nil, e.LaunchScript, "x", e.StateDir, filepath.Join(e.Dir, "missing"), e.AuthorizedKeys); err == nil {
		t.Error("launch without a host key succeeded")
	}
	// Terminating what never ran is success.
	if err := e.Terminate(ctx, "never-launched"); err != nil {
		t.Error(err)
	}
	// A running builder is not launched twice.
	b, err := e.Launch(ctx, "twice")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.runScript(ctx, nil, e.LaunchScript, "twice", e.StateDir, e.HostKey, e.AuthorizedKeys); err == nil {
		t.Error("second launch of a running builder succeeded")
	}
	if !alive(b.SSHDPID) {
		t.Error("the refused second launch stopped the running builder")
	}
}

// TestNamespaceFailure: when the veth cannot be made, auto mode falls back
// to loopback and leaves no namespace behind; NBA_BUILDER_NETNS=1 fails.
func TestNamespaceFailure(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 || exec.Command("unshare", "--net", "--mount", "true").Run() != nil {
		t.Skip("needs root and a working unshare: no namespace to fail")
	}
	e := Setup(t)
	ctx := testContext(t, 2*time.Minute)
	shim := filepath.Join(e.Dir, "shim")
	if err := os.MkdirAll(shim, 0o755); err != nil {
		t.Fatal(err)
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Fatal(err)
	}
	fake := "#!/bin/sh\ncase \"$*\" in \"link add\"*) echo 'RTNETLINK answers: Operation not permitted (fake)' >&2; exit 2 ;; esac\nexec " + ip + " \"$@\"\n"
	if err := os.WriteFile(filepath.Join(shim, "ip"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	path := "PATH=" + shim + ":" + os.Getenv("PATH")

	b, err := e.Launch(ctx, "fallback", path)
	if err != nil {
		t.Fatal(err)
	}
	if b.Mode != "loopback" || b.HolderPID != 0 {
		t.Fatalf("auto mode without veth gave %+v", b)
	}
	if _, err := e.Build(ctx, b.Address); err != nil {
		t.Fatal(err)
	}
	if err := e.Terminate(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	expectGone(t, b)

	_, err = e.Launch(ctx, "strict", path, "NBA_BUILDER_NETNS=1", "NBA_BUILDER_KEEP_DIR=1")
	if err == nil {
		t.Fatal("NBA_BUILDER_NETNS=1 without veth succeeded")
	}
	b, rerr := ReadBuilder(e.StateDir, "strict")
	if rerr != nil {
		t.Fatal(rerr)
	}
	if b.HolderPID == 0 {
		t.Fatalf("no namespace holder on record: %+v; launch said %v", b, err)
	}
	b.Dir = filepath.Join(e.Dir, "no-such-dir") // kept on purpose
	expectGone(t, b)
}

// BenchmarkBuild: one trivial derivation built remotely, end to end (eval,
// SSH session, copy to the builder, sandboxed build, copy back).
func BenchmarkBuild(b *testing.B) {
	for _, mode := range []string{"auto", "0"} {
		b.Run("netns="+mode, func(b *testing.B) {
			e := Setup(b)
			ctx := context.Background()
			bl, err := e.Launch(ctx, "bench", "NBA_BUILDER_NETNS="+mode)
			if err != nil {
				b.Fatal(err)
			}
			b.Logf("builder at %s (%s)", bl.Address, bl.Mode)
			for b.Loop() {
				if _, err := e.Build(ctx, bl.Address); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkLaunchTerminate: one builder's launch (until sshd answers) and
// terminate.
func BenchmarkLaunchTerminate(b *testing.B) {
	for _, mode := range []string{"auto", "0"} {
		b.Run("netns="+mode, func(b *testing.B) {
			e := Setup(b)
			ctx := context.Background()
			i := 0
			for b.Loop() {
				i++
				id := fmt.Sprintf("b%d", i)
				if _, err := e.Launch(ctx, id, "NBA_BUILDER_NETNS="+mode); err != nil {
					b.Fatal(err)
				}
				if err := e.Terminate(ctx, id); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func TestMaxOverlap(t *testing.T) {
	at := func(s int) time.Time { return time.Unix(int64(s), 0) }
	for _, tc := range []struct {
		spans []Span
		want  int
	}{
		{nil, 0},
		{[]Span{{at(0), at(2)}}, 1},
		{[]Span{{at(0), at(2)}, {at(2), at(4)}, {at(4), at(6)}}, 1}, // one after another
		{[]Span{{at(0), at(3)}, {at(1), at(4)}, {at(5), at(6)}}, 2},
		{[]Span{{at(3), at(9)}, {at(0), at(10)}, {at(1), at(4)}, {at(2), at(5)}}, 4},
	} {
		if got := MaxOverlap(tc.spans); got != tc.want {
			t.Errorf("MaxOverlap(%v) = %d, want %d", tc.spans, got, tc.want)
		}
	}
}

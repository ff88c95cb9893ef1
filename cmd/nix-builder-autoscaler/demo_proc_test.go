package main

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// runMainEnv makes TestMain run the command line instead of the tests.
const runMainEnv = "NBA_TEST_RUN_MAIN"

// demoProc is the demo running in a process of its own.
type demoProc struct {
	cmd    *exec.Cmd
	lines  chan string
	out    *bytes.Buffer // everything read so far from stdout
	stderr *bytes.Buffer
	once   sync.Once
	code   int
}

func startDemoProc(t *testing.T, args ...string) *demoProc {
	t.Helper()
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Fatal("haproxy is not installed: scripts/test installs it (scripts/apt-need haproxy)")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, append([]string{"demo"}, args...)...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &demoProc{cmd: cmd, lines: make(chan string, 1000), out: &bytes.Buffer{}, stderr: &bytes.Buffer{}}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		// Stopped by its pid whatever the test did.
		_ = cmd.Process.Kill()
		p.finish()
	})
	return p
}

// waitLine reads the demo's output until a line contains want.
func (p *demoProc) waitLine(t *testing.T, want string) {
	t.Helper()
	for l := range p.lines {
		p.out.WriteString(l + "\n")
		if strings.Contains(l, want) {
			return
		}
	}
	t.Fatalf("demo ended without printing %q; stdout:\n%s\nstderr:\n%s", want, p.out.String(), p.stderr.String())
}

// finish waits for the process and returns its exit code, after reading
// the rest of its output.
func (p *demoProc) finish() int {
	p.once.Do(func() {
		for l := range p.lines {
			p.out.WriteString(l + "\n")
		}
		err := p.cmd.Wait()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			p.code = ee.ExitCode()
		case err != nil:
			p.code = -1
		}
	})
	return p.code
}

// children lists the processes whose parent is pid.
func children(t *testing.T, pid int) []int {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var kids []int
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid ...; comm may hold spaces and parens.
		rest := string(b[bytes.LastIndexByte(b, ')')+1:])
		fields := strings.Fields(rest)
		if len(fields) < 2 {
			continue
		}
		if ppid, _ := strconv.Atoi(fields[1]); ppid == pid {
			child, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(f, "/proc/"), "/stat"))
			kids = append(kids, child)
		}
	}
	return kids
}

// alive reports whether pid runs (a zombie has exited: only its parent's
// reaping is left, which is init's now).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z" && fields[0] != "X"
}

// waitGone polls until none of pids runs. The bound is only there so a
// broken build fails instead of hanging; it asserts no speed.
func waitGone(t *testing.T, pids []int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		var left []int
		for _, pid := range pids {
			if alive(pid) {
				left = append(left, pid)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, pid := range left {
				_ = syscall.Kill(pid, syscall.SIGKILL) // stop what the test started
			}
			t.Fatalf("processes %v outlived the demo", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDemoKilledTakesItsChildren: HAProxy and the stand-in builders die
// with the demo even when it is killed with SIGKILL and can clean nothing
// up (issue 18): they carry SIGKILL as their parent-death signal.
func TestDemoKilledTakesItsChildren(t *testing.T) {
	p := startDemoProc(t, "--state-dir", t.TempDir())
	p.waitLine(t, "reservation ready on")
	kids := children(t, p.cmd.Process.Pid)
	if len(kids) < 2 {
		t.Fatalf("demo has children %v, want HAProxy and a stand-in builder", kids)
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.finish()
	waitGone(t, kids)
}

// TestDemoInterruptIsClean: Ctrl-C (SIGINT) ends the demo with a clean
// message and exit code 0, not "context canceled" (issue 18), and stops
// everything it started.
func TestDemoInterruptIsClean(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			p := startDemoProc(t, "--state-dir", t.TempDir())
			p.waitLine(t, "1. a connection arrives")
			kids := children(t, p.cmd.Process.Pid)
			if err := p.cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			code := p.finish()
			if code != 0 || strings.Contains(p.stderr.String(), "context canceled") || !strings.Contains(p.out.String(), "demo: stopped") {
				t.Errorf("exit %d\nstdout:\n%s\nstderr:\n%s", code, p.out.String(), p.stderr.String())
			}
			waitGone(t, kids)
		})
	}
}

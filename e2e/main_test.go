// Package e2e runs the real daemon binary, and later HAProxy, sshd, Nix and
// Buildbot, together on this machine.
package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// binary is the daemon, built once for the package.
var binary string

func TestMain(m *testing.M) {
	daemontest.MaybeRunBuilder()
	runHolder()
	dir, err := os.MkdirTemp("", "nba-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "nix-builder-autoscaler")
	build := exec.Command("go", "build", "-o", binary, "guardianproject.dev/ops/nix-builder-autoscaler/cmd/nix-builder-autoscaler")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build daemon:", err)
		os.Exit(1)
	}
	code := m.Run()
	ec2test.StopMoto()
	os.RemoveAll(dir)
	os.Exit(code)
}

// shortDir is a temporary directory short enough for unix socket paths.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nba")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		killBuilders(t, dir)
		os.RemoveAll(dir)
	})
	return dir
}

// writeConfig writes a one-pool config; pool is extra TOML for the pool.
func writeConfig(t *testing.T, dir, pool string) string {
	t.Helper()
	text := fmt.Sprintf(`[daemon]
socket = "%[1]s/d.sock"
state_dir = "%[1]s/state"
metrics_listen = ""
reconcile_interval = "1s"

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
provider = "local"
%[2]s
`, dir, pool)
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

type daemonProc struct {
	cmd  *exec.Cmd
	done chan error
}

// startDaemon runs the daemon binary and waits until its API answers.
func startDaemon(t *testing.T, cfg, dir string) *daemonProc {
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(dir, "daemon.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary, "run", "--config", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	d := &daemonProc{cmd: cmd, done: make(chan error, 1)}
	go func() { d.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			_ = d.cmd.Process.Kill()
			<-d.done
		}
		// Each restart registers this; the log (appended by every run)
		// is shown once, its end only.
		if _, shown := shownLogs.LoadOrStore(dir, true); t.Failed() && !shown {
			b, _ := os.ReadFile(filepath.Join(dir, "daemon.log"))
			lines := strings.SplitAfter(string(b), "\n")
			if len(lines) > 400 {
				lines = append([]string{fmt.Sprintf("[... %d earlier lines]\n", len(lines)-400)}, lines[len(lines)-400:]...)
			}
			t.Logf("daemon log (%s):\n%s", dir, strings.Join(lines, ""))
		}
	})
	c := api.NewUnixClient(filepath.Join(dir, "d.sock"))
	testwait.Until(t, "daemon API", func() bool {
		select {
		case err := <-d.done:
			d.done <- err
			t.Fatalf("daemon exited: %v", err)
		default:
		}
		return c.Health(t.Context()) == nil
	})
	return d
}

// shownLogs holds the directories whose daemon log a failed test printed.
var shownLogs sync.Map

// kill sends SIGKILL: no shutdown code runs.
func (d *daemonProc) kill() {
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

// stop sends SIGTERM and expects a clean exit.
func (d *daemonProc) stop(t *testing.T) {
	t.Helper()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		if err != nil {
			t.Errorf("daemon exit after SIGTERM: %v", err)
		}
	case <-time.After(testwait.Bound): // a hang guard
		t.Errorf("daemon still running %v after SIGTERM: stuck", testwait.Bound)
		d.kill()
	}
}

// killBuilders stops every builder process a test's daemon started: the
// local provider's stand-ins (by the pid in their records) and processes
// whose pid a launch hook wrote to <dir>/hook/*.pid.
func killBuilders(t *testing.T, dir string) {
	recs, _ := filepath.Glob(filepath.Join(dir, "state", "local", "instances", "*.json"))
	for _, f := range recs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var r struct {
			PID int `json:"pid"`
		}
		if json.Unmarshal(b, &r) == nil && r.PID > 0 {
			_ = syscall.Kill(-r.PID, syscall.SIGKILL)
		}
	}
	for _, pid := range aliveBuilders(t, filepath.Join(dir, "hook")) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

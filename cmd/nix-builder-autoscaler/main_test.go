package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

func TestMain(m *testing.M) {
	// The demo's stand-in builders are this binary's local-builder command.
	if len(os.Args) > 1 && os.Args[1] == "local-builder" {
		os.Exit(local.BuilderMain(os.Args[2:]))
	}
	// The demo tests run the command in a process of its own, to kill it.
	if os.Getenv(runMainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	code := m.Run()
	ec2test.StopMoto() // the preflight tests' moto_server, if started
	os.Exit(code)
}

const testdata = "../../internal/config/testdata"

func TestCheckConfigBadFilesListEveryProblem(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(testdata, "bad", "*.toml"))
	if err != nil || len(files) < 8 {
		t.Fatalf("bad configs: %v %v", files, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			want, err := os.ReadFile(f + ".want")
			if err != nil {
				t.Fatal(err)
			}
			var stdout, stderr bytes.Buffer
			if code := run([]string{"check-config", f}, &stdout, &stderr); code != 1 {
				t.Fatalf("exit %d, want 1; stderr:\n%s", code, stderr.String())
			}
			for _, line := range strings.Split(strings.TrimSpace(string(want)), "\n") {
				if !strings.Contains(stderr.String(), line) {
					t.Errorf("stderr lacks problem %q; got:\n%s", line, stderr.String())
				}
			}
		})
	}
}

func TestCheckConfigJSON(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run([]string{"check-config", "--json", filepath.Join(testdata, "bad", "many-problems.toml")}, &stdout, &stderr)
	var got struct {
		OK       bool `json:"ok"`
		Problems []struct{ Key, Message string }
	}
	if err := json.Unmarshal(stdout.Bytes(), &got); err != nil {
		t.Fatalf("--json output does not parse: %v\n%s", err, stdout.String())
	}
	if code != 1 || got.OK || len(got.Problems) != 12 {
		t.Fatalf("exit %d, ok %v, %d problems; want 1, false, 12", code, got.OK, len(got.Problems))
	}
	if got.Problems[0].Key != "daemon.token_file" {
		t.Errorf("first problem key %q, want daemon.token_file", got.Problems[0].Key)
	}
}

func TestCheckConfigGoodFiles(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(testdata, "good", "*.toml"))
	if len(files) < 2 {
		t.Fatalf("good configs: %v", files)
	}
	for _, f := range files {
		var stdout, stderr bytes.Buffer
		if code := run([]string{"check-config", f}, &stdout, &stderr); code != 0 {
			t.Errorf("%s: exit %d; stderr:\n%s", f, code, stderr.String())
		}
	}
}

func TestUsage(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"frobnicate"}, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "unknown command") {
		t.Errorf("unknown command: exit %d, stderr %q", code, stderr.String())
	}
	if code := run([]string{"check-config"}, &stdout, &stderr); code != 2 {
		t.Errorf("check-config without a file: exit %d, want 2", code)
	}
	if code := run([]string{"check-config", "/nonexistent.toml"}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "/nonexistent.toml") {
		t.Errorf("missing file: exit %d, stderr %q", code, stderr.String())
	}
}

// TestDemo runs the README's first command end to end with a real HAProxy:
// a connection scales a builder up from zero, a reservation is served,
// connections are steered, and the idle builder drains away.
func TestDemo(t *testing.T) {
	dir := t.TempDir()
	first := runDemoOnce(t, dir)
	// Run again on the same state directory: the walk shows this run's
	// events only, not the first run's again (issue 18).
	second := runDemoOnce(t, dir)
	m := regexp.MustCompile(`reservation (\S+) is pending`).FindStringSubmatch(first)
	if m == nil {
		t.Fatalf("first run names no reservation:\n%s", first)
	}
	for _, line := range strings.Split(second, "\n") {
		if strings.Contains(line, " event ") && strings.Contains(line, m[1]) {
			t.Errorf("second run reprints the first run's event %q", line)
		}
	}
}

func runDemoOnce(t *testing.T, dir string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run([]string{"demo", "--once", "--state-dir", dir}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("demo exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
	}
	for _, want := range []string{
		`HAProxy held it until a builder was up; it answered "SSH-2.0-`,
		"reservation ready on demo/slot1",
		"haproxy slot1  UP",
		"sessions 4",
		"event drained",
		"every slot is empty again",
	} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, stdout.String())
		}
	}
	return stdout.String()
}

package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
)

const onePool = "../../haproxy/testdata/golden/one-pool.toml"

func generated(t *testing.T, spoePath string) haproxy.Files {
	t.Helper()
	cfg, err := config.Load(onePool)
	if err != nil {
		t.Fatal(err)
	}
	files, err := haproxy.Generate(cfg.HAProxySpec(), haproxy.Options{SPOEPath: spoePath})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func TestHAProxyConfigOut(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "new")
	var stdout, stderr bytes.Buffer
	if code := haproxyConfigCmd([]string{"--config", onePool, "--out", dir}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", code, stderr.String())
	}
	want := generated(t, filepath.Join(dir, "nba-spoe.conf"))
	for name, data := range map[string][]byte{"haproxy.cfg": want.HAProxyCfg, "nba-spoe.conf": want.SPOEConf} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Errorf("%s differs from haproxy.Generate's output", name)
		}
		if !strings.Contains(stdout.String(), "wrote "+filepath.Join(dir, name)) {
			t.Errorf("stdout does not report %s: %q", name, stdout.String())
		}
	}
	if leftovers, _ := filepath.Glob(filepath.Join(dir, ".*")); len(leftovers) > 0 {
		t.Errorf("temporary files left behind: %v", leftovers)
	}
}

// TestHAProxyConfigGolden renders the config files under haproxy's
// testdata/golden into the golden files there: the daemon's config, turned
// into a haproxy.Spec, makes the files haproxy's own golden tests expect.
func TestHAProxyConfigGolden(t *testing.T) {
	const golden = "../../haproxy/testdata/golden"
	for _, name := range []string{"one-pool", "two-pools"} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			var stdout, stderr bytes.Buffer
			args := []string{"--config", filepath.Join(golden, name+".toml"), "--out", dir, "--spoe-path", "/etc/haproxy/nba-spoe.conf"}
			if code := haproxyConfigCmd(args, &stdout, &stderr); code != 0 {
				t.Fatalf("exit %d; stderr:\n%s", code, stderr.String())
			}
			for out, want := range map[string]string{"haproxy.cfg": name + ".cfg", "nba-spoe.conf": name + ".spoe.conf"} {
				got, err := os.ReadFile(filepath.Join(dir, out))
				if err != nil {
					t.Fatal(err)
				}
				wantData, err := os.ReadFile(filepath.Join(golden, want))
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, wantData) {
					t.Errorf("%s differs from %s", out, filepath.Join(golden, want))
				}
			}
		})
	}
}

func TestHAProxyConfigOutRelativeDir(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	abs := filepath.Join(wd, onePool)
	tmp := t.TempDir()
	t.Chdir(tmp)
	var stdout, stderr bytes.Buffer
	if code := haproxyConfigCmd([]string{"-c", abs, "--out", "etc"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", code, stderr.String())
	}
	cfg, err := os.ReadFile(filepath.Join(tmp, "etc", "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	// haproxy.cfg names the SPOE file by its absolute path.
	want := "config " + filepath.Join(tmp, "etc", "nba-spoe.conf") + "\n"
	if !strings.Contains(string(cfg), want) {
		t.Errorf("haproxy.cfg lacks %q", want)
	}
}

func TestHAProxyConfigOutElsewhere(t *testing.T) {
	dir := t.TempDir()
	var stdout, stderr bytes.Buffer
	args := []string{"--config", onePool, "--out", dir, "--spoe-path", "/etc/haproxy/nba-spoe.conf"}
	if code := haproxyConfigCmd(args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", code, stderr.String())
	}
	cfg, err := os.ReadFile(filepath.Join(dir, "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(cfg, generated(t, "/etc/haproxy/nba-spoe.conf").HAProxyCfg) {
		t.Error("haproxy.cfg does not use --spoe-path")
	}
	if !strings.Contains(stdout.String(), "/etc/haproxy/nba-spoe.conf") {
		t.Errorf("stdout does not say where the SPOE file belongs: %q", stdout.String())
	}
}

func TestHAProxyConfigStdout(t *testing.T) {
	var stdout, stderr bytes.Buffer
	args := []string{"--config", onePool, "--stdout", "--spoe-path", "/etc/haproxy/nba-spoe.conf"}
	if code := haproxyConfigCmd(args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", code, stderr.String())
	}
	if want := generated(t, "/etc/haproxy/nba-spoe.conf").HAProxyCfg; !bytes.Equal(stdout.Bytes(), want) {
		t.Errorf("stdout is not haproxy.cfg:\n%s", stdout.String())
	}
	if stderr.Len() > 0 {
		t.Errorf("stderr: %q", stderr.String())
	}
}

func TestHAProxyConfigErrors(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("[[pool]]\nname = \"x86\"\nmax_builders = 0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"no output", []string{"--config", onePool}, 2, []string{"--out DIR or --stdout"}},
		{"both outputs", []string{"--config", onePool, "--out", "x", "--stdout", "--spoe-path", "/a"}, 2, []string{"exclude each other"}},
		{"stdout without spoe path", []string{"--config", onePool, "--stdout"}, 2, []string{"--stdout needs --spoe-path"}},
		{"relative spoe path", []string{"--config", onePool, "--stdout", "--spoe-path", "nba.conf"}, 2, []string{"not an absolute path"}},
		{"extra argument", []string{"--config", onePool, "--stdout", "--spoe-path", "/a", "extra"}, 2, []string{`unexpected argument "extra"`}},
		{"unknown flag", []string{"--frobnicate"}, 2, []string{"unknown flag"}},
		{"missing config", []string{"--config", "/nonexistent.toml", "--stdout", "--spoe-path", "/a"}, 1, []string{"/nonexistent.toml"}},
		{"invalid config", []string{"--config", bad, "--stdout", "--spoe-path", "/a"}, 1, []string{"problem(s)", "max_builders", "systems"}},
		{"config without HAProxy settings", []string{"--config", "../../internal/config/testdata/good/minimal.toml", "--stdout", "--spoe-path", "/a"},
			1, []string{"cannot generate HAProxy's configuration", "haproxy.runtime_socket: is required", `pool[0] (name "x86").frontend: is required`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := haproxyConfigCmd(tc.args, &stdout, &stderr)
			if code != tc.code {
				t.Errorf("exit %d, want %d; stderr:\n%s", code, tc.code, stderr.String())
			}
			for _, want := range tc.want {
				if !strings.Contains(stderr.String(), want) {
					t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
				}
			}
			if stdout.Len() > 0 {
				t.Errorf("stdout not empty on failure: %q", stdout.String())
			}
		})
	}
}

func TestHAProxyConfigHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := haproxyConfigCmd([]string{"--help"}, &stdout, &stderr); code != 0 {
		t.Errorf("--help: exit %d", code)
	}
	if !strings.Contains(stdout.String(), "--spoe-path PATH") {
		t.Errorf("--help does not show the usage on stdout: %q", stdout.String())
	}
}

package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
)

const ctlSecret = "ctl-SECRET-4e1d8a2b9c7f60351d2e3f4a5b6c7d8e"

// TestCtlNeverPrintsToken runs every command against a daemon's TCP API,
// with the right token, a wrong one and a file holding the token with junk,
// in text and JSON: the token shows up in no output.
func TestCtlNeverPrintsToken(t *testing.T) {
	dir := daemontest.ShortDir(t)
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(ctlSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wrongFile := filepath.Join(dir, "wrong")
	if err := os.WriteFile(wrongFile, []byte(ctlSecret+"-not-it\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := l.Addr().String()
	l.Close()
	cfg := daemontest.ConfigWithDaemon(t, fmt.Sprintf("listen = %q\ntoken_file = %q", listen, tokenFile), "max_builders = 1")
	daemontest.Start(t, cfg)
	url := "http://" + listen

	cmds := [][]string{
		{"health"}, {"status"}, {"slots"}, {"reservations"}, {"events"},
		{"reserve", "--system", "x86_64-linux"}, {"heartbeat", "no-such"}, {"release", "no-such"},
		{"drain", "x86/slot1"}, {"undrain", "x86/slot1"}, {"weight", "x86/slot1", "50"}, {"reconcile-now"},
		{"bogus"}, {"status", "--bogus"},
	}
	ran := 0
	for _, tf := range []string{tokenFile, wrongFile} {
		for _, c := range cmds {
			for _, js := range [][]string{nil, {"--json"}} {
				args := append(append([]string{"--url", url, "--token-file", tf}, js...), c...)
				code, stdout, stderr := runCLI(t, args...)
				ran++
				if strings.Contains(stdout, ctlSecret) || strings.Contains(stderr, ctlSecret) {
					t.Errorf("autoscalerctl %s (exit %d) prints the token:\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, stdout, stderr)
				}
				if tf == wrongFile && c[0] == "status" && len(c) == 1 && code == exitOK {
					t.Errorf("autoscalerctl %s succeeded with a wrong token", strings.Join(args, " "))
				}
			}
		}
	}
	// The token given through the environment, too.
	t.Setenv("NBA_URL", url)
	t.Setenv("NBA_TOKEN_FILE", tokenFile)
	var out, errb strings.Builder
	code := run([]string{"status"}, &out, &errb)
	if code != exitOK {
		t.Errorf("status with NBA_URL/NBA_TOKEN_FILE: exit %d: %s", code, errb.String())
	}
	if strings.Contains(out.String()+errb.String(), ctlSecret) {
		t.Errorf("status prints the token:\n%s%s", out.String(), errb.String())
	}
	if ran == 0 {
		t.Fatal("no command ran")
	}
}

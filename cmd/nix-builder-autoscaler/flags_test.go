package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestBadFlagsPrintAnError: a bad flag exited 2 printing nothing (issue
// 18). Every command names the flag and shows its usage line.
func TestBadFlagsPrintAnError(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"check-config", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"check-config", "-c", "x.toml"}, "unknown shorthand flag: 'c'"},
		{[]string{"run", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"--bogus"}, "unknown flag: --bogus"},
		{[]string{"demo", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"simulate", "--bogus"}, "unknown flag: --bogus"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tt.args, &stdout, &stderr)
		name := strings.Join(tt.args, " ")
		if code != 2 {
			t.Errorf("%s: exit %d, want 2", name, code)
		}
		if !strings.Contains(stderr.String(), tt.want) || !strings.Contains(stderr.String(), "usage: nix-builder-autoscaler ") {
			t.Errorf("%s: stderr %q, want %q and a usage line", name, stderr.String(), tt.want)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"check-config", "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "--json") {
		t.Errorf("check-config --help: exit %d, stdout %q", code, stdout.String())
	}
}

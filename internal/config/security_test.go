package config

import (
	"fmt"
	"strings"
	"testing"
)

// shellMeta are the bytes that mean something to a POSIX shell (or end a
// word) inside or outside double quotes, and the ones that break a line or
// a template.
const shellMeta = " \t\n\r\x00;&|<>()$`\\\"'*?[]#~=%!{}^,:/@+."

func poolConfig(name string) string {
	return fmt.Sprintf("[[pool]]\nname = %q\nsystems = [\"x86_64-linux\"]\nmax_builders = 2\nprovider = \"local\"\n", name)
}

// TestPoolNamesCannotCarryShell: a pool name reaches user-data templates,
// hook commands, HAProxy config and instance tags; config must accept only
// [a-z0-9_-] in it. Every byte is tried after a valid first letter, and as
// the first letter.
func TestPoolNamesCannotCarryShell(t *testing.T) {
	for b := 0; b < 256; b++ {
		for _, name := range []string{"a" + string(rune(b)) + "b", string([]byte{byte(b)}) + "ab", "ab" + string([]byte{byte(b)})} {
			_, err := Parse([]byte(poolConfig(name)))
			safe := b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || (b == '_' || b == '-') && !strings.HasPrefix(name, string(rune(b)))
			if err == nil && !safe {
				t.Errorf("pool name %q (byte %#x) accepted; want it refused", name, b)
			}
			if err == nil && strings.ContainsAny(name, shellMeta) {
				t.Errorf("pool name %q with a shell metacharacter accepted", name)
			}
		}
	}
	for _, name := range []string{"", "a$(reboot)", "a`id`", "x;rm -rf /", "x|y", "x&&y", "x>y", "x\ny", "../etc", "X86", "x y", "-x", strings.Repeat("a", 33), "x{{.Pool}}", "ünïcode"} {
		if _, err := Parse([]byte(poolConfig(name))); err == nil {
			t.Errorf("pool name %q accepted; want it refused", name)
		} else if name != "" && !strings.Contains(err.Error(), "name") {
			t.Errorf("pool name %q: error does not name the key: %v", name, err)
		}
	}
	for _, name := range []string{"a", "x86", "0", "a-b_c", strings.Repeat("z", 32), "a" + strings.Repeat("-", 31), "9" + strings.Repeat("_", 31)} {
		if _, err := Parse([]byte(poolConfig(name))); err != nil {
			t.Errorf("valid pool name %q refused: %v", name, err)
		}
	}
}

// TestClusterNameCannotCarryShell: the cluster name is in user data and
// tags too.
func TestClusterNameCannotCarryShell(t *testing.T) {
	for b := 0; b < 256; b++ {
		name := "nix" + string([]byte{byte(b)}) + "x"
		_, err := Parse([]byte(fmt.Sprintf("[daemon]\ncluster = %q\n", name) + poolConfig("x86")))
		if err == nil && strings.ContainsAny(name, shellMeta+"_") {
			t.Errorf("cluster %q (byte %#x) accepted; want it refused", name, b)
		}
	}
}

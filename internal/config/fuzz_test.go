package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary text to Parse: it never panics, and it returns
// either a config that validates again or an error (non-empty Problems when
// the error is Problems).
func FuzzParse(f *testing.F) {
	for _, dir := range []string{"testdata/good", "testdata/bad"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.toml"))
		for _, file := range files {
			if b, err := os.ReadFile(file); err == nil && len(b) <= 64<<10 {
				f.Add(b)
			}
		}
	}
	for _, s := range []string{
		"",
		"[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nmax_builders = 2\nprovider = \"local\"\n",
		"[[pool]]\nname = \"a;b\"\nsystems = [\"x86_64-linux\"]\nmax_builders = 2\nprovider = \"local\"\n",
		"[daemon]\nlisten = 5\n[[pool]]\nname = 1\n",
		"[[pool]]\n[[pool]]\n[pool.ec2]\nuser_data = \"{{.Pool\"\n",
		"[daemon]\nreconcile_interval = \"-1s\"\nbogus = true\n",
		"x = [[[[[[[[[[1]]]]]]]]]]",
		"[tailscale]\nhostname = \"{{\"\n",
		// Issue 18's repros: a sum that wrapped, nesting that cost the
		// decoder gigabytes, a long value echoed whole; and text that only
		// looks deep.
		"[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nmax_builders = 2\nmin_builders = 1\nwarm_pool = 9223372036854775807\nprovider = \"local\"\n",
		"x = " + strings.Repeat("{a=", 8000) + "1" + strings.Repeat("}", 8000),
		strings.Repeat("a.", 4000) + "a = 1",
		"[" + strings.Repeat("a.", 4000) + "a]\n",
		"s = '''[{'''\nt = \"\\\"[\"\nx = [[1.5], {a.b = {c = 2}}] # [{\n",
		"[daemon]\ncluster = \"" + strings.Repeat("A", 10000) + "\"\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 64<<10 {
			t.Skip()
		}
		cfg, err := Parse(data)
		if err != nil {
			if cfg != nil {
				t.Fatalf("Parse(%q) returned a config and the error %v", data, err)
			}
			var ps Problems
			if errors.As(err, &ps) && len(ps) == 0 {
				t.Fatalf("Parse(%q) returned empty Problems", data)
			}
			return
		}
		if cfg == nil {
			t.Fatalf("Parse(%q) returned neither a config nor an error", data)
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Parse(%q) accepted a config that does not validate again: %v", data, err)
		}
	})
}

package config

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

// allocated returns the bytes f allocates (TotalAlloc grows monotonically,
// so the delta bounds f's memory whatever the GC does meanwhile).
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

func poolWith(extra string) string {
	return "[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nprovider = \"local\"\n" + extra
}

// TestIntegerBoundsNameTheKey: every integer key has an upper bound, so
// that sums of them cannot wrap. The repro, min_builders = 1,
// warm_pool = MaxInt64, max_builders = 2, was accepted because
// min_builders + warm_pool wrapped negative.
func TestIntegerBoundsNameTheKey(t *testing.T) {
	huge := strconv.FormatInt(math.MaxInt64, 10)
	tests := []struct {
		extra, key string
	}{
		{"max_builders = 2\nmin_builders = 1\nwarm_pool = " + huge + "\n", `pool[0] (name "x86").warm_pool: ` + huge + ` is more than 64`},
		{"max_builders = 2\nwarm_pool = 1\nmin_builders = " + huge + "\n", `pool[0] (name "x86").min_builders: ` + huge + ` is more than 64`},
		{"max_builders = " + huge + "\n", `pool[0] (name "x86").max_builders: ` + huge + ` is more than 64`},
		{"max_builders = 2\nreservations_per_builder = " + huge + "\n", `pool[0] (name "x86").reservations_per_builder: ` + huge + ` is more than 1024`},
		{"max_builders = 2\nmax_jobs = " + huge + "\n", `pool[0] (name "x86").max_jobs: ` + huge + ` is more than 1024`},
		{"max_builders = " + huge + "\nforecast_max_builders = " + huge + "\n", `pool[0] (name "x86").forecast_max_builders: ` + huge + ` is outside`},
		{"max_builders = 2\ndrain_timeout = \"2562047h\"\n", `pool[0] (name "x86").drain_timeout: "2562047h" is longer than 8784h`},
		{"max_builders = 2\nidle_timeout = \"2562047h\"\n", `pool[0] (name "x86").idle_timeout: "2562047h" is longer than 8784h`},
		{"max_builders = 2\nmax_lifetime = \"2562047h\"\n", `pool[0] (name "x86").max_lifetime: "2562047h" is longer than 8784h`},
		{"max_builders = 2\nwarm_for = \"2562047h\"\n", `pool[0] (name "x86").warm_for: "2562047h" is longer than 8784h`},
		{"max_builders = 2\n[pool.local]\nboot_delay = \"2562047h\"\n", `pool[0] (name "x86").local.boot_delay: "2562047h" is longer than 8784h`},
	}
	for _, tt := range tests {
		t.Run(tt.key[:strings.IndexByte(tt.key, ':')], func(t *testing.T) {
			lines := problemLines(t, poolWith(tt.extra))
			found := false
			for _, l := range lines {
				found = found || strings.HasPrefix(l, tt.key)
			}
			if !found {
				t.Errorf("problems %q lack one starting %q", lines, tt.key)
			}
		})
	}
	lines := problemLines(t, "[reservations]\npending_timeout = \"2562047h\"\n"+poolWith("max_builders = 2\n"))
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "reservations.pending_timeout: \"2562047h\" is longer than") {
		t.Errorf("pending_timeout: problems %q", lines)
	}
}

func TestDeepNestingRefusedCheaply(t *testing.T) {
	const n = 8000 // the repro: 48 KB that cost the decoder 3.5 GB
	dotted := strings.TrimSuffix(strings.Repeat("a.", n), ".")
	for name, text := range map[string]string{
		"inline tables":  "x = " + strings.Repeat("{a=", n) + "1" + strings.Repeat("}", n),
		"arrays":         "x = " + strings.Repeat("[", n) + "1" + strings.Repeat("]", n),
		"dotted key":     dotted + " = 1",
		"table header":   "[" + dotted + "]\nx = 1",
		"array header":   "[[" + dotted + "]]\nx = 1",
		"inline dotted":  "x = {" + dotted + " = 1}",
		"nested dotted":  "x = " + strings.Repeat("{a.b.c.d.e.f.g.h = ", 6) + "1" + strings.Repeat("}", 6),
		"in a pool":      poolWith("max_builders = 2\nlocal = " + strings.Repeat("{a=", n) + "1" + strings.Repeat("}", n)),
		"after a string": "s = \"[{\\\"\"\nx = " + strings.Repeat("{a=", n) + "1" + strings.Repeat("}", n),
	} {
		t.Run(name, func(t *testing.T) {
			var err error
			alloc := allocated(func() { _, err = Parse([]byte(text)) })
			var ne *NestingError
			if !errors.As(err, &ne) {
				t.Fatalf("Parse = %v, want a NestingError", err)
			}
			if alloc > 4<<20 {
				t.Errorf("Parse allocated %d bytes, want at most 4 MiB", alloc)
			}
		})
	}
}

// TestNestingAllowsWhatLooksDeep: brackets and dots inside strings and
// comments, and floats, do not nest.
func TestNestingAllowsWhatLooksDeep(t *testing.T) {
	deep := strings.Repeat("[{", 100)
	for _, text := range []string{
		"a = \"" + deep + "\"",
		"a = '" + deep + "'",
		"a = \"\"\"\n" + deep + "\n\"\"\"",
		"a = '''\n" + deep + "\n'''",
		"a = \"\\\"" + deep + "\"",
		"# " + deep + "\na = 1",
		"\"" + strings.Repeat("a.", 100) + "\" = 1",
		"a = [" + strings.Repeat("1.5, ", 100) + "2.5]",
		"a = " + strings.Repeat("[", MaxNesting) + strings.Repeat("]", MaxNesting),
	} {
		if err := checkNesting([]byte(text)); err != nil {
			t.Errorf("checkNesting(%.40q…) = %v, want nil", text, err)
		}
	}
	if err := checkNesting([]byte("a = " + strings.Repeat("[", MaxNesting+1) + strings.Repeat("]", MaxNesting+1))); err == nil {
		t.Errorf("%d nested arrays passed", MaxNesting+1)
	}
}

func TestOversizedFileRefused(t *testing.T) {
	big := poolWith("max_builders = 2\n") + "# " + strings.Repeat("x", MaxFileSize) + "\n"
	path := filepath.Join(t.TempDir(), "big.toml")
	if err := os.WriteFile(path, []byte(big), 0o600); err != nil {
		t.Fatal(err)
	}
	var err error
	alloc := allocated(func() { _, err = Load(path) })
	var fe *FileTooLargeError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "1 MiB") {
		t.Fatalf("Load = %v, want a FileTooLargeError naming %s and 1 MiB", err, path)
	}
	if alloc > 8<<20 {
		t.Errorf("Load allocated %d bytes, want at most 8 MiB", alloc)
	}
	if _, err := Parse([]byte(big)); !errors.As(err, &fe) {
		t.Errorf("Parse = %v, want a FileTooLargeError", err)
	}
}

func TestDevZeroRefused(t *testing.T) {
	var err error
	alloc := allocated(func() { _, err = Load("/dev/zero") })
	var fe *FileTooLargeError
	if !errors.As(err, &fe) {
		t.Fatalf("Load(/dev/zero) = %v, want a FileTooLargeError", err)
	}
	if alloc > 8<<20 {
		t.Errorf("Load allocated %d bytes, want at most 8 MiB", alloc)
	}
}

func TestSecretFileCapped(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "token")
	if err := os.WriteFile(small, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadSecretFile(small, "token_file"); err != nil || string(b) != "secret\n" {
		t.Errorf("ReadSecretFile = %q, %v", b, err)
	}
	var fe *FileTooLargeError
	if _, err := ReadSecretFile("/dev/zero", "token_file"); !errors.As(err, &fe) || !strings.Contains(err.Error(), "token_file") {
		t.Errorf("ReadSecretFile(/dev/zero) = %v, want a FileTooLargeError naming token_file", err)
	}
}

// TestLongValuesClipped: an error repeats at most the start of a value
// from the file, and says how long it was.
func TestLongValuesClipped(t *testing.T) {
	long := strings.Repeat("A", 512<<10)
	const suffix = "…(52"
	for name, text := range map[string]string{
		"invalid value":   "[daemon]\ncluster = \"" + long + "\"\n" + poolWith("max_builders = 2\n"),
		"wrong type":      poolWith("max_builders = 2\nfeatures = \"" + long + "\"\n"),
		"string for int":  poolWith("max_builders = \"" + long + "\"\n"),
		"unknown key":     "[daemon]\n" + strings.ToLower(long) + " = 1\n" + poolWith("max_builders = 2\n"),
		"bad duration":    poolWith("max_builders = 2\ndrain_timeout = \"" + long + "\"\n"),
		"syntax last key": "[daemon]\n" + strings.ToLower(long) + " = \n",
		"bad template":    poolWith("max_builders = 2\n[pool.local]\nlaunch_command = \"{{" + long + "\"\nterminate_command = \"x\"\n"),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(text))
			if err == nil {
				t.Fatal("Parse accepted it")
			}
			msg := err.Error()
			if len(msg) > 2048 {
				t.Errorf("error is %d bytes long, want the value clipped: %.300s…", len(msg), msg)
			}
			var pe toml.ParseError
			if name != "bad template" && name != "syntax last key" && !strings.Contains(msg, suffix) {
				t.Errorf("error %q does not say the value's length", msg)
			}
			if name == "syntax last key" && !errors.As(err, &pe) {
				t.Errorf("syntax error %v does not unwrap to a toml.ParseError", err)
			}
		})
	}
}

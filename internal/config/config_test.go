package config

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
)

var update = flag.Bool("update", false, "rewrite testdata/bad/*.toml.want from the current output")

// minimalPool is the smallest valid pool, for configs that test something
// else.
const minimalPool = `
[[pool]]
name = "x86"
systems = ["x86_64-linux"]
max_builders = 2
provider = "local"
`

func TestDefault(t *testing.T) {
	d := Default()
	tests := []struct {
		name string
		got  any
		want any
	}{
		{"daemon.cluster", d.Daemon.Cluster, "nix-builders"},
		{"daemon.socket", d.Daemon.Socket, "/run/nix-builder-autoscaler/daemon.sock"},
		{"daemon.socket_group", d.Daemon.SocketGroup, ""},
		{"daemon.listen", d.Daemon.Listen, ""},
		{"daemon.token_file", d.Daemon.TokenFile, ""},
		{"daemon.metrics_listen", d.Daemon.MetricsListen, "127.0.0.1:9464"},
		{"daemon.state_dir", d.Daemon.StateDir, "/var/lib/nix-builder-autoscaler"},
		{"daemon.database", d.Daemon.Database, ""},
		{"daemon.DatabasePath()", d.Daemon.DatabasePath(), "/var/lib/nix-builder-autoscaler/state.db"},
		{"daemon.log_level", d.Daemon.LogLevel, "info"},
		{"daemon.log_format", d.Daemon.LogFormat, "text"},
		{"daemon.reconcile_interval", d.Daemon.ReconcileInterval.D(), 10 * time.Second},
		{"daemon.event_retention", d.Daemon.EventRetention.D(), 720 * time.Hour},
		{"reservations.lease", d.Reservations.Lease.D(), 10 * time.Minute},
		{"reservations.max_lease", d.Reservations.MaxLease.D(), 24 * time.Hour},
		{"reservations.pending_timeout", d.Reservations.PendingTimeout.D(), time.Hour},
		{"reservations.max_poll", d.Reservations.MaxPoll.D(), 60 * time.Second},
		{"pools", len(d.Pools), 0},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("%s = %v, want %v", tt.name, tt.got, tt.want)
		}
	}
}

func TestDefaultPool(t *testing.T) {
	p := DefaultPool()
	tests := []struct {
		name string
		got  any
		want any
	}{
		{"min_builders", p.MinBuilders, 0},
		{"warm_pool", p.WarmPool, 0},
		{"reservations_per_builder", p.ReservationsPerBuilder, 1},
		{"max_jobs", p.MaxJobs, 1},
		{"idle_timeout", p.IdleTimeout.String(), "auto"},
		{"drain_timeout", p.DrainTimeout.D(), 2 * time.Hour},
		{"launch_timeout", p.LaunchTimeout.D(), 5 * time.Minute},
		{"boot_timeout", p.BootTimeout.D(), 10 * time.Minute},
		{"bind_timeout", p.BindTimeout.D(), 5 * time.Minute},
		{"local.address", p.Local.Address, "127.0.0.1"},
		{"local.boot_delay", p.Local.BootDelay.D(), time.Duration(0)},
		{"local.launch_command", p.Local.LaunchCommand, ""},
		{"local.terminate_command", p.Local.TerminateCommand, ""},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("%s = %v, want %v", tt.name, tt.got, tt.want)
		}
	}
}

func mustParse(t *testing.T, data string) *Config {
	t.Helper()
	cfg, err := Parse([]byte(data))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return cfg
}

func TestParseMinimalAppliesDefaults(t *testing.T) {
	got := mustParse(t, minimalPool+`
[[pool]]
name = "arm"
systems = ["aarch64-linux"]
features = ["kvm"]
max_builders = 3
max_jobs = 4
provider = "local"
[pool.local]
boot_delay = "3s"
`)
	want := Default()
	x86 := DefaultPool()
	x86.Name, x86.Systems, x86.MaxBuilders, x86.Provider = "x86", []string{"x86_64-linux"}, 2, "local"
	arm := DefaultPool()
	arm.Name, arm.Systems, arm.Features, arm.MaxBuilders, arm.MaxJobs, arm.Provider =
		"arm", []string{"aarch64-linux"}, []string{"kvm"}, 3, 4, "local"
	arm.Local.BootDelay = NewDuration(3 * time.Second)
	want.Pools = []Pool{x86, arm}
	if !reflect.DeepEqual(*got, want) {
		t.Errorf("Parse =\n%+v\nwant\n%+v", *got, want)
	}
}

func TestParseExplicitZeroAndEmpty(t *testing.T) {
	got := mustParse(t, `
[daemon]
metrics_listen = ""
socket_group = ""
[[pool]]
name = "x86"
systems = ["x86_64-linux"]
max_builders = 2
min_builders = 0
warm_pool = 0
provider = "local"
[pool.local]
boot_delay = "0s"
`)
	if got.Daemon.MetricsListen != "" {
		t.Errorf("metrics_listen = %q, want empty (disabled)", got.Daemon.MetricsListen)
	}
	p := got.Pools[0]
	if p.MinBuilders != 0 || p.WarmPool != 0 || p.Local.BootDelay.D() != 0 {
		t.Errorf("pool = %+v, want min_builders, warm_pool and boot_delay 0", p)
	}
}

// fullWant is testdata/good/full.toml as a value.
func fullWant() Config {
	d := func(s string) Duration {
		v, err := time.ParseDuration(s)
		if err != nil {
			panic(err)
		}
		return NewDuration(v)
	}
	return Config{
		Daemon: Daemon{
			Cluster:           "ci-builders",
			Socket:            "/run/nba/api.sock",
			SocketGroup:       "buildbot",
			Listen:            "100.64.0.1:8470",
			TokenFile:         "/run/secrets/nba-token",
			MetricsListen:     "[::1]:9465",
			StateDir:          "/srv/nba",
			Database:          "/srv/nba/db/autoscaler.db",
			LogLevel:          "debug",
			LogFormat:         "json",
			ReconcileInterval: d("30s"),
			EventRetention:    d("168h"),
		},
		Reservations: Reservations{
			Lease:          d("15m"),
			MaxLease:       d("12h"),
			PendingTimeout: d("45m"),
			MaxPoll:        d("30s"),
		},
		HAProxy: HAProxy{
			RuntimeSocket: "/run/haproxy/nba.sock",
			AgentListen:   "127.0.0.1:5600",
			SPOAListen:    "127.0.0.1:12400",
			Hold:          d("5m"),
			CheckInterval: d("2s"),
			AgentInterval: d("10s"),
			StatsListen:   "127.0.0.1:8405",
			StateFile:     "/var/lib/haproxy/nba.state",
			Timeout:       d("3s"),
			Log:           "stdout",
			Placeholder:   "192.0.2.7:2222",
		},
		Tailscale: Default().Tailscale,
		Pools: []Pool{{
			Name:                   "x86",
			Systems:                []string{"x86_64-linux", "i686-linux"},
			Features:               []string{"kvm", "nixos-test", "big-parallel"},
			MaxBuilders:            8,
			MinBuilders:            1,
			WarmPool:               2,
			ReservationsPerBuilder: 2,
			MaxJobs:                4,
			IdleTimeout:            NewTimeout(10 * time.Minute),
			DrainTimeout:           d("3h"),
			LaunchTimeout:          d("4m"),
			BootTimeout:            d("15m"),
			BindTimeout:            d("3m"),
			Frontend:               "0.0.0.0:2222",
			MaxLifetime:            d("0s"),
			BillingMinimum:         d("30s"),
			Provider:               "local",
			EC2:                    DefaultPool().EC2,
			Local: Local{
				Address:          "127.0.0.2",
				BootDelay:        d("20s"),
				LaunchCommand:    "/usr/local/bin/start-builder {{quote .Pool}} {{quote .Slot}}",
				TerminateCommand: "/usr/local/bin/stop-builder {{.InstanceID}}",
			},
		}, {
			Name:                   "arm",
			Systems:                []string{"aarch64-linux"},
			Features:               []string{},
			MaxBuilders:            2,
			ReservationsPerBuilder: 1,
			MaxJobs:                1,
			IdleTimeout:            Auto(),
			DrainTimeout:           d("30m"),
			LaunchTimeout:          d("2m"),
			BootTimeout:            d("5m"),
			BindTimeout:            d("1m"),
			Frontend:               "0.0.0.0:2223",
			MaxLifetime:            d("0s"),
			Provider:               "local",
			EC2:                    DefaultPool().EC2,
			Local:                  Local{Address: "127.0.0.3", BootDelay: d("0s")},
		}},
	}
}

func TestFullRoundTrip(t *testing.T) {
	got, err := Load("testdata/good/full.toml")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	want := fullWant()
	if !reflect.DeepEqual(*got, want) {
		t.Fatalf("Load(full.toml) =\n%+v\nwant\n%+v", *got, want)
	}

	// Writing the config out and reading it back gives the same config.
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(got); err != nil {
		t.Fatalf("Encode: %v", err)
	}
	again, err := Parse(buf.Bytes())
	if err != nil {
		t.Fatalf("Parse(encoded): %v\n%s", err, buf.String())
	}
	if !reflect.DeepEqual(again, got) {
		t.Errorf("round trip =\n%+v\nwant\n%+v\nencoded:\n%s", *again, *got, buf.String())
	}
}

func TestGoodFiles(t *testing.T) {
	files, err := filepath.Glob("testdata/good/*.toml")
	if err != nil || len(files) < 2 {
		t.Fatalf("testdata/good: %v files, err %v", len(files), err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			cfg, err := Load(f)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if err := cfg.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

// TestBadFiles compares the problems reported for each testdata/bad/*.toml
// with its .want file. Run with -update to rewrite the .want files.
func TestBadFiles(t *testing.T) {
	files, err := filepath.Glob("testdata/bad/*.toml")
	if err != nil || len(files) < 8 {
		t.Fatalf("testdata/bad: %v files, err %v", len(files), err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := Parse(data)
			if err == nil {
				t.Fatalf("Parse = %+v, want an error", cfg)
			}
			got := err.Error() + "\n"
			if *update {
				if err := os.WriteFile(f+".want", []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(f + ".want")
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("problems differ\ngot:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// problemLines parses data and returns its problems, one line each.
func problemLines(t *testing.T, data string) []string {
	t.Helper()
	_, err := Parse([]byte(data))
	if err == nil {
		return nil
	}
	var ps Problems
	if !errors.As(err, &ps) {
		t.Fatalf("Parse error %v (%T), want Problems", err, err)
	}
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return lines
}

func TestProblems(t *testing.T) {
	tests := []struct {
		name string
		toml string
		want []string
	}{
		{
			name: "valid",
			toml: minimalPool,
		},
		{
			name: "no pool",
			toml: "",
			want: []string{"pool: at least one [[pool]] is required; add a [[pool]] table with name, systems, max_builders and provider"},
		},
		{
			name: "unknown top-level key",
			toml: "verbose = true\n" + minimalPool,
			want: []string{"verbose: unknown key; check the spelling against docs/configuration.md"},
		},
		{
			name: "unknown key in the second pool",
			toml: minimalPool + `
[[pool]]
name = "arm"
systems = ["aarch64-linux"]
max_builders = 1
provider = "local"
[pool.local]
bootdelay = "1s"
`,
			want: []string{`pool[1] (name "arm").local.bootdelay: unknown key; check the spelling against docs/configuration.md`},
		},
		{
			name: "key in the wrong case",
			toml: "[daemon]\nLISTEN = \"127.0.0.1:1\"\n" + minimalPool,
			want: []string{"daemon.LISTEN: unknown key; check the spelling against docs/configuration.md (did you mean listen? keys are lower case)"},
		},
		{
			name: "bad duration",
			toml: "[daemon]\nevent_retention = \"30 days\"\n" + minimalPool,
			want: []string{`daemon.event_retention: "30 days" is not a duration; write it like "5m" or "1h30m"`},
		},
		{
			name: "negative duration",
			toml: "[reservations]\nmax_poll = \"-5s\"\n" + minimalPool,
			want: []string{`reservations.max_poll: "-5s" is negative; write a positive duration, like "60s" (the default)`},
		},
		{
			name: "zero timeout",
			toml: minimalPool + "idle_timeout = \"0s\"\n",
			want: []string{`pool[0] (name "x86").idle_timeout: "0s" is not above zero; write "auto" (the default: as long as a boot of the pool costs), or a duration like "5m"`},
		},
		{
			name: "idle_timeout neither auto nor a duration",
			toml: minimalPool + "idle_timeout = \"Auto\"\n",
			want: []string{`pool[0] (name "x86").idle_timeout: "Auto" is not a duration; write "auto" (the default: as long as a boot of the pool costs), or a duration like "5m"`},
		},
		{
			name: "idle_timeout a number",
			toml: minimalPool + "idle_timeout = 300\n",
			want: []string{`pool[0] (name "x86").idle_timeout: must be "auto" or a duration in quotes, like idle_timeout = "5m"; got the integer 300`},
		},
		{
			name: "negative billing_minimum",
			toml: minimalPool + "billing_minimum = \"-1m\"\n",
			want: []string{`pool[0] (name "x86").billing_minimum: "-1m" is negative; write "0s" for none, or a duration like "60s" (EC2's)`},
		},
		{
			name: "billing_minimum too long",
			toml: minimalPool + "billing_minimum = \"2h\"\n",
			want: []string{`pool[0] (name "x86").billing_minimum: "2h" is longer than 1h; an idle builder is kept that long after its launch; lower it`},
		},
		{
			name: "billing_minimum not a duration",
			toml: minimalPool + "billing_minimum = \"1 minute\"\n",
			want: []string{`pool[0] (name "x86").billing_minimum: "1 minute" is not a duration; write it like "60s" (EC2's), or "0s" for none`},
		},
		{
			name: "reconcile interval too short",
			toml: "[daemon]\nreconcile_interval = \"100ms\"\n" + minimalPool,
			want: []string{`daemon.reconcile_interval: "100ms" is too short; reconcile_interval must be at least 1s`},
		},
		{
			name: "lease above max_lease",
			toml: "[reservations]\nlease = \"2h\"\nmax_lease = \"1h\"\n" + minimalPool,
			want: []string{"reservations.lease: lease (2h) is longer than max_lease (1h); lower lease or raise max_lease"},
		},
		{
			name: "listen without token_file",
			toml: "[daemon]\nlisten = \"127.0.0.1:8470\"\n" + minimalPool,
			want: []string{"daemon.token_file: token_file is required when listen is set; point it at a file holding the bearer token"},
		},
		{
			name: "listen on all interfaces is allowed",
			toml: "[daemon]\nlisten = \":8470\"\ntoken_file = \"/etc/token\"\n" + minimalPool,
		},
		{
			name: "listen without port",
			toml: "[daemon]\nlisten = \"localhost\"\ntoken_file = \"/etc/token\"\n" + minimalPool,
			want: []string{`daemon.listen: "localhost" is not host:port (missing port in address); write it like "127.0.0.1:8080", or "[::1]:port" for IPv6`},
		},
		{
			name: "metrics port not a number",
			toml: "[daemon]\nmetrics_listen = \"127.0.0.1:99999\"\n" + minimalPool,
			want: []string{`daemon.metrics_listen: port "99999" in "127.0.0.1:99999" is not a number from 0 to 65535; write it like "127.0.0.1:9464"`},
		},
		{
			name: "relative state_dir",
			toml: "[daemon]\nstate_dir = \"state\"\n" + minimalPool,
			want: []string{`daemon.state_dir: "state" is not an absolute path; give a path starting with /, like "/var/lib/nix-builder-autoscaler"`},
		},
		{
			name: "bad log level",
			toml: "[daemon]\nlog_level = \"trace\"\n" + minimalPool,
			want: []string{`daemon.log_level: "trace" is not a log level; use one of: debug, info, warn, error`},
		},
		{
			name: "bad cluster",
			toml: "[daemon]\ncluster = \"-x\"\n" + minimalPool,
			want: []string{`daemon.cluster: "-x" is not a valid cluster name; use 1 to 63 lower-case letters, digits and '-', starting with a letter or digit`},
		},
		{
			name: "max_builders missing",
			toml: "[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nprovider = \"local\"\n",
			want: []string{`pool[0] (name "x86").max_builders: must be at least 1; set max_builders = 1 or more (at most 64)`},
		},
		{
			name: "min_builders plus warm_pool over max",
			toml: "[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nprovider = \"local\"\nmax_builders = 4\nmin_builders = 3\nwarm_pool = 2\n",
			want: []string{`pool[0] (name "x86").min_builders: min_builders (3) + warm_pool (2) exceeds max_builders (4); raise max_builders or lower the others`},
		},
		{
			name: "max_jobs zero",
			toml: minimalPool + "max_jobs = 0\n",
			want: []string{`pool[0] (name "x86").max_jobs: must be at least 1; set max_jobs = 1 or more (at most 1024)`},
		},
		{
			name: "duplicate pool names",
			toml: minimalPool + minimalPool,
			want: []string{`pool[1] (name "x86").name: duplicate name; pool[0] is also named "x86"; give each pool its own name`},
		},
		{
			name: "bad system",
			toml: "[[pool]]\nname = \"x86\"\nsystems = [\"linux\"]\nmax_builders = 1\nprovider = \"local\"\n",
			want: []string{`pool[0] (name "x86").systems[0]: "linux" is not a Nix system; write it like "x86_64-linux" or "aarch64-linux"`},
		},
		{
			name: "duplicate feature",
			toml: minimalPool + "features = [\"kvm\", \"kvm\"]\n",
			want: []string{`pool[0] (name "x86").features[1]: "kvm" is listed twice (also at [0]); remove one`},
		},
		{
			name: "unknown provider",
			toml: "[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nmax_builders = 1\nprovider = \"docker\"\n",
			want: []string{`pool[0] (name "x86").provider: "docker" is not a known provider; use one of: local, ec2`},
		},
		{
			name: "local address not loopback",
			toml: minimalPool + "[pool.local]\naddress = \"10.0.0.1\"\n",
			want: []string{`pool[0] (name "x86").local.address: "10.0.0.1" is not a loopback IPv4 address; use an address in 127.0.0.0/8, like "127.0.0.1"`},
		},
		{
			name: "launch_command without terminate_command",
			toml: minimalPool + "[pool.local]\nlaunch_command = \"run {{.Slot}}\"\n",
			want: []string{`pool[0] (name "x86").local.terminate_command: terminate_command is required when launch_command is set; give the command that stops what launch_command started`},
		},
		{
			name: "launch_command does not parse",
			toml: minimalPool + "[pool.local]\nlaunch_command = \"run {{.Slot\"\nterminate_command = \"stop\"\n",
			want: []string{`pool[0] (name "x86").local.launch_command: is not a valid Go text/template (1: unclosed action); fix the template syntax`},
		},
		{
			name: "commands may use quote",
			toml: minimalPool + "[pool.local]\nlaunch_command = \"run {{quote .StateDir}}\"\nterminate_command = \"stop {{quote .Address}}\"\n",
		},
		{
			name: "unknown template function",
			toml: minimalPool + "[pool.local]\nlaunch_command = \"run {{shellescape .Slot}}\"\nterminate_command = \"stop\"\n",
			want: []string{`pool[0] (name "x86").local.launch_command: is not a valid Go text/template (1: function "shellescape" not defined); fix the template syntax`},
		},
		{
			name: "wrong type",
			toml: "[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nmax_builders = \"2\"\nprovider = \"local\"\n",
			want: []string{`pool[0] (name "x86").max_builders: must be a whole number without quotes, like max_builders = 2; got the string "2"`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := problemLines(t, tt.toml)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("problems:\ngot  %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestMaxBuildersLimit(t *testing.T) {
	got := problemLines(t, "[[pool]]\nname = \"x86\"\nsystems = [\"x86_64-linux\"]\nmax_builders = 65\nprovider = \"local\"\n")
	want := []string{`pool[0] (name "x86").max_builders: 65 is more than 64; lower max_builders, or split the builders over two pools`}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestSyntaxErrorHasLine(t *testing.T) {
	_, err := Parse([]byte("[daemon]\nlisten = \"x\n"))
	var pe toml.ParseError
	if !errors.As(err, &pe) {
		t.Fatalf("Parse = %v (%T), want a toml.ParseError", err, err)
	}
	if got, want := pe.Position.Line, 2; got != want {
		t.Errorf("line = %d, want %d", got, want)
	}
}

func TestLoad(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.toml")
	if _, err := Load(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("Load(missing) = %v, want an error naming %s", err, missing)
	}

	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("[daemon]\nlog_level = \"x\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(bad)
	var ps Problems
	if err == nil || !strings.Contains(err.Error(), bad) || !errors.As(err, &ps) || len(ps) != 2 {
		t.Errorf("Load(bad) = %v, want 2 Problems naming %s", err, bad)
	}
}

func TestValidateBuiltConfig(t *testing.T) {
	cfg := Default()
	p := DefaultPool()
	p.Name, p.Systems, p.MaxBuilders, p.Provider = "x86", []string{"x86_64-linux"}, 1, ProviderLocal
	cfg.Pools = []Pool{p}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	cfg.Pools[0].MaxJobs = 0
	cfg.Pools[0].IdleTimeout = NewTimeout(-time.Second)
	err := cfg.Validate()
	want := `pool[0] (name "x86").max_jobs: must be at least 1; set max_jobs = 1 or more (at most 1024)
pool[0] (name "x86").idle_timeout: "-1s" is negative; write "auto" (the default: as long as a boot of the pool costs), or a positive duration like "5m"`
	if err == nil || err.Error() != want {
		t.Errorf("Validate =\n%v\nwant\n%s", err, want)
	}
}

func TestServes(t *testing.T) {
	p := Pool{Systems: []string{"x86_64-linux", "i686-linux"}, Features: []string{"kvm", "big-parallel"}}
	tests := []struct {
		system   string
		features []string
		want     bool
	}{
		{"x86_64-linux", nil, true},
		{"i686-linux", []string{}, true},
		{"x86_64-linux", []string{"kvm"}, true},
		{"x86_64-linux", []string{"big-parallel", "kvm"}, true},
		{"x86_64-linux", []string{"kvm", "nixos-test"}, false},
		{"aarch64-linux", nil, false},
		{"", nil, false},
	}
	for _, tt := range tests {
		if got := p.Serves(tt.system, tt.features); got != tt.want {
			t.Errorf("Serves(%q, %q) = %v, want %v", tt.system, tt.features, got, tt.want)
		}
	}
}

func TestPoolLookup(t *testing.T) {
	cfg := fullWant()
	tests := []struct {
		name   string
		wantOK bool
	}{
		{"x86", true},
		{"arm", true},
		{"riscv", false},
		{"", false},
	}
	for _, tt := range tests {
		got, ok := cfg.Pool(tt.name)
		if ok != tt.wantOK || (ok && got.Name != tt.name) {
			t.Errorf("Pool(%q) = %q, %v; want ok %v", tt.name, got.Name, ok, tt.wantOK)
		}
	}
}

func TestDatabasePath(t *testing.T) {
	tests := []struct {
		d    Daemon
		want string
	}{
		{Daemon{StateDir: "/var/lib/nba"}, "/var/lib/nba/state.db"},
		{Daemon{StateDir: "/var/lib/nba/"}, "/var/lib/nba/state.db"},
		{Daemon{StateDir: "/var/lib/nba", Database: "/srv/db.sqlite"}, "/srv/db.sqlite"},
	}
	for _, tt := range tests {
		if got := tt.d.DatabasePath(); got != tt.want {
			t.Errorf("%+v.DatabasePath() = %q, want %q", tt.d, got, tt.want)
		}
	}
}

func TestDuration(t *testing.T) {
	tests := []struct {
		text    string
		want    time.Duration
		str     string
		invalid bool
	}{
		{"5m", 5 * time.Minute, "5m", false},
		{"1h30m", 90 * time.Minute, "1h30m", false},
		{"720h", 720 * time.Hour, "720h", false},
		{"90s", 90 * time.Second, "1m30s", false},
		{"1.5s", 1500 * time.Millisecond, "1.5s", false},
		{"0s", 0, "0s", false},
		{"-2m", -2 * time.Minute, "-2m", false},
		{"5 minutes", 0, "5 minutes", true},
		{"", 0, "", true},
	}
	for _, tt := range tests {
		var d Duration
		if err := d.UnmarshalText([]byte(tt.text)); err != nil {
			t.Errorf("UnmarshalText(%q) = %v, want nil (errors are kept for Validate)", tt.text, err)
		}
		if got := d.D(); got != tt.want {
			t.Errorf("UnmarshalText(%q).D() = %v, want %v", tt.text, got, tt.want)
		}
		if got := d.String(); got != tt.str {
			t.Errorf("UnmarshalText(%q).String() = %q, want %q", tt.text, got, tt.str)
		}
		if got := d.err != nil; got != tt.invalid {
			t.Errorf("UnmarshalText(%q) invalid = %v, want %v", tt.text, got, tt.invalid)
		}
		text, err := d.MarshalText()
		if err != nil || string(text) != tt.str {
			t.Errorf("MarshalText(%q) = %q, %v; want %q", tt.text, text, err, tt.str)
		}
	}
	if got, want := NewDuration(time.Hour), (Duration{d: time.Hour}); got != want {
		t.Errorf("NewDuration(1h) = %#v, want %#v", got, want)
	}
}

// TestDocs keeps docs/configuration.md true to the code: every ```toml block
// in it is a valid config, and every key is documented.
func TestDocs(t *testing.T) {
	data, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)

	blocks := 0
	for rest := doc; ; {
		_, after, ok := strings.Cut(rest, "```toml\n")
		if !ok {
			break
		}
		block, tail, _ := strings.Cut(after, "```")
		rest = tail
		blocks++
		if _, err := Parse([]byte(block)); err != nil {
			t.Errorf("toml block %d does not parse clean: %v\n%s", blocks, err, block)
		}
	}
	if blocks < 2 {
		t.Errorf("found %d toml blocks, want the minimal and the full example", blocks)
	}

	for _, typ := range []reflect.Type{
		reflect.TypeFor[Daemon](), reflect.TypeFor[Reservations](), reflect.TypeFor[HAProxy](),
		reflect.TypeFor[Tailscale](), reflect.TypeFor[EC2](),
		reflect.TypeFor[Pool](), reflect.TypeFor[Local](),
	} {
		for i := range typ.NumField() {
			f := typ.Field(i)
			key, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			heading := "### `" + key + "`"
			if f.Type == reflect.TypeFor[Local]() || f.Type == reflect.TypeFor[EC2]() {
				heading = "### `[pool." + key + "]`"
			}
			if !strings.Contains(doc, heading) {
				t.Errorf("docs/configuration.md has no section for %s key %q", typ.Name(), key)
			}
		}
	}
}

func TestHAProxySpec(t *testing.T) {
	cfg, err := Parse([]byte(`
[daemon]
cluster = "ci"

[haproxy]
runtime_socket = "/run/haproxy/nba.sock"
agent_listen = "0.0.0.0:5600"
spoa_listen = "[::1]:12400"
hold = "5m"
check_interval = "2s"
stats_listen = ""
state_file = "/var/lib/haproxy/nba.state"
log = "stdout"
placeholder = "192.0.2.7:2022"

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
features = ["kvm"]
max_builders = 4
max_jobs = 3
frontend = "0.0.0.0:2222"
provider = "local"

[[pool]]
name = "arm"
systems = ["aarch64-linux"]
max_builders = 2
frontend = "[::]:2223"
provider = "local"
`))
	if err != nil {
		t.Fatal(err)
	}
	want := haproxy.Spec{
		Cluster:       "ci",
		RuntimeSocket: "/run/haproxy/nba.sock",
		StateFile:     "/var/lib/haproxy/nba.state",
		Log:           "stdout",
		Placeholder:   "192.0.2.7:2022",
		AgentListen:   "0.0.0.0:5600",
		SPOAListen:    "[::1]:12400",
		StatsListen:   "",
		Hold:          5 * time.Minute,
		CheckInterval: 2 * time.Second,
		AgentInterval: 10 * time.Second,
		Pools: []haproxy.PoolSpec{
			{Name: "x86", Frontend: "0.0.0.0:2222", MaxBuilders: 4, MaxJobs: 3},
			{Name: "arm", Frontend: "[::]:2223", MaxBuilders: 2, MaxJobs: 1},
		},
	}
	if got := cfg.HAProxySpec(); !reflect.DeepEqual(got, want) {
		t.Errorf("HAProxySpec() =\n%+v\nwant\n%+v", got, want)
	}
}

// TestBillingMinimumDefault: left out, billing_minimum is EC2's 60 s for
// an EC2 pool and 0 for a local one; written, it is what it says.
func TestBillingMinimumDefault(t *testing.T) {
	cfg, err := Load("testdata/good/ec2.toml")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	for _, p := range cfg.Pools {
		if got := p.BillingMinimum.D(); got != time.Minute {
			t.Errorf("ec2 pool %s: billing_minimum = %s, want 1m", p.Name, got)
		}
		if !p.IdleTimeout.IsAuto() {
			t.Errorf("ec2 pool %s: idle_timeout = %s, want auto", p.Name, p.IdleTimeout)
		}
	}
	local := mustParse(t, minimalPool)
	if got := local.Pools[0].BillingMinimum.D(); got != 0 {
		t.Errorf("local pool: billing_minimum = %s, want 0", got)
	}
	data, err := os.ReadFile("testdata/good/ec2.toml")
	if err != nil {
		t.Fatal(err)
	}
	zero := mustParse(t, strings.Replace(string(data), "provider = \"ec2\"\n", "provider = \"ec2\"\nbilling_minimum = \"0s\"\n", 1))
	if got := zero.Pools[0].BillingMinimum.D(); got != 0 {
		t.Errorf("ec2 pool with billing_minimum = \"0s\": %s, want 0", got)
	}
	if got := zero.Pools[1].BillingMinimum.D(); got != time.Minute {
		t.Errorf("the other ec2 pool: billing_minimum = %s, want 1m", got)
	}
}

// Package config reads the daemon's single TOML config file (docs/design.md §2,
// §3): daemon settings, reservation leases and the builder pools.
//
// Reading is strict: unknown keys, values of the wrong type and values out of
// range are all reported together as Problems, each naming the key and how to
// fix it. Keys that are absent keep the defaults of Default and DefaultPool.
// docs/configuration.md describes every key.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/BurntSushi/toml"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
)

// ProviderLocal is the provider that runs stand-in builders (or operator
// commands) on this machine.
const ProviderLocal = "local"

// ProviderEC2 launches builders on AWS EC2.
const ProviderEC2 = "ec2"

// Providers lists the accepted values of a pool's provider key.
var Providers = []string{ProviderLocal, ProviderEC2}

// Config is the whole config file.
type Config struct {
	Daemon       Daemon       `toml:"daemon"`
	Reservations Reservations `toml:"reservations"`
	HAProxy      HAProxy      `toml:"haproxy"`
	Tailscale    Tailscale    `toml:"tailscale"`
	Pools        []Pool       `toml:"pool"` // [[pool]]
}

// Daemon is the [daemon] table: where the daemon listens and keeps state.
type Daemon struct {
	Cluster           string   `toml:"cluster"`
	Socket            string   `toml:"socket"`
	SocketGroup       string   `toml:"socket_group"`
	Listen            string   `toml:"listen"`
	TokenFile         string   `toml:"token_file"`
	MetricsListen     string   `toml:"metrics_listen"`
	StateDir          string   `toml:"state_dir"`
	Database          string   `toml:"database"`
	LogLevel          string   `toml:"log_level"`
	LogFormat         string   `toml:"log_format"`
	ReconcileInterval Duration `toml:"reconcile_interval"`
	EventRetention    Duration `toml:"event_retention"`
}

// DatabasePath is the SQLite database file: database if set, else
// <state_dir>/state.db.
func (d Daemon) DatabasePath() string {
	if d.Database != "" {
		return d.Database
	}
	return filepath.Join(d.StateDir, "state.db")
}

// Reservations is the [reservations] table: lease and wait limits.
type Reservations struct {
	Lease          Duration `toml:"lease"`
	MaxLease       Duration `toml:"max_lease"`
	PendingTimeout Duration `toml:"pending_timeout"`
	MaxPoll        Duration `toml:"max_poll"`
}

// Pool is one [[pool]]: a set of max_builders slots serving the same Nix
// systems and features.
type Pool struct {
	Name                   string   `toml:"name"`
	Systems                []string `toml:"systems"`
	Features               []string `toml:"features"`
	MaxBuilders            int      `toml:"max_builders"`
	MinBuilders            int      `toml:"min_builders"`
	WarmPool               int      `toml:"warm_pool"`
	ReservationsPerBuilder int      `toml:"reservations_per_builder"`
	MaxJobs                int      `toml:"max_jobs"`
	IdleTimeout            Timeout  `toml:"idle_timeout"`
	DrainTimeout           Duration `toml:"drain_timeout"`
	LaunchTimeout          Duration `toml:"launch_timeout"`
	BootTimeout            Duration `toml:"boot_timeout"`
	BindTimeout            Duration `toml:"bind_timeout"`
	// Frontend is where HAProxy accepts this pool's SSH connections
	// (host:port); Nix's machines file points there.
	Frontend string `toml:"frontend"`
	// MaxLifetime drains and replaces builders older than this (0: never).
	MaxLifetime Duration `toml:"max_lifetime"`
	// WarmFor keeps the warm pool only within this long of the pool's last
	// activity (0: always).
	WarmFor Duration `toml:"warm_for"`
	// ForecastMaxBuilders caps the builders demand forecasts alone make
	// the pool launch (nil: max_builders; 0: forecasts are ignored).
	ForecastMaxBuilders *int   `toml:"forecast_max_builders"`
	Provider            string `toml:"provider"`
	Local               Local  `toml:"local"`
	EC2                 EC2    `toml:"ec2"`
	// BillingMinimum is the least time the provider bills a builder for;
	// an idle builder is kept at least that long after its launch. Left
	// out: DefaultBillingMinimum of the provider.
	BillingMinimum Duration `toml:"billing_minimum"`
}

// EC2 is a pool's [pool.ec2] table, used with provider = "ec2".
type EC2 struct {
	Region                string   `toml:"region"`
	Endpoint              string   `toml:"endpoint"`
	LaunchTemplateID      string   `toml:"launch_template_id"`
	LaunchTemplateName    string   `toml:"launch_template_name"`
	LaunchTemplateVersion string   `toml:"launch_template_version"`
	AMI                   string   `toml:"ami"`
	InstanceTypes         []string `toml:"instance_types"`
	Subnets               []string `toml:"subnets"`
	SecurityGroups        []string `toml:"security_groups"`
	InstanceProfile       string   `toml:"instance_profile"`
	KeyName               string   `toml:"key_name"`
	RootVolumeGB          int      `toml:"root_volume_gb"`
	RootDeviceName        string   `toml:"root_device_name"`
	UserData              string   `toml:"user_data"`
	// Market is "spot" or "on-demand"; empty means spot, or on-demand for
	// a nested-virtualization pool.
	Market               string   `toml:"market"`
	OnDemandFallback     bool     `toml:"on_demand_fallback"`
	NestedVirtualization bool     `toml:"nested_virtualization"`
	UnavailableFor       Duration `toml:"unavailable_for"`
	// Discovery is how a booted builder's address is found: "tailscale",
	// "ec2-private-ip" or "ec2-public-ip".
	Discovery string `toml:"discovery"`
	SSHPort   int    `toml:"ssh_port"`
	// InterruptionQueue: the region's SQS queue of EC2 notices (empty: poll).
	InterruptionQueue string `toml:"interruption_queue"`
}

// EffectiveMarket is the market launches start in, as the EC2 provider
// decides it (ec2.PoolOptions.EffectiveMarket).
func (e EC2) EffectiveMarket() string {
	return ec2prov.PoolOptions{Market: e.Market, NestedVirtualization: e.NestedVirtualization}.EffectiveMarket()
}

// Tailscale is the [tailscale] table: how builders are found on the tailnet.
type Tailscale struct {
	Socket string `toml:"socket"`
	// Hostname is a text/template of a builder's tailnet host name, from
	// .InstanceID .Pool .Slot .Cluster.
	Hostname string `toml:"hostname"`
	// APIKeyFile, when set, lets the daemon delete a terminated builder's
	// device from the tailnet through Tailscale's API.
	APIKeyFile string `toml:"api_key_file"`
	// OAuthClientID and OAuthClientSecretFile do the same with an OAuth
	// client (scope devices:core), which unlike an API key does not
	// expire. They go together, and exclude APIKeyFile.
	OAuthClientID         string `toml:"oauth_client_id"`
	OAuthClientSecretFile string `toml:"oauth_client_secret_file"`
	Tailnet               string `toml:"tailnet"`
	APIURL                string `toml:"api_url"`
}

// DeletesDevices tells whether credentials for Tailscale's API are set, so
// that the daemon deletes terminated builders' devices.
func (t Tailscale) DeletesDevices() bool {
	return t.APIKeyFile != "" || t.OAuthClientID != "" || t.OAuthClientSecretFile != ""
}

// HAProxy is the [haproxy] table: how the daemon and HAProxy reach each
// other, and what the generated HAProxy configuration contains.
type HAProxy struct {
	// RuntimeSocket is HAProxy's admin socket. Empty: no HAProxy, and
	// builders are probed directly for their SSH banner.
	RuntimeSocket string   `toml:"runtime_socket"`
	AgentListen   string   `toml:"agent_listen"`
	SPOAListen    string   `toml:"spoa_listen"`
	Hold          Duration `toml:"hold"`
	CheckInterval Duration `toml:"check_interval"`
	// AgentInterval is how often HAProxy asks the agent-check responder
	// for each server's state. The daemon pushes every change through the
	// runtime API at once and re-pushes what HAProxy shows differently, so
	// the agent only restores state after a reload, restart or lost push;
	// each of its checks costs the daemon a connection.
	AgentInterval Duration `toml:"agent_interval"`
	StatsListen   string   `toml:"stats_listen"`
	StateFile     string   `toml:"state_file"`
	Timeout       Duration `toml:"timeout"`
	Log           string   `toml:"log"`
	// Placeholder is the ip:port a server without a builder points at.
	Placeholder string `toml:"placeholder"`
}

// Enabled reports whether the daemon works with HAProxy.
func (h HAProxy) Enabled() bool { return h.RuntimeSocket != "" }

// HAProxySpec is what haproxy.Generate renders HAProxy's configuration from:
// the [haproxy] settings, daemon.cluster and every pool's frontend and
// size.
func (c *Config) HAProxySpec() haproxy.Spec {
	h := c.HAProxy
	s := haproxy.Spec{
		Cluster:       c.Daemon.Cluster,
		RuntimeSocket: h.RuntimeSocket,
		StateFile:     h.StateFile,
		Log:           h.Log,
		Placeholder:   h.Placeholder,
		AgentListen:   h.AgentListen,
		SPOAListen:    h.SPOAListen,
		StatsListen:   h.StatsListen,
		Hold:          h.Hold.D(),
		CheckInterval: h.CheckInterval.D(),
		AgentInterval: h.AgentInterval.D(),
	}
	for _, p := range c.Pools {
		s.Pools = append(s.Pools, haproxy.PoolSpec{
			Name:        p.Name,
			Frontend:    p.Frontend,
			MaxBuilders: p.MaxBuilders,
			MaxJobs:     p.MaxJobs,
		})
	}
	return s
}

// Local is a pool's [pool.local] table, used with provider = "local".
type Local struct {
	Address          string   `toml:"address"`
	BootDelay        Duration `toml:"boot_delay"`
	LaunchCommand    string   `toml:"launch_command"`
	TerminateCommand string   `toml:"terminate_command"`
}

// Default returns the configuration with every default filled in and no
// pools.
func Default() Config {
	return Config{
		Daemon: Daemon{
			Cluster:           "nix-builders",
			Socket:            "/run/nix-builder-autoscaler/daemon.sock",
			MetricsListen:     "127.0.0.1:9464",
			StateDir:          "/var/lib/nix-builder-autoscaler",
			LogLevel:          "info",
			LogFormat:         "text",
			ReconcileInterval: NewDuration(10 * time.Second),
			EventRetention:    NewDuration(720 * time.Hour),
		},
		HAProxy: HAProxy{
			AgentListen:   "127.0.0.1:5555",
			SPOAListen:    "127.0.0.1:12345",
			Hold:          NewDuration(3 * time.Minute),
			CheckInterval: NewDuration(time.Second),
			AgentInterval: NewDuration(10 * time.Second),
			StatsListen:   "127.0.0.1:8404",
			StateFile:     "/var/lib/haproxy/nix-builder-autoscaler.state",
			Timeout:       NewDuration(5 * time.Second),
			Log:           "/dev/log",
			Placeholder:   "192.0.2.1:22",
		},
		Tailscale: Tailscale{
			Socket:   "/var/run/tailscale/tailscaled.sock",
			Hostname: "nix-builder-{{.InstanceID}}",
			Tailnet:  "-",
			APIURL:   "https://api.tailscale.com",
		},
		Reservations: Reservations{
			Lease:          NewDuration(10 * time.Minute),
			MaxLease:       NewDuration(24 * time.Hour),
			PendingTimeout: NewDuration(time.Hour),
			MaxPoll:        NewDuration(60 * time.Second),
		},
	}
}

// DefaultPool returns a pool with every default filled in. Name, Systems,
// MaxBuilders and Provider have no default.
func DefaultPool() Pool {
	return Pool{
		ReservationsPerBuilder: 1,
		MaxJobs:                1,
		IdleTimeout:            Auto(),
		DrainTimeout:           NewDuration(2 * time.Hour),
		LaunchTimeout:          NewDuration(5 * time.Minute),
		BootTimeout:            NewDuration(10 * time.Minute),
		BindTimeout:            NewDuration(5 * time.Minute),
		MaxLifetime:            NewDuration(0),
		WarmFor:                NewDuration(0),
		Local: Local{
			Address:   "127.0.0.1",
			BootDelay: NewDuration(0),
		},
		EC2: EC2{
			LaunchTemplateVersion: "$Default",
			RootDeviceName:        "/dev/xvda",
			UnavailableFor:        NewDuration(5 * time.Minute),
			Discovery:             "tailscale",
			SSHPort:               22,
		},
	}
}

// Pool returns the pool called name.
func (c *Config) Pool(name string) (Pool, bool) {
	for _, p := range c.Pools {
		if p.Name == name {
			return p, true
		}
	}
	return Pool{}, false
}

// Load reads and parses the config file at path. Its errors start with the
// path; Problems stay reachable with errors.As. A file larger than
// MaxFileSize is refused after reading just past the limit.
func Load(path string) (*Config, error) {
	data, err := readLimited(path, "config file", MaxFileSize)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		var ps Problems
		if errors.As(err, &ps) {
			return nil, fmt.Errorf("%s: %d problem(s):\n%w", path, len(ps), err)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes a config file on top of the defaults and validates it. A TOML
// syntax error is returned wrapping a toml.ParseError, which has the line;
// everything else wrong with the file (unknown keys, values of the wrong
// type, values out of range) is returned at once as Problems. Text larger
// than MaxFileSize or nested deeper than MaxNesting is refused before the
// decoder sees it (FileTooLargeError, NestingError).
func Parse(data []byte) (*Config, error) {
	if len(data) > MaxFileSize {
		return nil, &FileTooLargeError{Path: "(text)", What: "config file", Limit: MaxFileSize}
	}
	if err := checkNesting(data); err != nil {
		return nil, err
	}
	var raw map[string]any
	if _, err := toml.Decode(string(data), &raw); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, &SyntaxError{Err: pe}
		}
		return nil, fmt.Errorf("config syntax: %w", err)
	}

	// Values of the wrong type would stop the decoder at the first one; find
	// them all and take them out, so that decoding can go on and report the
	// rest of the file too.
	schema := checkSchema(raw)
	if len(schema) > 0 {
		var buf bytes.Buffer
		if err := toml.NewEncoder(&buf).Encode(raw); err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
		data = buf.Bytes()
	}

	cfg, unknown, err := decode(data, raw)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}

	problems := append(schema, unknown...)
	reported := make(map[string]bool, len(problems))
	for _, p := range problems {
		reported[p.Key] = true
	}
	var vs Problems
	if err := cfg.Validate(); errors.As(err, &vs) {
		for _, p := range vs {
			// A value with the wrong type was dropped and is reported
			// already; its stand-in zero value says nothing new.
			if !reported[p.Key] {
				problems = append(problems, p)
			}
		}
	}
	if len(problems) > 0 {
		sortProblems(problems)
		return nil, problems
	}
	return cfg, nil
}

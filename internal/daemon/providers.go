package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/discovery"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

// Policy turns the configuration into the scaling policy's terms.
func Policy(cfg *config.Config) scaler.Policy {
	pol := scaler.Policy{PendingTimeout: cfg.Reservations.PendingTimeout.D(), OrphanGrace: OrphanGrace}
	for _, p := range cfg.Pools {
		pol.Pools = append(pol.Pools, scaler.PoolPolicy{
			Name: p.Name, MaxBuilders: p.MaxBuilders, MinBuilders: p.MinBuilders, WarmPool: p.WarmPool,
			ReservationsPerBuilder: p.ReservationsPerBuilder, IdleTimeout: p.IdleTimeout.D(), DrainTimeout: p.DrainTimeout.D(),
			LaunchTimeout: p.LaunchTimeout.D(), BootTimeout: p.BootTimeout.D(), BindTimeout: p.BindTimeout.D(),
			MaxLifetime: p.MaxLifetime.D(), WarmFor: p.WarmFor.D(), ForecastMaxBuilders: p.ForecastBuilders(),
			IdleAuto: p.IdleTimeout.IsAuto(), BillingMinimum: p.BillingMinimum.D(),
		})
	}
	return pol
}

func (d *Daemon) providers() (map[string]scaler.Provider, error) {
	out := map[string]scaler.Provider{}
	localPools := map[string]local.PoolOptions{}
	var ec2Pools []config.Pool
	for _, p := range d.cfg.Pools {
		if prov, ok := d.o.Providers[p.Name]; ok {
			out[p.Name] = prov
			continue
		}
		switch p.Provider {
		case config.ProviderLocal:
			localPools[p.Name] = local.PoolOptions{Address: p.Local.Address, BootDelay: p.Local.BootDelay.D(),
				LaunchCommand: p.Local.LaunchCommand, TerminateCommand: p.Local.TerminateCommand}
		case config.ProviderEC2:
			ec2Pools = append(ec2Pools, p)
		default:
			return nil, fmt.Errorf("pool %s: provider %q is not available in this build", p.Name, p.Provider)
		}
	}
	if len(localPools) > 0 {
		cmd := d.o.BuilderCommand
		if cmd == nil {
			exe, err := os.Executable()
			if err != nil {
				return nil, fmt.Errorf("find own executable for local builders: %w", err)
			}
			cmd = []string{exe, "local-builder"}
		}
		lp, err := local.New(local.Options{Cluster: d.cfg.Daemon.Cluster, StateDir: filepath.Join(d.cfg.Daemon.StateDir, "local"),
			Pools: localPools, BuilderCommand: cmd, BuilderEnv: d.o.BuilderEnv, StartStandin: d.o.StartStandin, Logger: d.log, Clock: d.o.Clock})
		if err != nil {
			return nil, err
		}
		for name := range localPools {
			out[name] = lp
		}
	}
	if len(ec2Pools) > 0 {
		if err := d.ec2Providers(ec2Pools, out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ec2Providers builds one EC2 provider per region (and endpoint): each
// lists every instance of the cluster in its region in one call. Builder
// addresses come from discovery (Tailscale or the instance's IPs).
func (d *Daemon) ec2Providers(pools []config.Pool, out map[string]scaler.Provider) error {
	type regionKey struct{ region, endpoint string }
	groups := map[regionKey][]config.Pool{}
	var order []regionKey
	for _, p := range pools {
		k := regionKey{p.EC2.Region, p.EC2.Endpoint}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], p)
	}
	dopts := discovery.Options{Pools: map[string]discovery.PoolSource{}, Cluster: d.cfg.Daemon.Cluster, Logger: d.log, Registerer: d.reg, Clock: d.o.Clock}
	for _, k := range order {
		var prov scaler.Provider
		popts := map[string]ec2prov.PoolOptions{}
		for _, p := range groups[k] {
			e := p.EC2
			popts[p.Name] = e.PoolOptions()
			dopts.Pools[p.Name] = discovery.PoolSource{Source: e.Discovery, Port: e.SSHPort}
		}
		queue := groups[k][0].EC2.InterruptionQueue // the same for the region's pools (config checks)
		if d.o.EC2 != nil {
			prov = d.o.EC2(k.region, k.endpoint, popts)
		} else {
			p, err := d.ec2Provider(k.region, k.endpoint, queue, popts)
			if err != nil {
				return err
			}
			prov = p
		}
		for _, p := range groups[k] {
			out[p.Name] = prov
		}
	}
	return d.discovery(pools, out, dopts)
}

// ec2Provider is the EC2 provider of a region, and the reader of its
// interruption queue when it has one (run by Run).
func (d *Daemon) ec2Provider(region, endpoint, queue string, popts map[string]ec2prov.PoolOptions) (*ec2prov.Provider, error) {
	client, err := ec2prov.NewClient(context.Background(), region, endpoint)
	if err != nil {
		return nil, fmt.Errorf("ec2 region %s: %w", region, err)
	}
	p, err := ec2prov.New(client, ec2prov.Options{Cluster: d.cfg.Daemon.Cluster, Pools: popts, Logger: d.log,
		Registerer: d.reg, Clock: d.o.Clock, Queue: queue != ""})
	if err != nil {
		return nil, err
	}
	if queue == "" {
		return p, nil
	}
	sc, err := ec2prov.NewSQSClient(context.Background(), region, endpoint)
	if err != nil {
		return nil, fmt.Errorf("ec2 region %s: interruption queue: %w", region, err)
	}
	q, err := ec2prov.NewQueue(sc, ec2prov.QueueOptions{URL: queue, Notify: p.Notify, Kick: func() { d.rec.Kick() },
		Logger: d.log, Clock: d.o.Clock})
	if err != nil {
		return nil, err
	}
	d.queues = append(d.queues, q)
	return p, nil
}

// discovery wraps the EC2 providers in out with address discovery.
func (d *Daemon) discovery(pools []config.Pool, out map[string]scaler.Provider, dopts discovery.Options) error {
	ts := d.cfg.Tailscale
	dopts.LocalAPI = discovery.NewLocalAPI(ts.Socket)
	tmpl, err := template.New("tailscale.hostname").Parse(ts.Hostname)
	if err != nil {
		return fmt.Errorf("tailscale.hostname: %w", err)
	}
	dopts.Hostname = tmpl
	api, err := TailscaleAPI(ts)
	if err != nil {
		return err
	}
	if api != nil {
		dopts.DeleteDevice = api.DeleteDevice
	}
	// One decorator per distinct provider, so that each is still listed
	// once per round.
	wrapped := map[scaler.Provider]scaler.Provider{}
	for _, p := range pools {
		inner := out[p.Name]
		if w, ok := wrapped[inner]; ok {
			out[p.Name] = w
			continue
		}
		w := discovery.Wrap(inner, dopts)
		wrapped[inner] = w
		out[p.Name] = w
	}
	return nil
}

// TailscaleAPI is the client terminated builders' devices are deleted
// with: an OAuth client or an API key, whichever ts configures (nil when
// neither). Its secret is read now, so a missing or empty file is an error
// at start, naming its key.
func TailscaleAPI(ts config.Tailscale) (*discovery.TailscaleAPI, error) {
	switch {
	case ts.APIKeyFile != "":
		key, err := config.ReadSecretFile(ts.APIKeyFile, "api_key_file")
		if err != nil {
			return nil, fmt.Errorf("tailscale.api_key_file: %w", err)
		}
		return discovery.NewTailscaleAPI(ts.APIURL, ts.Tailnet, strings.TrimSpace(string(key))), nil
	case ts.OAuthClientSecretFile != "":
		secret, err := config.ReadSecretFile(ts.OAuthClientSecretFile, "oauth_client_secret_file")
		if err != nil {
			return nil, fmt.Errorf("tailscale.oauth_client_secret_file: %w", err)
		}
		if strings.TrimSpace(string(secret)) == "" {
			return nil, fmt.Errorf("tailscale.oauth_client_secret_file: %s is empty; put the OAuth client's secret in it", ts.OAuthClientSecretFile)
		}
		return discovery.NewTailscaleOAuth(ts.APIURL, ts.Tailnet, ts.OAuthClientID, string(secret)), nil
	}
	return nil, nil
}

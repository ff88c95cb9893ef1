package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/template"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	promshare "guardianproject.dev/ops/nix-builder-autoscaler/internal/metrics"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Address sources of a pool.
const (
	// SourceTailscale: the builder's first IPv4 Tailscale address, found by
	// its host name in tailscaled's status.
	SourceTailscale = "tailscale"
	// SourceEC2PrivateIP: the instance's private IP (HAProxy in the VPC).
	SourceEC2PrivateIP = "ec2-private-ip"
	// SourceEC2PublicIP: the instance's public IP.
	SourceEC2PublicIP = "ec2-public-ip"
	// SourceProvider keeps the address the wrapped provider reports.
	SourceProvider = "provider"
)

// Sources lists the accepted PoolSource.Source values.
var Sources = []string{SourceTailscale, SourceEC2PrivateIP, SourceEC2PublicIP, SourceProvider}

// DefaultHostname is the builders' tailnet host name when Options.Hostname
// is nil.
const DefaultHostname = "nix-builder-{{.InstanceID}}"

// DefaultPort is the sshd port when PoolSource.Port is 0.
const DefaultPort = 22

// Lookup results, the result label of discovery_lookups_total.
const (
	ResultFound     = "found"     // an address was set
	ResultOffline   = "offline"   // the builder's node is on the tailnet but offline
	ResultAbsent    = "absent"    // no node (or no IP) for the builder yet
	ResultAmbiguous = "ambiguous" // several online nodes have its host name
	ResultError     = "error"     // the LocalAPI failed, or the host name could not be made
)

// errorLogEvery is how often a lasting failure is logged again.
const errorLogEvery = time.Minute

// PoolSource says how the builders of one pool are reached.
type PoolSource struct {
	// Source is one of Sources; empty means SourceProvider.
	Source string
	// Port is the builders' sshd port (DefaultPort if 0).
	Port int
}

// Options configures Wrap.
type Options struct {
	// Pools maps a pool name to its source. Instances of pools not listed
	// keep the wrapped provider's Address.
	Pools map[string]PoolSource
	// LocalAPI reads the tailnet; NewLocalAPI(DefaultSocket) when nil and
	// a pool uses SourceTailscale.
	LocalAPI *LocalAPI
	// Hostname renders a builder's tailnet host name from a HostnameData
	// (DefaultHostname when nil).
	Hostname *template.Template
	// Cluster is passed to the host name template.
	Cluster string
	// Tag, when set, admits only nodes carrying this ACL tag (like
	// "tag:nix-builder"), so no other tailnet device is taken for a builder.
	Tag string
	// Logger receives discovery's logs (discarded when nil).
	Logger *slog.Logger
	// Registerer takes the metrics (not registered when nil).
	Registerer prometheus.Registerer
	// Clock paces the error log (nil: clock.Real).
	Clock clock.Clock
	// DeleteDevice, when set, is called with a terminated builder's
	// tailnet node ID, e.g. (*TailscaleAPI).DeleteDevice.
	DeleteDevice func(ctx context.Context, deviceID string) error
}

// HostnameData is what the host name template sees.
type HostnameData struct {
	InstanceID string
	Pool       string
	Slot       string
	Cluster    string
}

// Provider wraps a scaler.Provider and fills in the Address of running
// instances from each pool's source.
type Provider struct {
	inner        scaler.Provider
	pools        map[string]PoolSource
	api          *LocalAPI
	hostname     *template.Template
	cluster      string
	tag          string
	deleteDevice func(ctx context.Context, deviceID string) error
	log          *slog.Logger
	lookups      *prometheus.CounterVec
	deletions    *prometheus.CounterVec
	clock        clock.Clock

	mu      sync.Mutex
	seen    map[string][]string  // instance id → tailnet node ids bound for it
	logged  map[string]time.Time // throttle key → last logged
	apiDown bool
}

var _ scaler.Provider = (*Provider)(nil)

// Wrap returns inner with discovery. Launch and Terminate pass through
// (Terminate also deletes the builder's tailnet device when
// o.DeleteDevice is set); List fills in addresses.
func Wrap(inner scaler.Provider, o Options) *Provider {
	p := &Provider{
		inner:        inner,
		pools:        map[string]PoolSource{},
		api:          o.LocalAPI,
		hostname:     o.Hostname,
		cluster:      o.Cluster,
		tag:          o.Tag,
		deleteDevice: o.DeleteDevice,
		log:          o.Logger,
		clock:        o.Clock,
		seen:         map[string][]string{},
		logged:       map[string]time.Time{},
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.clock == nil {
		p.clock = clock.Real{}
	}
	if p.hostname == nil {
		p.hostname = template.Must(template.New("hostname").Parse(DefaultHostname))
	}
	const ns = scaler.MetricsNamespace
	// One decorator per EC2 region may share the registry.
	p.lookups = promshare.RegisterShared(o.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "discovery_lookups_total",
		Help: "Address lookups of running builders, by source and result (found, offline, absent, ambiguous, error)."},
		[]string{"source", "result"}))
	p.deletions = promshare.RegisterShared(o.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "discovery_device_deletions_total",
		Help: "Tailnet devices of terminated builders deleted through Tailscale's API, by result (ok, error)."},
		[]string{"result"}))

	usesTailscale := false
	for name, ps := range o.Pools {
		if ps.Source == "" {
			ps.Source = SourceProvider
		}
		if !slices.Contains(Sources, ps.Source) {
			p.log.Error("unknown discovery source; the pool keeps the provider's addresses",
				"pool", name, "source", ps.Source, "accepted", strings.Join(Sources, ", "))
			ps.Source = SourceProvider
		}
		if ps.Port == 0 {
			ps.Port = DefaultPort
		}
		p.pools[name] = ps
		if ps.Source == SourceProvider {
			continue
		}
		usesTailscale = usesTailscale || ps.Source == SourceTailscale
		for _, r := range []string{ResultFound, ResultAbsent} {
			p.lookups.WithLabelValues(ps.Source, r)
		}
	}
	if usesTailscale {
		if p.api == nil {
			p.api = NewLocalAPI(DefaultSocket)
		}
		for _, r := range []string{ResultOffline, ResultAmbiguous, ResultError} {
			p.lookups.WithLabelValues(SourceTailscale, r)
		}
	}
	if p.deleteDevice != nil {
		p.deletions.WithLabelValues("ok")
		p.deletions.WithLabelValues("error")
	}
	return p
}

// Launch passes through to the wrapped provider.
func (p *Provider) Launch(ctx context.Context, req scaler.LaunchRequest) (scaler.Instance, error) {
	return p.inner.Launch(ctx, req)
}

// Terminate terminates through the wrapped provider; once that succeeded,
// it deletes the tailnet devices discovery bound for the instance, if
// Options.DeleteDevice is set. A failed deletion is logged and counted but
// never fails the termination.
func (p *Provider) Terminate(ctx context.Context, instanceID string) error {
	if err := p.inner.Terminate(ctx, instanceID); err != nil {
		return err
	}
	if p.deleteDevice == nil {
		return nil
	}
	p.mu.Lock()
	nodes := slices.Clone(p.seen[instanceID])
	p.mu.Unlock()
	var failed []string
	for _, node := range nodes {
		if err := p.deleteDevice(ctx, node); err != nil {
			p.deletions.WithLabelValues("error").Inc()
			p.log.Warn("could not delete the terminated builder's tailnet device; Tailscale removes an ephemeral node by itself some time after it goes offline",
				"instance", instanceID, "node", node, "err", err)
			failed = append(failed, node)
			continue
		}
		p.deletions.WithLabelValues("ok").Inc()
		p.log.Info("deleted the terminated builder's tailnet device", "instance", instanceID, "node", node)
	}
	p.mu.Lock()
	if len(failed) == 0 {
		delete(p.seen, instanceID)
	} else {
		p.seen[instanceID] = failed // a repeated Terminate tries again
	}
	p.mu.Unlock()
	return nil
}

// List lists through the wrapped provider and fills in the Address of each
// running instance that has none, from its pool's source. It fails only
// when the wrapped provider does: with Tailscale unreachable, the
// instances are returned without tailnet addresses (and the failure is
// logged at most once a minute), so the reconciler still sees them.
func (p *Provider) List(ctx context.Context) ([]scaler.Instance, error) {
	list, err := p.inner.List(ctx)
	if err != nil {
		return list, err
	}
	list = slices.Clone(list)
	var tailnet []int
	for i := range list {
		in := &list[i]
		if in.State != scaler.InstanceRunning || in.Address != "" {
			continue
		}
		ps, ok := p.pools[in.Pool]
		if !ok {
			continue
		}
		switch ps.Source {
		case SourceEC2PrivateIP:
			p.fromIP(in, ps, in.PrivateIP, "private")
		case SourceEC2PublicIP:
			p.fromIP(in, ps, in.PublicIP, "public")
		case SourceTailscale:
			tailnet = append(tailnet, i)
		}
	}
	if len(tailnet) > 0 {
		p.fromTailnet(ctx, list, tailnet)
	}
	p.forget(list)
	return list, nil
}

// Hostname renders the tailnet host name a builder must take.
func (p *Provider) Hostname(in scaler.Instance) (string, error) {
	var b strings.Builder
	err := p.hostname.Execute(&b, HostnameData{InstanceID: in.ID, Pool: in.Pool, Slot: in.Slot, Cluster: p.cluster})
	if err != nil {
		return "", fmt.Errorf("tailscale.hostname: %w", err)
	}
	name := strings.TrimSpace(b.String())
	if name == "" {
		return "", errors.New("tailscale.hostname: renders an empty host name")
	}
	return name, nil
}

func (p *Provider) fromIP(in *scaler.Instance, ps PoolSource, ip, kind string) {
	if ip == "" {
		p.lookups.WithLabelValues(ps.Source, ResultAbsent).Inc()
		p.log.Debug("running builder has no "+kind+" IP yet", "instance", in.ID, "pool", in.Pool, "slot", in.Slot)
		return
	}
	in.Address = net.JoinHostPort(ip, strconv.Itoa(ps.Port))
	p.lookups.WithLabelValues(ps.Source, ResultFound).Inc()
}

// fromTailnet fills in list[i].Address for each i in idx from one status
// document.
func (p *Provider) fromTailnet(ctx context.Context, list []scaler.Instance, idx []int) {
	st, err := p.api.Status(ctx)
	if err != nil {
		p.lookups.WithLabelValues(SourceTailscale, ResultError).Add(float64(len(idx)))
		p.mu.Lock()
		p.apiDown = true
		logIt := p.throttleLocked("localapi")
		p.mu.Unlock()
		if logIt {
			p.log.Error("cannot read the tailnet: booting builders are not bound until tailscaled answers (logged once a minute)",
				"err", err, "builders_waiting", len(idx))
		}
		return
	}
	p.mu.Lock()
	recovered := p.apiDown
	p.apiDown = false
	delete(p.logged, "localapi")
	p.mu.Unlock()
	if recovered {
		p.log.Info("tailscale LocalAPI answers again", "socket", p.api.Socket())
	}

	// Index peers by lower-case host name and MagicDNS label.
	byName := map[string][]*PeerStatus{}
	for _, peer := range st.Peer {
		if peer == nil || (p.tag != "" && !peer.HasTag(p.tag)) {
			continue
		}
		h := strings.ToLower(peer.HostName)
		byName[h] = append(byName[h], peer)
		if l := strings.ToLower(peer.DNSLabel()); l != "" && l != h {
			byName[l] = append(byName[l], peer)
		}
	}
	for _, i := range idx {
		in := &list[i]
		ps := p.pools[in.Pool]
		name, err := p.Hostname(*in)
		if err != nil {
			p.lookups.WithLabelValues(SourceTailscale, ResultError).Inc()
			if p.throttle("hostname/" + in.Pool) {
				p.log.Error("cannot make a builder's tailnet host name", "pool", in.Pool, "instance", in.ID, "err", err)
			}
			continue
		}
		peers := slices.Clone(byName[strings.ToLower(name)])
		slices.SortFunc(peers, func(a, b *PeerStatus) int { return strings.Compare(a.ID, b.ID) })
		var online []*PeerStatus
		for _, peer := range peers {
			if peer.Online {
				online = append(online, peer)
			}
		}
		log := p.log.With("instance", in.ID, "pool", in.Pool, "slot", in.Slot, "hostname", name)
		switch {
		case len(peers) == 0:
			p.lookups.WithLabelValues(SourceTailscale, ResultAbsent).Inc()
			log.Debug("builder not on the tailnet yet")
		case len(online) == 0:
			p.lookups.WithLabelValues(SourceTailscale, ResultOffline).Inc()
			log.Debug("builder's tailnet node is offline", "nodes", nodeIDs(peers))
		case len(online) > 1:
			p.lookups.WithLabelValues(SourceTailscale, ResultAmbiguous).Inc()
			if p.throttle("ambiguous/" + in.ID) {
				log.Warn("several online tailnet nodes have the builder's host name; not choosing one "+
					"(the slot times out and is replaced unless one of them goes away; check for a duplicate host name)",
					"nodes", nodeIDs(online))
			}
		default:
			node := online[0]
			ip, ok := node.IPv4()
			if !ok {
				p.lookups.WithLabelValues(SourceTailscale, ResultAbsent).Inc()
				if p.throttle("noipv4/" + in.ID) {
					log.Warn("builder's tailnet node has no IPv4 address", "node", node.ID, "ips", node.TailscaleIPs)
				}
				continue
			}
			in.Address = net.JoinHostPort(ip.String(), strconv.Itoa(ps.Port))
			p.lookups.WithLabelValues(SourceTailscale, ResultFound).Inc()
			p.mu.Lock()
			if !slices.Contains(p.seen[in.ID], node.ID) {
				p.seen[in.ID] = append(p.seen[in.ID], node.ID)
				log.Info("builder found on the tailnet", "node", node.ID, "address", in.Address)
			}
			p.mu.Unlock()
		}
	}
}

// forget drops what is remembered about instances the provider no longer
// lists, and old throttle entries.
func (p *Provider) forget(list []scaler.Instance) {
	ids := make(map[string]bool, len(list))
	for _, in := range list {
		ids[in.ID] = true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for id := range p.seen {
		if !ids[id] {
			delete(p.seen, id)
		}
	}
	cutoff := p.clock.Now().Add(-10 * errorLogEvery)
	for k, at := range p.logged {
		if at.Before(cutoff) {
			delete(p.logged, k)
		}
	}
}

// throttle reports whether a message under key may be logged now (at most
// once per errorLogEvery).
func (p *Provider) throttle(key string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.throttleLocked(key)
}

func (p *Provider) throttleLocked(key string) bool {
	now := p.clock.Now()
	if last, ok := p.logged[key]; ok && now.Sub(last) < errorLogEvery {
		return false
	}
	p.logged[key] = now
	return true
}

func nodeIDs(peers []*PeerStatus) string {
	ids := make([]string, len(peers))
	for i, peer := range peers {
		ids[i] = peer.ID
		if peer.HostName != "" {
			ids[i] += " (" + peer.HostName + ")"
		}
	}
	return strings.Join(ids, ", ")
}

// Package local is the local provider: builder stand-ins that the daemon
// starts itself on loopback, treated like EC2 instances, plus a direct
// SSH-banner readiness prober for setups without HAProxy.
//
// A stand-in is a separate process (BuilderMain, usually run as
// "nix-builder-autoscaler local-builder") in its own process group, so it
// outlives a crash or kill -9 of the daemon the way an EC2 instance does.
// Every instance has a record in StateDir/instances/<id>.json, written before
// anything is started ("tags at launch"), so List finds it again after any
// crash. A pool may instead name shell command hooks (LaunchCommand,
// TerminateCommand) that create and destroy real builders some other way.
//
// The package needs Linux: List recognises a stand-in by its marker in
// /proc/<pid>/cmdline, so a reused pid is never mistaken for an instance.
package local

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"text/template"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Options configures a Provider.
type Options struct {
	Cluster  string                 // only instances of this cluster are listed
	StateDir string                 // instance records live in StateDir/instances/
	Pools    map[string]PoolOptions // by pool name
	// BuilderCommand is the argv that runs BuilderMain, e.g.
	// {"/path/nix-builder-autoscaler", "local-builder"}. Required when a pool
	// has no LaunchCommand.
	BuilderCommand []string
	// BuilderEnv is extra environment ("KEY=value") for stand-ins and for
	// command hooks, on top of the daemon's own environment.
	BuilderEnv []string
	// StartStandin starts a stand-in's process (nil: exec.Cmd.Start). The
	// demo passes one that makes the stand-ins die with it; the daemon
	// does not, as its builders outlive a restart of the daemon.
	StartStandin func(*exec.Cmd) error
	Logger       *slog.Logger // nil discards
	Clock        clock.Clock  // stamps records (nil = clock.Real)
}

// PoolOptions configures one pool of a Provider.
type PoolOptions struct {
	// Address is the loopback IP stand-ins listen on; "" means 127.0.0.1.
	Address string
	// BootDelay is how long a stand-in waits before it serves the SSH banner
	// (it accepts TCP connections at once, like a booting machine whose
	// sshd is not up yet would not, but HAProxy's check still fails).
	BootDelay time.Duration
	// LaunchCommand, if set, is a text/template run with /bin/sh -c instead
	// of starting a stand-in. Data: .Cluster .Pool .Slot .LaunchID
	// .InstanceID .StateDir; the function "quote" shell-quotes a value. The
	// same values are in the environment as NBA_CLUSTER, NBA_POOL, NBA_SLOT,
	// NBA_LAUNCH_ID, NBA_INSTANCE_ID, NBA_STATE_DIR. The last non-empty line
	// it prints must be the builder's address, host:port.
	LaunchCommand string
	// TerminateCommand is required with LaunchCommand: the same data plus
	// .Address (and NBA_ADDRESS). A non-zero exit fails Terminate.
	TerminateCommand string
}

const (
	instanceType = "local"
	marketLocal  = "local"

	pendingGrace    = time.Minute     // a record without a process is pending this long
	recordRetention = time.Hour       // terminated records are deleted after this
	addrWait        = time.Minute     // Launch waits this long for a stand-in's address (it starts in milliseconds; a stalled machine can take seconds)
	termGrace       = 5 * time.Second // SIGTERM → SIGKILL
	killWait        = 2 * time.Second // after SIGKILL
	hookTimeout     = 2 * time.Minute
	pollInterval    = 10 * time.Millisecond

	modeStandin = "standin"
	modeHook    = "hook"

	// ReasonRequested is the StateReason of an instance stopped by Terminate.
	ReasonRequested = "terminated by request"
	// ReasonExited is the StateReason of a stand-in whose process is gone
	// without Terminate (it crashed, or was killed by someone else).
	ReasonExited = "process exited"
)

type pool struct {
	PoolOptions
	launch, terminate *template.Template // nil for stand-in pools
}

// Provider is the local scaler.Provider. It is safe for concurrent use.
type Provider struct {
	cluster    string
	stateDir   string
	dir        string // stateDir/instances
	pools      map[string]pool
	builderCmd []string
	builderEnv []string
	start      func(*exec.Cmd) error
	log        *slog.Logger
	clock      clock.Clock

	mu          sync.Mutex // guards record files and the maps below
	launching   map[string]bool
	terminating map[string]bool
	locks       map[string]*instanceLock
	// children are the stand-ins this process started, by instance id:
	// each channel is closed when its process has exited and been reaped,
	// so List knows them alive without looking in /proc.
	children map[string]<-chan struct{}

	// cache holds each record as last read, with the file's identity then
	// (see readRecord); every List reads them all.
	cacheMu sync.Mutex
	cache   map[string]cachedRecord
}

var _ scaler.Provider = (*Provider)(nil)

// New checks opts, parses the pools' command templates and creates
// StateDir/instances.
func New(opts Options) (*Provider, error) {
	if opts.Cluster == "" {
		return nil, errors.New("local provider: cluster is required")
	}
	if opts.StateDir == "" {
		return nil, errors.New("local provider: state directory is required")
	}
	if len(opts.Pools) == 0 {
		return nil, errors.New("local provider: no pools")
	}
	p := &Provider{
		cluster:     opts.Cluster,
		stateDir:    opts.StateDir,
		dir:         filepath.Join(opts.StateDir, "instances"),
		pools:       make(map[string]pool, len(opts.Pools)),
		builderCmd:  slices.Clone(opts.BuilderCommand),
		builderEnv:  slices.Clone(opts.BuilderEnv),
		start:       opts.StartStandin,
		log:         opts.Logger,
		clock:       opts.Clock,
		launching:   map[string]bool{},
		terminating: map[string]bool{},
		children:    map[string]<-chan struct{}{},
		locks:       map[string]*instanceLock{},
	}
	if p.start == nil {
		p.start = (*exec.Cmd).Start
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.clock == nil {
		p.clock = clock.Real{}
	}
	for name, po := range opts.Pools {
		pl, err := p.parsePool(name, po)
		if err != nil {
			return nil, fmt.Errorf("local provider: pool %q: %w", name, err)
		}
		p.pools[name] = pl
	}
	if err := os.MkdirAll(p.dir, 0o750); err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	return p, nil
}

func (p *Provider) parsePool(name string, po PoolOptions) (pool, error) {
	pl := pool{PoolOptions: po}
	if po.LaunchCommand != "" || po.TerminateCommand != "" {
		if po.LaunchCommand == "" || po.TerminateCommand == "" {
			return pool{}, errors.New("launch command and terminate command go together")
		}
		var err error
		if pl.launch, err = parseHook(name+"/launch", po.LaunchCommand); err != nil {
			return pool{}, fmt.Errorf("launch command: %w", err)
		}
		if pl.terminate, err = parseHook(name+"/terminate", po.TerminateCommand); err != nil {
			return pool{}, fmt.Errorf("terminate command: %w", err)
		}
		return pl, nil
	}
	if len(p.builderCmd) == 0 || p.builderCmd[0] == "" {
		return pool{}, errors.New("stand-in pools need a builder command")
	}
	if pl.Address == "" {
		pl.Address = "127.0.0.1"
	}
	ip := net.ParseIP(pl.Address)
	if ip == nil || !ip.IsLoopback() {
		return pool{}, fmt.Errorf("address %q is not a loopback IP", pl.Address)
	}
	if pl.BootDelay < 0 {
		return pool{}, fmt.Errorf("negative boot delay %s", pl.BootDelay)
	}
	return pl, nil
}

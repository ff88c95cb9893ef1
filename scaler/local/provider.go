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
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
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
	Logger     *slog.Logger // nil discards
	Clock      clock.Clock  // stamps records (nil = clock.Real)
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

var idPattern = regexp.MustCompile(`^local-[0-9a-f]{16}$`)

// record is the on-disk form of an instance: its tags and what is known of
// its process.
type record struct {
	ID         string    `json:"id"`
	Cluster    string    `json:"cluster"`
	Pool       string    `json:"pool"`
	Slot       string    `json:"slot"`
	LaunchID   string    `json:"launch_id"`
	LaunchedAt time.Time `json:"launched_at"`
	Type       string    `json:"type"`
	Market     string    `json:"market"`
	Mode       string    `json:"mode"`             // "standin" or "hook"
	Marker     string    `json:"marker,omitempty"` // in the stand-in's cmdline
	PID        int       `json:"pid,omitempty"`
	// HookPID is the launch command's process (and group) id while it runs,
	// so a launch cut off by a daemon crash can be stopped by Terminate.
	HookPID      int       `json:"hook_pid,omitempty"`
	Address      string    `json:"address,omitempty"`
	TerminatedAt time.Time `json:"terminated_at,omitzero"`
	StateReason  string    `json:"state_reason,omitempty"`
}

func (r record) terminated() bool { return !r.TerminatedAt.IsZero() }

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
	log        *slog.Logger
	clock      clock.Clock

	mu          sync.Mutex // guards record files and the maps below
	launching   map[string]bool
	terminating map[string]bool
	locks       map[string]*instanceLock
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
		log:         opts.Logger,
		clock:       opts.Clock,
		launching:   map[string]bool{},
		terminating: map[string]bool{},
		locks:       map[string]*instanceLock{},
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

// Launch writes the instance's record, then starts a stand-in (or runs the
// pool's launch command) and returns the instance running with its address.
// A stand-in is not tied to ctx: cancelling ctx after Launch returns leaves
// it running. If Launch fails after starting something, it stops it again
// and records the instance as terminated.
func (p *Provider) Launch(ctx context.Context, req scaler.LaunchRequest) (scaler.Instance, error) {
	if err := ctx.Err(); err != nil {
		return scaler.Instance{}, err
	}
	pl, ok := p.pools[req.Pool]
	if !ok {
		return scaler.Instance{}, fmt.Errorf("local provider: unknown pool %q", req.Pool)
	}
	if req.Slot == "" {
		return scaler.Instance{}, errors.New("local provider: launch request without slot")
	}
	id, err := newID()
	if err != nil {
		return scaler.Instance{}, err
	}
	r := record{
		ID:         id,
		Cluster:    p.cluster,
		Pool:       req.Pool,
		Slot:       req.Slot,
		LaunchID:   req.LaunchID,
		LaunchedAt: p.clock.Now().UTC(),
		Type:       instanceType,
		Market:     marketLocal,
		Mode:       modeStandin,
		Marker:     id,
	}
	if pl.launch != nil {
		r.Mode = modeHook
		r.Marker = ""
	}

	// Hold the instance's lock for the whole launch: a Terminate of the new
	// id (found through List) waits until Launch has finished.
	unlock, _ := p.lockInstance(context.Background(), id)
	defer unlock()
	p.mu.Lock()
	p.launching[id] = true
	err = p.writeRecord(r)
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.launching, id)
		p.mu.Unlock()
	}()
	if err != nil {
		return scaler.Instance{}, fmt.Errorf("local provider: write record: %w", err)
	}

	if pl.launch != nil {
		err = p.launchHook(ctx, &r, pl)
	} else {
		err = p.launchStandin(ctx, &r, pl)
	}
	if err != nil {
		p.log.Warn("local instance launch failed", "pool", r.Pool, "slot", r.Slot,
			"instance", r.ID, "launch_id", r.LaunchID, "err", err)
		return scaler.Instance{}, err
	}
	p.log.Info("local instance launched", "pool", r.Pool, "slot", r.Slot, "instance", r.ID,
		"address", r.Address, "pid", r.PID, "mode", r.Mode, "launch_id", r.LaunchID)
	inst := r.instance()
	inst.State = scaler.InstanceRunning
	return inst, nil
}

// failLaunch records r as terminated because its launch failed.
func (p *Provider) failLaunch(r *record, cause error) {
	r.TerminatedAt = p.clock.Now().UTC()
	r.StateReason = "launch failed: " + cause.Error()
	p.mu.Lock()
	err := p.writeRecord(*r)
	p.mu.Unlock()
	if err != nil {
		p.log.Error("local provider: cannot record failed launch", "instance", r.ID, "err", err)
	}
}

// Terminate stops an instance and records it as terminated. An unknown or
// already terminated instance is success. A stand-in's process group gets
// SIGTERM, then SIGKILL after 5s; a hook instance's terminate command must
// exit 0, or Terminate fails and leaves the instance as it was.
func (p *Provider) Terminate(ctx context.Context, instanceID string) error {
	if !idPattern.MatchString(instanceID) {
		return nil // not an id this provider hands out: unknown
	}
	unlock, err := p.lockInstance(ctx, instanceID)
	if err != nil {
		return err
	}
	defer unlock()

	p.mu.Lock()
	r, err := p.readRecord(instanceID)
	if err == nil && r.Cluster == p.cluster && !r.terminated() {
		p.terminating[instanceID] = true
	}
	p.mu.Unlock()
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("local provider: %w", err)
	case r.Cluster != p.cluster || r.terminated():
		return nil
	}
	defer func() {
		p.mu.Lock()
		delete(p.terminating, instanceID)
		p.mu.Unlock()
	}()

	if r.Mode == modeHook {
		pl, ok := p.pools[r.Pool]
		if !ok || pl.terminate == nil {
			return fmt.Errorf("local provider: instance %s: pool %q has no terminate command", r.ID, r.Pool)
		}
		if r.Address == "" && r.HookPID != 0 {
			// An interrupted launch command may still be running and start
			// a builder after the terminate command ran: stop it first.
			killHookGroup(r.HookPID)
		}
		if _, err := p.runHook(ctx, "terminate", r.Pool, pl.terminate, p.hookData(r), nil); err != nil {
			return err
		}
	} else if r.PID != 0 {
		if err := stopProcess(r.PID, r.Marker); err != nil {
			return fmt.Errorf("local provider: instance %s: %w", r.ID, err)
		}
	}

	p.mu.Lock()
	// Re-read: List may have noticed the exit meanwhile; the reason stays ours.
	if cur, err := p.readRecord(instanceID); err == nil {
		r = cur
	}
	r.TerminatedAt = p.clock.Now().UTC()
	r.StateReason = ReasonRequested
	err = p.writeRecord(r)
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("local provider: write record: %w", err)
	}
	p.log.Info("local instance terminated", "pool", r.Pool, "slot", r.Slot, "instance", r.ID,
		"address", r.Address, "pid", r.PID, "mode", r.Mode)
	return nil
}

// List returns every instance of this cluster in StateDir/instances.
//
// A stand-in is running while its process is alive: kill(pid, 0) succeeds
// and /proc/<pid>/cmdline contains its marker (a reused pid or a zombie does
// not count). A record without a process is pending for a minute after
// launch (a launch in progress, or a daemon crash between writing the record
// and starting the process), terminated after that. A hook instance is
// running from the moment its launch command printed an address until
// Terminate. Instances being terminated are shutting-down. Records of
// instances terminated more than an hour ago are deleted.
func (p *Provider) List(ctx context.Context) ([]scaler.Instance, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	now := p.clock.Now()
	var out []scaler.Instance
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			p.removeStaleTemp(name, now)
			continue
		}
		id, ok := strings.CutSuffix(name, ".json")
		if !ok || !idPattern.MatchString(id) {
			continue
		}
		r, err := p.readRecord(id)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				p.log.Warn("local provider: skipping unreadable record", "file", name, "err", err)
			}
			continue
		}
		if r.Cluster != p.cluster {
			continue
		}
		inst, keep := p.observe(&r, now)
		if !keep {
			p.deleteRecord(id)
			continue
		}
		out = append(out, inst)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].LaunchedAt.Equal(out[j].LaunchedAt) {
			return out[i].LaunchedAt.Before(out[j].LaunchedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// observe works out the state of r's instance, persisting what it learns
// (an exit, an address). keep is false when the record has expired. It runs
// with p.mu held.
func (p *Provider) observe(r *record, now time.Time) (inst scaler.Instance, keep bool) {
	if r.terminated() {
		if now.Sub(r.TerminatedAt) > recordRetention {
			return scaler.Instance{}, false
		}
		inst = r.instance()
		inst.State = scaler.InstanceTerminated
		return inst, true
	}
	if p.launching[r.ID] {
		inst = r.instance()
		inst.State = scaler.InstancePending
		return inst, true
	}
	if p.terminating[r.ID] {
		inst = r.instance()
		inst.State = scaler.InstanceShuttingDown
		return inst, true
	}
	young := now.Sub(r.LaunchedAt) < pendingGrace
	state, reason := scaler.InstanceRunning, ""
	switch {
	case r.Mode == modeHook && r.Address != "":
		// Running until terminated: nothing here can see the builder.
	case r.Mode == modeHook:
		// Its launch command was cut off (the daemon died while it ran;
		// this process is not launching it). Whatever it started may be
		// running: report it stopped, so the caller terminates it and the
		// terminate command cleans up, rather than terminated, which
		// would leak it.
		inst = r.instance()
		inst.State, inst.StateReason = scaler.InstanceStopped, "launch command interrupted"
		return inst, true
	case r.PID == 0 && young:
		state = scaler.InstancePending
	case r.PID == 0:
		state, reason = scaler.InstanceTerminated, "process never started"
	case inspect(r.PID, r.Marker) != procAlive:
		state, reason = scaler.InstanceTerminated, ReasonExited
	case r.Address == "":
		// The daemon may have stopped before it read the address file.
		if addr, err := readAddrFile(p.addrPath(r.ID)); err == nil {
			r.Address = addr
			if err := p.writeRecord(*r); err != nil {
				p.log.Warn("local provider: cannot record address", "instance", r.ID, "err", err)
			}
		} else {
			state = scaler.InstancePending
		}
	}
	if state == scaler.InstanceTerminated {
		r.TerminatedAt = now.UTC()
		r.StateReason = reason
		if err := p.writeRecord(*r); err != nil {
			p.log.Warn("local provider: cannot record exit", "instance", r.ID, "err", err)
		}
		p.log.Info("local instance gone", "pool", r.Pool, "slot", r.Slot, "instance", r.ID,
			"address", r.Address, "pid", r.PID, "reason", reason)
	}
	inst = r.instance()
	inst.State = state
	return inst, true
}

func (r record) instance() scaler.Instance {
	return scaler.Instance{
		ID:          r.ID,
		Pool:        r.Pool,
		Slot:        r.Slot,
		LaunchID:    r.LaunchID,
		Address:     r.Address,
		LaunchedAt:  r.LaunchedAt,
		Type:        r.Type,
		Market:      r.Market,
		StateReason: r.StateReason,
	}
}

func newID() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("local provider: instance id: %w", err)
	}
	return "local-" + hex.EncodeToString(b[:]), nil
}

func (p *Provider) recordPath(id string) string { return filepath.Join(p.dir, id+".json") }
func (p *Provider) addrPath(id string) string   { return filepath.Join(p.dir, id+".addr") }
func (p *Provider) logPath(id string) string    { return filepath.Join(p.dir, id+".log") }

func (p *Provider) readRecord(id string) (record, error) {
	b, err := os.ReadFile(p.recordPath(id))
	if err != nil {
		return record{}, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return record{}, fmt.Errorf("record %s: %w", id, err)
	}
	if r.ID != id {
		return record{}, fmt.Errorf("record %s: holds id %q", id, r.ID)
	}
	return r, nil
}

func (p *Provider) writeRecord(r record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(p.recordPath(r.ID), append(b, '\n'), 0o640)
}

func (p *Provider) deleteRecord(id string) {
	for _, path := range []string{p.addrPath(id), p.logPath(id), p.recordPath(id)} {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			p.log.Warn("local provider: cannot delete", "file", path, "err", err)
		}
	}
}

// removeStaleTemp deletes a temporary file left by a crash during an
// atomic write.
func (p *Provider) removeStaleTemp(name string, now time.Time) {
	if !strings.HasSuffix(name, ".tmp") {
		return
	}
	path := filepath.Join(p.dir, name)
	if fi, err := os.Stat(path); err == nil && now.Sub(fi.ModTime()) > recordRetention {
		_ = os.Remove(path)
	}
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory: write, fsync, rename, fsync the directory. Readers see the old
// content or the new, never a part.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// instanceLock serialises Launch and Terminate of one instance. It is a
// channel so a waiter can give up when its context ends.
type instanceLock struct {
	ch   chan struct{}
	refs int
}

func (p *Provider) lockInstance(ctx context.Context, id string) (unlock func(), err error) {
	p.mu.Lock()
	l := p.locks[id]
	if l == nil {
		l = &instanceLock{ch: make(chan struct{}, 1)}
		p.locks[id] = l
	}
	l.refs++
	p.mu.Unlock()
	release := func() {
		p.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(p.locks, id)
		}
		p.mu.Unlock()
	}
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
}

package local

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

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
	case !p.alive(r):
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

// alive reports whether r's stand-in process runs. A child of this process
// is known by its exit channel; another's (started before a daemon restart)
// is looked up by pid and marker. It runs with p.mu held.
func (p *Provider) alive(r *record) bool {
	if exited, ok := p.children[r.ID]; ok {
		select {
		case <-exited:
			delete(p.children, r.ID)
			return false
		default:
			return true
		}
	}
	return inspect(r.PID, r.Marker) == procAlive
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

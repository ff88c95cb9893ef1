package haproxy

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

var _ scaler.Pusher = (*Readiness)(nil)

// Push sets the slot's server to what the agent check answers for the slot
// (agentcheck.Reply), through the runtime API, so that HAProxy acts on a
// decision at once instead of at the next agent check:
//
//	binding   agent down, state ready: out of maintenance, health checks
//	          start, the agent keeps it DOWN until the slot is ready
//	ready     agent up, state ready, weight: UP as soon as its health
//	          check passes (it has: that is what made the slot ready)
//	draining  state drain
//	other     state maint
//
// The agent check answers the same from the reconciler's view, which is
// published before the push, and restores it after a reload or restart.
// The commands go in one exchange; HAProxy answers nothing to each that
// succeeds, so any answer is an error (*CommandError).
func (r *Readiness) Push(ctx context.Context, s scaler.Slot) error {
	be, srv := Backend(s.Pool), s.Name
	if !isProxyName(be) || !isProxyName(srv) {
		return fmt.Errorf("push %s: invalid backend/server name %q/%q", s.Key(), be, srv)
	}
	name := be + "/" + srv
	var cmds []string
	switch s.State {
	case scaler.Binding:
		cmds = []string{"set server " + name + " agent down", "set server " + name + " state ready"}
	case scaler.Ready:
		w := min(max(s.Weight, 0), scaler.MaxWeight)
		cmds = []string{"set server " + name + " agent up", "set server " + name + " state ready", "set weight " + name + " " + strconv.Itoa(w)}
	case scaler.Draining:
		cmds = []string{"set server " + name + " state drain"}
	default:
		cmds = []string{"set server " + name + " state maint"}
	}
	cmd := strings.Join(cmds, "; ")
	out, err := r.c.Exec(ctx, cmd)
	r.setHAProxyUp(err == nil)
	if err != nil {
		return fmt.Errorf("push %s: %w", s.Key(), err)
	}
	if strings.TrimSpace(out) != "" {
		return fmt.Errorf("push %s: %w", s.Key(), &CommandError{Command: cmd, Answer: out})
	}
	return nil
}

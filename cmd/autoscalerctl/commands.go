package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

// action runs a command once its flags are parsed; args are the positional
// arguments.
type action func(ctx context.Context, c *cli, args []string) error

type command struct {
	name    string
	args    string // synopsis after the name
	summary string
	detail  string
	// setup defines the command's flags on fs and returns the action that
	// reads them.
	setup func(fs *pflag.FlagSet) action
	// checkRaw, if set, sees the arguments before flag parsing (which would
	// take a negative number for a flag).
	checkRaw func(args []string) error
}

// reservePoll is how long each long poll of reserve --wait waits.
var reservePoll = 30 * time.Second

var commands = []*command{
	{
		name:    "status",
		summary: "show each pool's slots and reservations and the last reconcile round",
		detail: "Shows, per pool, its systems and features, builder bounds, warm pool, how many\n" +
			"slots are in each state and how many live reservations it has; then when the\n" +
			"reconciler last ran and its last error.",
		setup: noFlags(func(ctx context.Context, c *cli) error {
			st, err := c.api.Status(ctx)
			if err != nil {
				return err
			}
			if c.opts.json {
				return c.printJSON(st)
			}
			return printStatus(c.stdout, st, c.now())
		}),
	},
	{
		name:    "slots",
		summary: "list every slot: state, weight, instance, address",
		detail: "Lists every slot of every pool: its state and how long it has been in it, its\n" +
			"HAProxy weight, live reservations, the instance it holds and where it is reached,\n" +
			"when it last had work, and why it is draining.",
		setup: noFlags(func(ctx context.Context, c *cli) error {
			l, err := c.api.Slots(ctx)
			if err != nil {
				return err
			}
			if c.opts.json {
				return c.printJSON(l)
			}
			return printSlots(c.stdout, l.Slots, c.now())
		}),
	},
	{
		name:    "reserve",
		args:    "--system <system> [--feature f]... [--pool p] [--owner o] [--source s] [--lease 10m] [--id ID] [--wait] [--wait-timeout 10m]",
		summary: "take a reservation on build capacity",
		detail: "Asks the daemon for a reservation, as Buildbot does before a build. With --id,\n" +
			"asking twice gives the same reservation. With --wait, waits until a slot is\n" +
			"assigned (renewing the lease meanwhile) and exits 4 if the reservation fails,\n" +
			"expires or is released, or --wait-timeout passes; a reservation still pending\n" +
			"then is left in place (release it with 'autoscalerctl release <id>').\n" +
			"After autoscalerctl exits nothing renews the lease: keep it with\n" +
			"'autoscalerctl heartbeat <id>', give it back with 'autoscalerctl release <id>'.",
		setup: func(fs *pflag.FlagSet) action {
			system := fs.String("system", "", "Nix system the build needs, e.g. x86_64-linux (required)")
			features := fs.StringSlice("feature", nil, "required system feature, e.g. kvm (repeat or comma-separate)")
			pool := fs.String("pool", "", "pool to reserve in (default: the daemon picks by system and features)")
			owner := fs.String("owner", "autoscalerctl", "who holds the reservation, shown in listings")
			source := fs.String("source", "", "where the build comes from, e.g. github:owner/repo: it consumes that source's forecast")
			lease := fs.String("lease", "", "lease duration, e.g. 10m (default: the daemon's)")
			id := fs.String("id", "", "reservation id chosen by you (default: the daemon chooses)")
			wait := fs.Bool("wait", false, "wait until the reservation is ready")
			waitTimeout := fs.Duration("wait-timeout", 10*time.Minute, "with --wait: give up after this long")
			return func(ctx context.Context, c *cli, args []string) error {
				if err := wantArgs("reserve", args, 0, ""); err != nil {
					return err
				}
				if *system == "" {
					return usagef("--system is required, e.g. --system x86_64-linux")
				}
				if *lease != "" {
					if d, err := time.ParseDuration(*lease); err != nil || d <= 0 {
						return usagef("--lease must be a positive duration, e.g. 10m, not %q", *lease)
					}
				}
				if fs.Changed("wait-timeout") && !*wait {
					return usagef("--wait-timeout needs --wait")
				}
				if *waitTimeout <= 0 {
					return usagef("--wait-timeout must be a positive duration, e.g. 10m")
				}
				for _, f := range *features {
					if f == "" {
						return usagef("--feature must not be empty")
					}
				}
				req := api.CreateReservationRequest{
					ID: *id, Pool: *pool, System: *system, Features: *features, Owner: *owner, Lease: *lease, Source: *source,
				}
				return reserve(ctx, c, req, *wait, *waitTimeout)
			}
		},
	},
	{
		name:    "release",
		args:    "<id>",
		summary: "release a reservation (releasing twice is fine)",
		detail:  "Gives a reservation's capacity back. Releasing an ended reservation is not an error.",
		setup: noFlagsArgs("release", 1, "<id>", func(ctx context.Context, c *cli, args []string) error {
			r, err := c.api.Release(ctx, args[0])
			if err != nil {
				return err
			}
			if c.opts.json {
				return c.printJSON(r)
			}
			if r.State == "released" {
				_, err = fmt.Fprintf(c.stdout, "released reservation %s\n", cell(r.ID))
			} else {
				_, err = fmt.Fprintf(c.stdout, "reservation %s had already ended: %s\n", cell(r.ID), cell(r.State))
			}
			return err
		}),
	},
	{
		name:    "heartbeat",
		args:    "<id>",
		summary: "renew a reservation's lease",
		detail:  "Extends a reservation's lease by its lease duration, as a running build does.",
		setup: noFlagsArgs("heartbeat", 1, "<id>", func(ctx context.Context, c *cli, args []string) error {
			r, err := c.api.Heartbeat(ctx, args[0])
			if err != nil {
				return err
			}
			if c.opts.json {
				return c.printJSON(r)
			}
			_, err = fmt.Fprintf(c.stdout, "reservation %s (%s) now expires %s\n", cell(r.ID), cell(r.State), relTime(r.ExpiresAt, c.now()))
			return err
		}),
	},
	{
		name:    "drain",
		args:    "<pool>/<slot>",
		summary: "stop sending work to a slot; its builder is retired when idle",
		detail: "Drains a slot: no new reservations or connections go to it, running builds\n" +
			"finish, then its builder is terminated. Undo with 'autoscalerctl undrain'.",
		setup: slotCommand("drain", func(ctx context.Context, c *cli, pool, slot string) (api.Slot, error) {
			return c.api.Drain(ctx, pool, slot)
		}),
	},
	{
		name:    "undrain",
		args:    "<pool>/<slot>",
		summary: "take back an operator's drain",
		detail:  "Takes back 'autoscalerctl drain' for a slot whose builder is still there.",
		setup: slotCommand("undrain", func(ctx context.Context, c *cli, pool, slot string) (api.Slot, error) {
			return c.api.Undrain(ctx, pool, slot)
		}),
	},
	{
		name:    "weight",
		args:    "<pool>/<slot> <0-256>",
		summary: "set a slot's HAProxy weight",
		detail: "Sets the HAProxy weight the agent-check reports for a slot (default 100).\n" +
			"0 sends no new connections there without draining it.",
		checkRaw: func(args []string) error {
			for _, a := range args {
				if len(a) > 1 && a[0] == '-' && a[1] >= '0' && a[1] <= '9' {
					return usagef("weight must be an integer 0..256, not %q", a)
				}
			}
			return nil
		},
		setup: noFlagsArgs("weight", 2, "<pool>/<slot> <0-256>", func(ctx context.Context, c *cli, args []string) error {
			pool, slot, err := parseSlot(args[0])
			if err != nil {
				return err
			}
			w, err := strconv.Atoi(args[1])
			if err != nil || w < 0 || w > 256 {
				return usagef("weight must be an integer 0..256, not %q", args[1])
			}
			s, err := c.api.SetWeight(ctx, pool, slot, w)
			if err != nil {
				return err
			}
			if c.opts.json {
				return c.printJSON(s)
			}
			return printSlots(c.stdout, []api.Slot{s}, c.now())
		}),
	},
	{
		name:    "reconcile-now",
		summary: "run a reconcile round now and show how it went",
		detail: "Asks the daemon to run a reconcile round at once and waits for it. Exits 1\n" +
			"if the round ended with an error (the error is printed).",
		setup: noFlags(func(ctx context.Context, c *cli) error {
			rs, err := c.api.Reconcile(ctx)
			if err != nil {
				return err
			}
			if c.opts.json {
				err = c.printJSON(rs)
			} else {
				err = printReconcile(c.stdout, rs, c.now())
			}
			if err != nil {
				return err
			}
			if rs.LastError != "" {
				return fmt.Errorf("reconcile round ended with an error: %s", cell(rs.LastError))
			}
			return nil
		}),
	},
	{
		name:    "health",
		summary: "check that the daemon answers",
		detail:  "Asks the daemon's /healthz; prints ok and exits 0 if it answers.",
		setup: noFlags(func(ctx context.Context, c *cli) error {
			if err := c.api.Health(ctx); err != nil {
				return err
			}
			if c.opts.json {
				return c.printJSON(map[string]string{"status": "ok"})
			}
			_, err := fmt.Fprintln(c.stdout, "ok")
			return err
		}),
	},
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

// noFlags is setup for a command without flags or arguments.
func noFlags(f func(ctx context.Context, c *cli) error) func(*pflag.FlagSet) action {
	return func(fs *pflag.FlagSet) action {
		name := strings.TrimPrefix(fs.Name(), progName+" ")
		return func(ctx context.Context, c *cli, args []string) error {
			if err := wantArgs(name, args, 0, ""); err != nil {
				return err
			}
			return f(ctx, c)
		}
	}
}

// noFlagsArgs is setup for a command without flags that takes n arguments.
func noFlagsArgs(name string, n int, form string, f action) func(*pflag.FlagSet) action {
	return func(fs *pflag.FlagSet) action {
		return func(ctx context.Context, c *cli, args []string) error {
			if err := wantArgs(name, args, n, form); err != nil {
				return err
			}
			return f(ctx, c, args)
		}
	}
}

// slotCommand is setup for a command taking one <pool>/<slot> and
// answering with the slot.
func slotCommand(name string, f func(ctx context.Context, c *cli, pool, slot string) (api.Slot, error)) func(*pflag.FlagSet) action {
	return noFlagsArgs(name, 1, "<pool>/<slot>", func(ctx context.Context, c *cli, args []string) error {
		pool, slot, err := parseSlot(args[0])
		if err != nil {
			return err
		}
		s, err := f(ctx, c, pool, slot)
		if err != nil {
			return err
		}
		if c.opts.json {
			return c.printJSON(s)
		}
		return printSlots(c.stdout, []api.Slot{s}, c.now())
	})
}

// wantArgs checks the number of positional arguments.
func wantArgs(name string, args []string, n int, form string) error {
	if len(args) == n {
		return nil
	}
	switch {
	case n == 0:
		return usagef("%s takes no arguments, got %q", name, strings.Join(args, " "))
	case len(args) < n:
		return usagef("%s needs %s: %s %s %s", name, plural(n, "argument"), progName, name, form)
	default:
		return usagef("%s takes %s, got %d: %s %s %s", name, plural(n, "argument"), len(args), progName, name, form)
	}
}

func plural(n int, word string) string {
	if n == 1 {
		return "one " + word
	}
	return strconv.Itoa(n) + " " + word + "s"
}

// parseSlot parses "<pool>/<slot>" as scaler.ParseSlotKey does, with
// autoscalerctl's usage error; autoscalerctl may not import scaler
// (deps_test.go), and mirror_test.go keeps the two in step.
func parseSlot(s string) (pool, slot string, err error) {
	pool, slot, ok := strings.Cut(s, "/")
	if !ok || pool == "" || slot == "" || strings.Contains(slot, "/") {
		return "", "", usagef("slot must be <pool>/<slot>, e.g. x86/slot1, not %q", s)
	}
	return pool, slot, nil
}

// reserve creates a reservation and, with wait, waits until it is ready.
func reserve(ctx context.Context, c *cli, req api.CreateReservationRequest, wait bool, waitTimeout time.Duration) error {
	r, created, err := c.api.CreateReservation(ctx, req)
	if err != nil {
		return err
	}
	if wait && r.State == "pending" {
		if !c.opts.json {
			how := "created"
			if !created {
				how = "already existed"
			}
			fmt.Fprintf(c.stderr, "reservation %s %s; waiting up to %s for a slot...\n", cell(r.ID), how, waitTimeout)
		}
		r, err = waitReady(ctx, c, r, waitTimeout)
		if err != nil {
			return err
		}
	}
	if c.opts.json {
		err = c.printJSON(r)
	} else {
		err = printReservation(c.stdout, r, c.now())
	}
	if err != nil || !wait {
		return err
	}
	switch r.State {
	case "ready":
		return nil
	case "pending":
		return &notReadyError{msg: fmt.Sprintf("reservation %s still pending after %s (wait timed out); release it with '%s release %s'",
			cell(r.ID), waitTimeout, progName, cell(r.ID))}
	default:
		msg := fmt.Sprintf("reservation %s is %s", cell(r.ID), cell(r.State))
		if r.Reason != "" {
			msg += ": " + cell(r.Reason)
		}
		return &notReadyError{msg: msg}
	}
}

// waitReady long-polls r until it leaves pending or waitTimeout passes,
// renewing its lease meanwhile. A wait that times out returns the pending
// reservation and no error.
func waitReady(ctx context.Context, c *cli, r api.Reservation, waitTimeout time.Duration) (api.Reservation, error) {
	wctx, cancel := context.WithTimeout(ctx, waitTimeout)
	defer cancel()

	// Keep a long wait from outliving the lease.
	var wg sync.WaitGroup
	if lease, err := time.ParseDuration(r.Lease); err == nil && lease > 0 {
		every := max(lease/3, time.Second)
		wg.Go(func() {
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				select {
				case <-wctx.Done():
					return
				case <-t.C:
					// An error here shows up in the next poll's answer.
					_, _ = c.api.Heartbeat(wctx, r.ID)
				}
			}
		})
	}
	defer wg.Wait()
	defer cancel() // runs before wg.Wait

	got, err := c.api.WaitReady(wctx, r.ID, min(reservePoll, waitTimeout))
	if err != nil {
		if ctx.Err() == nil && wctx.Err() != nil && errors.Is(err, context.DeadlineExceeded) {
			if got.ID == "" {
				got = r
			}
			return got, nil // timed out; the caller reports it
		}
		return got, err
	}
	return got, nil
}

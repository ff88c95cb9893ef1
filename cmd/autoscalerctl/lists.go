package main

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

// The list commands follow slots in the help.
func init() {
	i := slices.IndexFunc(commands, func(c *command) bool { return c.name == "slots" })
	commands = slices.Insert(commands, i+1, listCommands...)
}

// reservationStates are the states GET /v1/reservations filters on.
var reservationStates = []string{"pending", "ready", "released", "failed", "expired"}

// pageFlags are the flags of a command that lists in pages: by default one
// page of the daemon's size; --limit n follows the daemon's pages until it
// has n; --all follows them to the end; --cursor starts where an earlier
// answer's next points.
type pageFlags struct {
	limit  *int
	all    *bool
	cursor *string
}

func definePageFlags(fs *pflag.FlagSet, what string) pageFlags {
	return pageFlags{
		limit:  fs.Int("limit", 0, fmt.Sprintf("at most this many %s, following the daemon's pages (default: one page, %d)", what, api.DefaultPageSize)),
		all:    fs.Bool("all", false, "every "+strings.TrimSuffix(what, "s")+", following the daemon's pages to the end"),
		cursor: fs.String("cursor", "", "start at this cursor (the next of an earlier --json answer)"),
	}
}

// count returns how many items to fetch: 0 for one page of the daemon's
// size, -1 for all.
func (p pageFlags) count() (int, error) {
	switch {
	case *p.limit < 0:
		return 0, usagef("--limit must be a positive integer")
	case *p.all && *p.limit > 0:
		return 0, usagef("give --limit or --all, not both")
	case *p.all:
		return -1, nil
	}
	return *p.limit, nil
}

// more tells, on stderr, how to see what did not fit; a table has no room
// for the cursor.
func (c *cli) more(what, next string) {
	if next != "" && !c.opts.json {
		fmt.Fprintf(c.stderr, "more %s: use --all, a larger --limit, or --cursor %s\n", what, next)
	}
}

var listCommands = []*command{
	{
		name:    "reservations",
		args:    "[--state s1,s2] [--pool p] [--limit n | --all] [--cursor c]",
		summary: "list reservations, newest first",
		detail: "Lists reservations, newest first: one page of the daemon's (" + fmt.Sprint(api.DefaultPageSize) + "), or --limit\n" +
			"of them, or --all. States: " + strings.Join(reservationStates, ", ") + ".",
		setup: func(fs *pflag.FlagSet) action {
			states := fs.StringSlice("state", nil, "only these states, comma-separated or repeated (e.g. pending,ready)")
			pool := fs.String("pool", "", "only this pool")
			pf := definePageFlags(fs, "reservations")
			return func(ctx context.Context, c *cli, args []string) error {
				if err := wantArgs("reservations", args, 0, ""); err != nil {
					return err
				}
				for _, s := range *states {
					if !slices.Contains(reservationStates, s) {
						return usagef("--state must be one or more of %s, not %q", strings.Join(reservationStates, ","), s)
					}
				}
				n, err := pf.count()
				if err != nil {
					return err
				}
				q := api.ReservationQuery{States: *states, Pool: *pool, Cursor: *pf.cursor}
				var l api.ReservationList
				if n == 0 {
					l, err = c.api.Reservations(ctx, q)
				} else {
					l, err = c.api.ListReservations(ctx, q, max(n, 0))
				}
				if err != nil {
					return err
				}
				if c.opts.json {
					return c.printJSON(l)
				}
				if err := printReservations(c.stdout, l.Reservations, c.now()); err != nil {
					return err
				}
				c.more("reservations", l.Next)
				return nil
			}
		},
	},
	{
		name:    "events",
		args:    "[--limit n | --all] [--cursor c] [--pool p] [--slot s] [--reservation id]",
		summary: "show the daemon's event log",
		detail: "Shows the daemon's event log: launches, state changes, drains, terminations,\n" +
			"reservations and operator actions; the newest " + fmt.Sprint(api.DefaultPageSize) + " (one page of the daemon's),\n" +
			"or --limit of them, or --all, oldest first. --slot takes a slot name (with\n" +
			"--pool) or <pool>/<slot>.",
		setup: func(fs *pflag.FlagSet) action {
			pf := definePageFlags(fs, "events")
			pool := fs.String("pool", "", "only events of this pool")
			slot := fs.String("slot", "", "only events of this slot (slot1, or x86/slot1)")
			res := fs.String("reservation", "", "only events of this reservation id")
			return func(ctx context.Context, c *cli, args []string) error {
				if err := wantArgs("events", args, 0, ""); err != nil {
					return err
				}
				n, err := pf.count()
				if err != nil {
					return err
				}
				q := api.EventQuery{Pool: *pool, Slot: *slot, Reservation: *res, Cursor: *pf.cursor}
				if strings.Contains(*slot, "/") {
					p, s, err := parseSlot(*slot)
					if err != nil {
						return err
					}
					if *pool != "" && *pool != p {
						return usagef("--pool %s and --slot %s name different pools", *pool, *slot)
					}
					q.Pool, q.Slot = p, s
				}
				var l api.EventList
				if n == 0 {
					l, err = c.api.Events(ctx, q)
				} else {
					l, err = c.api.ListEvents(ctx, q, max(n, 0))
				}
				if err != nil {
					return err
				}
				if c.opts.json {
					return c.printJSON(l)
				}
				if err := printEvents(c.stdout, l.Events, c.now()); err != nil {
					return err
				}
				c.more("events (older)", l.Next)
				return nil
			}
		},
	},
}

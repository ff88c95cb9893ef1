package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"time"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

// The forecast commands follow the reservation ones in the help.
func init() {
	i := slices.IndexFunc(commands, func(c *command) bool { return c.name == "heartbeat" })
	commands = slices.Insert(commands, i+1, forecastCommands...)
}

var forecastCommands = []*command{
	{
		name:    "forecast",
		args:    "--source <source> (--system <system> [--feature f]... | --pool p) [--builds N] [--ttl 30m] --id ID",
		summary: "say that builds are coming, so that builders boot before they arrive",
		detail: "Tells the daemon that an evaluation of --source started: the pool counts the\n" +
			"builds it expects (--builds, or the daemon's estimate from the builds the\n" +
			"last evaluations of that source produced) like reservations until they\n" +
			"arrive as reservations with that source, the forecast is withdrawn\n" +
			"('autoscalerctl withdraw-forecast <id>'), or --ttl passes. Asking twice with\n" +
			"one --id gives the same forecast.",
		setup: func(fs *pflag.FlagSet) action {
			source := fs.String("source", "", "where the builds come from, as their reservations name it, e.g. github:owner/repo (required)")
			system := fs.String("system", "", "Nix system the builds need, e.g. x86_64-linux (picks the pool)")
			features := fs.StringSlice("feature", nil, "required system feature, e.g. kvm (repeat or comma-separate)")
			pool := fs.String("pool", "", "pool the builds will use (default: the daemon picks by system and features)")
			builds := fs.Int("builds", 0, "how many builds are expected (default: the daemon estimates)")
			ttl := fs.Duration("ttl", 0, "how long the forecast counts at most, e.g. 30m (default: the daemon's, 30m)")
			id := fs.String("id", "", "forecast id, one per evaluation (required: a retry must not be a second forecast)")
			return func(ctx context.Context, c *cli, args []string) error {
				if err := wantArgs("forecast", args, 0, ""); err != nil {
					return err
				}
				switch {
				case *id == "":
					return usagef("--id is required, e.g. --id eval-1234: one per evaluation")
				case *source == "":
					return usagef("--source is required, e.g. --source github:owner/repo")
				case *system == "" && *pool == "":
					return usagef("--system or --pool is required, e.g. --system x86_64-linux")
				case fs.Changed("builds") && *builds < 0:
					return usagef("--builds must be 0 or more, not %d", *builds)
				case fs.Changed("ttl") && *ttl <= 0:
					return usagef("--ttl must be a positive duration, e.g. 30m")
				}
				req := api.CreateForecastRequest{ID: *id, Source: *source, System: *system, Features: *features, Pool: *pool}
				if fs.Changed("builds") {
					req.Builds = builds
				}
				if fs.Changed("ttl") {
					req.TTL = ttl.String()
				}
				f, _, err := c.api.CreateForecast(ctx, req)
				return c.showForecast(f, err)
			}
		},
	},
	{
		name:    "withdraw-forecast",
		args:    "<id>",
		summary: "say that a forecast's evaluation ended (withdrawing twice is fine)",
		detail: "The forecast stops counting as demand. Its source's reservations that arrive\n" +
			"until its TTL passes are still counted, as the history of later estimates.",
		setup: noFlagsArgs("withdraw-forecast", 1, "<id>", func(ctx context.Context, c *cli, args []string) error {
			return c.showForecast(c.api.WithdrawForecast(ctx, args[0]))
		}),
	},
	{
		name:    "forecasts",
		summary: "list the newest forecasts, open or ended",
		detail:  "The newest 100 forecasts: what each expected, what arrived, what still counts.",
		setup: noFlags(func(ctx context.Context, c *cli) error {
			l, err := c.api.Forecasts(ctx)
			if err != nil {
				return err
			}
			if c.opts.json {
				return c.printJSON(l)
			}
			return printForecasts(c.stdout, l.Forecasts, c.now())
		}),
	},
}

// showForecast prints the forecast a command got, or returns its error.
func (c *cli) showForecast(f api.Forecast, err error) error {
	if err != nil {
		return err
	}
	if c.opts.json {
		return c.printJSON(f)
	}
	return printForecast(c.stdout, f, c.now())
}

func printForecasts(w io.Writer, fs []api.Forecast, now time.Time) error {
	if len(fs) == 0 {
		_, err := fmt.Fprintln(w, "no forecasts")
		return err
	}
	t := newTable(w, "ID", "STATE", "SOURCE", "POOL", "BUILDS", "ARRIVED", "REMAINING", "CREATED", "EXPIRES")
	for _, f := range fs {
		t.row(f.ID, f.State, f.Source, f.Pool, buildsCell(f), strconv.Itoa(f.Arrived), strconv.Itoa(f.Remaining),
			relTime(f.CreatedAt, now), relTime(f.ExpiresAt, now))
	}
	return t.flush()
}

// printForecast shows one forecast as "key value" lines.
func printForecast(w io.Writer, f api.Forecast, now time.Time) error {
	kv, flush := keyValues(w)
	kv("id", f.ID)
	kv("state", f.State)
	kv("source", f.Source)
	kv("pool", f.Pool)
	kv("builds", buildsCell(f))
	kv("arrived", strconv.Itoa(f.Arrived))
	kv("remaining", strconv.Itoa(f.Remaining))
	kv("created", relTime(f.CreatedAt, now))
	kv("expires", relTime(f.ExpiresAt, now))
	if f.WithdrawnAt != nil {
		kv("withdrawn", relTime(*f.WithdrawnAt, now))
	}
	return flush()
}

func buildsCell(f api.Forecast) string {
	if f.Estimated {
		return strconv.Itoa(f.Builds) + " (estimated)"
	}
	return strconv.Itoa(f.Builds)
}

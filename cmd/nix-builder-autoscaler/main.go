// Command nix-builder-autoscaler is the autoscaler daemon and its tools.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

const usage = `Usage: nix-builder-autoscaler <command> [flags]

Commands:
  run --config FILE        run the daemon (the default command)
  check-config FILE        validate a config file; exit 1 listing every problem
  haproxy-config --config FILE (--out DIR | --stdout) [--spoe-path PATH]
                           render HAProxy's config and SPOE file from the same
                           config file the daemon reads
  preflight --config FILE [--json]
                           check, with read-only and DryRun calls, that AWS,
                           Tailscale and HAProxy answer as the config needs;
                           exit 1 naming the fix of each failure
  simulate --config FILE --trace FILE [--seed N] [--json] [--sweep KEY=V1,V2,... --svg OUT]
                           replay a build trace against the scaling policy and
                           baselines (simulate --generate ... writes a trace)
  demo [--once]            run the daemon on a built-in config with local
                           stand-in builders and walk one reservation through
  local-builder ...        internal: a local stand-in builder process

Exit codes: 0 ok, 1 failure, 2 usage error.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return runDaemon(args, stdout, stderr)
	case "check-config":
		return checkConfig(args, stdout, stderr)
	case "haproxy-config":
		return haproxyConfigCmd(args, stdout, stderr)
	case "simulate":
		return simulateCmd(args, stdout, stderr)
	case "preflight":
		return preflightCmd(args, stdout, stderr)
	case "demo":
		return demo(args, stdout, stderr)
	case "local-builder":
		return local.BuilderMain(args)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "nix-builder-autoscaler: unknown command %q\n\n%s", cmd, usage)
	return 2
}

func checkConfig(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("check-config", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, `print {"file","ok","problems":[{"key","message"}]} on stdout`)
	if code, ok := parseFlags(fs, args, stdout, stderr, "check-config [--json] FILE"); !ok {
		return code
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: nix-builder-autoscaler check-config [--json] FILE")
		return 2
	}
	path := fs.Arg(0)
	_, err := config.Load(path)
	if *asJSON {
		return checkConfigJSON(path, err, stdout)
	}
	if err != nil {
		var ps config.Problems
		if errors.As(err, &ps) {
			fmt.Fprintf(stderr, "%s: %d problem(s):\n", path, len(ps))
			for _, p := range ps {
				fmt.Fprintf(stderr, "  %s\n", p)
			}
			return 1
		}
		fmt.Fprintf(stderr, "%s: %v\n", path, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: ok\n", path)
	return 0
}

type problemJSON struct {
	Key     string `json:"key"`
	Message string `json:"message"`
}

func checkConfigJSON(path string, err error, stdout io.Writer) int {
	out := struct {
		File     string        `json:"file"`
		OK       bool          `json:"ok"`
		Problems []problemJSON `json:"problems"`
	}{File: path, OK: err == nil, Problems: []problemJSON{}}
	var ps config.Problems
	switch {
	case errors.As(err, &ps):
		for _, p := range ps {
			out.Problems = append(out.Problems, problemJSON{Key: p.Key, Message: p.Message})
		}
	case err != nil:
		out.Problems = append(out.Problems, problemJSON{Message: err.Error()})
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(out)
	if err != nil {
		return 1
	}
	return 0
}

// newLogger builds the daemon's logger from the config.
func newLogger(d config.Daemon, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(d.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if d.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// daemonGCPercent is the daemon's garbage collection target (GOGC). Its
// live heap is small (a few MiB for hundreds of slots), and each reconcile
// round leaves short-lived garbage behind (HAProxy's stats, provider lists,
// database rows): at Go's default of 100 the collector took about a fifth
// of a round's CPU. 400 trades a few tens of MiB of RSS for that
// (docs/performance.md).
const daemonGCPercent = 400

// setGCTarget applies daemonGCPercent unless GOGC is set, which wins.
func setGCTarget() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(daemonGCPercent)
	}
}

// signalContext ends on SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func runDaemon(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.StringP("config", "c", "/etc/nix-builder-autoscaler/config.toml", "config file")
	if code, ok := parseFlags(fs, args, stdout, stderr, "run [--config FILE]"); !ok {
		return code
	}
	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintf(stderr, "nix-builder-autoscaler: %v\n", err)
		return 1
	}
	log := newLogger(cfg.Daemon, stderr)
	slog.SetDefault(log)
	setGCTarget()
	ctx, stop := signalContext()
	defer stop()
	d, err := daemon.New(ctx, cfg, daemon.Options{Logger: log})
	if err != nil {
		log.Error("start failed", "err", err)
		return 1
	}
	if err := d.Run(ctx); err != nil {
		log.Error("daemon failed", "err", err)
		return 1
	}
	return 0
}

// parseFlags parses a command's flags. A bad flag is named on stderr with
// the command's usage line (exit code 2); --help prints the flags on
// stdout (exit code 0). ok is false when the command must exit with code.
func parseFlags(fs *pflag.FlagSet, args []string, stdout, stderr io.Writer, usageLine string) (code int, ok bool) {
	// pflag's own report goes through Usage; this prints it instead, once
	// and in the same words for every command.
	fs.Usage = func() {}
	err := fs.Parse(args)
	switch {
	case err == nil:
		return 0, true
	case errors.Is(err, pflag.ErrHelp):
		fmt.Fprintf(stdout, "usage: nix-builder-autoscaler %s\n\n%s", usageLine, fs.FlagUsages())
		return 0, false
	}
	fmt.Fprintf(stderr, "nix-builder-autoscaler %s: %v\nusage: nix-builder-autoscaler %s\n(nix-builder-autoscaler %s --help lists the flags)\n",
		fs.Name(), err, usageLine, fs.Name())
	return 2, false
}

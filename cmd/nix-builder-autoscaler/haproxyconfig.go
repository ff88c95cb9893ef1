package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
)

// The files haproxy-config --out writes.
const (
	haproxyCfgFile = "haproxy.cfg"
	spoeConfFile   = "nba-spoe.conf"
)

const haproxyConfigUsage = `usage: nix-builder-autoscaler haproxy-config [--config FILE] (--out DIR | --stdout) [--spoe-path PATH]

Renders HAProxy's configuration for every pool of the config file (the same
file the daemon reads), so HAProxy and the daemon always agree.

  -c, --config FILE the daemon's config file
                    (default /etc/nix-builder-autoscaler/config.toml)
  --out DIR         write DIR/haproxy.cfg and DIR/nba-spoe.conf (DIR is created
                    if missing); haproxy.cfg names the SPOE file by its absolute
                    path, DIR/nba-spoe.conf unless --spoe-path says otherwise
  --stdout          print haproxy.cfg only; needs --spoe-path, where you put the
                    SPOE file yourself (generate it with --out)
  --spoe-path PATH  absolute path HAProxy will read the SPOE file from

Exit codes: 0 ok, 1 the config cannot be read or turned into HAProxy's
configuration, or a file cannot be written, 2 usage error.
`

// haproxyConfigCmd is the haproxy-config command.
func haproxyConfigCmd(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("haproxy-config", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {} // printed below: on stdout for --help, else on stderr
	path := fs.StringP("config", "c", "/etc/nix-builder-autoscaler/config.toml", "config file")
	out := fs.String("out", "", "write haproxy.cfg and nba-spoe.conf into this directory")
	toStdout := fs.Bool("stdout", false, "print haproxy.cfg on stdout")
	spoePath := fs.String("spoe-path", "", "absolute path HAProxy reads the SPOE file from")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, haproxyConfigUsage)
			return 0
		}
		fmt.Fprintf(stderr, "nix-builder-autoscaler haproxy-config: %v\n\n%s", err, haproxyConfigUsage)
		return 2
	}
	usageErr := func(msg string) int {
		fmt.Fprintf(stderr, "nix-builder-autoscaler haproxy-config: %s\n\n%s", msg, haproxyConfigUsage)
		return 2
	}
	switch {
	case fs.NArg() > 0:
		return usageErr(fmt.Sprintf("unexpected argument %q", fs.Arg(0)))
	case *out == "" && !*toStdout:
		return usageErr("say where to put the configuration: --out DIR or --stdout")
	case *out != "" && *toStdout:
		return usageErr("--out and --stdout exclude each other")
	case *toStdout && *spoePath == "":
		return usageErr("--stdout needs --spoe-path: haproxy.cfg names the SPOE file by its absolute path")
	case *spoePath != "" && !filepath.IsAbs(*spoePath):
		return usageErr(fmt.Sprintf("--spoe-path %q is not an absolute path", *spoePath))
	}

	cfg, err := config.Load(*path)
	if err != nil {
		printConfigError(stderr, *path, err)
		return 1
	}
	opts := haproxy.Options{SPOEPath: *spoePath}
	var written string // where --out puts the SPOE file, absolute
	if *out != "" {
		dir, err := filepath.Abs(*out)
		if err != nil {
			fmt.Fprintf(stderr, "nix-builder-autoscaler haproxy-config: --out %q: %v\n", *out, err)
			return 1
		}
		written = filepath.Join(dir, spoeConfFile)
		if opts.SPOEPath == "" {
			opts.SPOEPath = written
		}
	}
	files, err := haproxy.Generate(cfg.HAProxySpec(), opts)
	if err != nil {
		var ps haproxy.Problems
		if errors.As(err, &ps) {
			fmt.Fprintf(stderr, "%s: cannot generate HAProxy's configuration, %d problem(s):\n", *path, len(ps))
			for _, p := range ps {
				fmt.Fprintf(stderr, "  %s\n", p)
			}
			return 1
		}
		fmt.Fprintf(stderr, "%s: cannot generate HAProxy's configuration: %v\n", *path, err)
		return 1
	}

	if *toStdout {
		if _, err := stdout.Write(files.HAProxyCfg); err != nil {
			fmt.Fprintf(stderr, "nix-builder-autoscaler haproxy-config: %v\n", err)
			return 1
		}
		return 0
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		fmt.Fprintf(stderr, "nix-builder-autoscaler haproxy-config: %v\n", err)
		return 1
	}
	// The SPOE file first: haproxy.cfg names it, so once haproxy.cfg is in
	// place everything it refers to is too.
	for _, f := range []struct {
		name string
		data []byte
	}{{spoeConfFile, files.SPOEConf}, {haproxyCfgFile, files.HAProxyCfg}} {
		p := filepath.Join(*out, f.name)
		if err := writeFileAtomic(p, f.data); err != nil {
			fmt.Fprintf(stderr, "nix-builder-autoscaler haproxy-config: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "wrote %s\n", p)
	}
	if opts.SPOEPath != written {
		fmt.Fprintf(stdout, "haproxy.cfg reads the SPOE file from %s: put %s there\n", opts.SPOEPath, filepath.Join(*out, spoeConfFile))
	}
	return 0
}

// printConfigError prints a config.Load error as check-config does.
func printConfigError(stderr io.Writer, path string, err error) {
	var ps config.Problems
	if errors.As(err, &ps) {
		fmt.Fprintf(stderr, "%s: %d problem(s):\n", path, len(ps))
		for _, p := range ps {
			fmt.Fprintf(stderr, "  %s\n", p)
		}
		return
	}
	fmt.Fprintf(stderr, "nix-builder-autoscaler haproxy-config: %v\n", err)
}

// writeFileAtomic replaces path with data, so a reloading HAProxy never reads
// half a file.
func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

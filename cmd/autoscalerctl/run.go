package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

// Exit codes; keep in step with exitCodesHelp and docs/cli.md.
const (
	exitOK          = 0 // success
	exitAPIError    = 1 // the daemon answered with an error
	exitUsage       = 2 // unknown command or flag, bad argument
	exitUnreachable = 3 // the daemon could not be reached
	exitNotReady    = 4 // reserve --wait: failed, expired, released or timed out
)

const progName = "autoscalerctl"

// usageError is a mistake in the command line; it exits with exitUsage.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// notReadyError ends reserve --wait without a ready reservation; it exits
// with exitNotReady.
type notReadyError struct{ msg string }

func (e *notReadyError) Error() string { return e.msg }

// globalOpts are the flags every command accepts, before or after its name.
type globalOpts struct {
	socket    string
	url       string
	tokenFile string
	json      bool
	timeout   time.Duration
}

func globalFlags(o *globalOpts) *pflag.FlagSet {
	fs := newFlagSet(progName)
	fs.StringVar(&o.socket, "socket", envOr("NBA_SOCKET", api.DefaultSocket),
		"unix socket of the daemon (env NBA_SOCKET)")
	fs.StringVar(&o.url, "url", os.Getenv("NBA_URL"),
		"base URL of the daemon's TCP listener, used instead of the socket, e.g. https://ci-host:8443 (env NBA_URL)")
	fs.StringVar(&o.tokenFile, "token-file", os.Getenv("NBA_TOKEN_FILE"),
		"file holding the bearer token for --url (env NBA_TOKEN_FILE)")
	fs.BoolVar(&o.json, "json", false, "print the API's JSON answer (indented) instead of a table")
	fs.DurationVar(&o.timeout, "timeout", api.DefaultTimeout,
		"time limit for each request to the daemon (a long poll gets its wait on top)")
	return fs
}

func newFlagSet(name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors and help are printed by run
	fs.Usage = func() {}
	fs.SortFlags = false
	return fs
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// cli is what a command runs with.
type cli struct {
	opts   *globalOpts
	api    *api.Client
	stdout io.Writer
	stderr io.Writer
	now    func() time.Time
}

// printJSON prints v as indented JSON.
func (c *cli) printJSON(v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(c.stdout, "%s\n", b)
	return err
}

// run runs autoscalerctl with args (without the program name) and returns
// the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	return runContext(context.Background(), args, stdout, stderr)
}

func runContext(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	opts := &globalOpts{}
	gfs := globalFlags(opts)
	gfs.SetInterspersed(false) // stop at the command name
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			writeMainHelp(stdout, gfs)
			return exitOK
		}
		return fail(stderr, usagef("%v", err), "")
	}
	rest := gfs.Args()
	if len(rest) == 0 {
		fmt.Fprintf(stderr, "%s: no command given\n\n", progName)
		writeMainHelp(stderr, gfs)
		return exitUsage
	}

	name, cmdArgs := rest[0], rest[1:]
	if name == "help" {
		return runHelp(cmdArgs, gfs, stdout, stderr)
	}
	cmd := lookup(name)
	if cmd == nil {
		return fail(stderr, usagef("unknown command %q", name), "")
	}

	if cmd.checkRaw != nil {
		if err := cmd.checkRaw(cmdArgs); err != nil {
			return fail(stderr, err, cmd.name)
		}
	}
	fs := newFlagSet(progName + " " + cmd.name)
	act := cmd.setup(fs)
	fs.AddFlagSet(gfs) // global flags work after the command name too
	if err := fs.Parse(cmdArgs); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			writeCommandHelp(stdout, cmd, gfs)
			return exitOK
		}
		return fail(stderr, usagef("%v", err), cmd.name)
	}

	client, err := newClient(opts, gfs)
	if err != nil {
		return fail(stderr, err, cmd.name)
	}
	c := &cli{opts: opts, api: client, stdout: stdout, stderr: stderr, now: time.Now}
	if err := act(ctx, c, fs.Args()); err != nil {
		return fail(stderr, err, cmd.name)
	}
	return exitOK
}

// fail prints err and returns its exit code. cmd names the command for the
// usage hint, if known.
func fail(stderr io.Writer, err error, cmd string) int {
	fmt.Fprintf(stderr, "%s: %v\n", progName, err)
	code := exitCode(err)
	if code == exitUsage {
		if cmd != "" {
			fmt.Fprintf(stderr, "Run '%s help %s' for usage.\n", progName, cmd)
		} else {
			fmt.Fprintf(stderr, "Run '%s help' for usage.\n", progName)
		}
	}
	return code
}

func exitCode(err error) int {
	var (
		ue *usageError
		nr *notReadyError
		un *api.UnreachableError
	)
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &nr):
		return exitNotReady
	case errors.As(err, &un):
		return exitUnreachable
	default: // *api.APIError and anything else that went wrong talking to the daemon
		return exitAPIError
	}
}

// newClient makes the API client the global flags ask for.
func newClient(o *globalOpts, gfs *pflag.FlagSet) (*api.Client, error) {
	if o.timeout <= 0 {
		return nil, usagef("--timeout must be a positive duration, e.g. --timeout 30s")
	}
	socketFlag := gfs.Lookup("socket").Changed
	if socketFlag && gfs.Lookup("url").Changed {
		return nil, usagef("use either --socket or --url, not both")
	}
	var c *api.Client
	if o.url != "" && !socketFlag { // an explicit --socket beats NBA_URL
		u, err := url.Parse(o.url)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, usagef("--url must be an http:// or https:// URL, e.g. https://ci-host:8443, not %q", o.url)
		}
		var token string
		if o.tokenFile != "" {
			b, err := readTokenFile(o.tokenFile)
			if err != nil {
				return nil, usagef("cannot read the token file: %v", err)
			}
			token = strings.TrimSpace(string(b))
			if token == "" {
				return nil, usagef("token file %s is empty", o.tokenFile)
			}
		}
		c = api.NewHTTPClient(o.url, token)
	} else {
		if o.socket == "" {
			return nil, usagef("--socket must not be empty")
		}
		c = api.NewUnixClient(o.socket)
	}
	c.Timeout = o.timeout
	return c, nil
}

// maxTokenFile bounds the token file read: a token is tens of bytes, and a
// wrong path (/dev/zero, a log) must not fill memory.
const maxTokenFile = 64 << 10

func readTokenFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxTokenFile+1))
	if err == nil && len(b) > maxTokenFile {
		err = fmt.Errorf("%s is larger than %d KiB; check the path", path, maxTokenFile>>10)
	}
	return b, err
}

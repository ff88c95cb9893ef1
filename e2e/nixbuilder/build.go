package nixbuilder

import (
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"fmt"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/syncbuf"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Building with the real Nix client on a builder.

// BuildOptions vary what Build builds.
type BuildOptions struct {
	// Derivations is how many independent derivations to build (default 1).
	Derivations int
	// Jobs is how many the client builds at once on the builder, each over
	// its own SSH connection (default: Derivations).
	Jobs int
	// Sleep makes every build sleep this long on the builder first.
	Sleep time.Duration
	// Protocol is "ssh-ng" (default; Nix runs nix-daemon --stdio on the
	// builder) or "ssh" (nix-store --serve).
	Protocol string
	// Stamp makes every build record when it started and ended on the
	// builder (Result.Spans).
	Stamp bool
}

// Span is when one build ran on the builder, by the builder's clock.
type Span struct{ Start, End time.Time }

// MaxOverlap is the largest number of spans that ran at one moment.
func MaxOverlap(spans []Span) int {
	most := 0
	for _, s := range spans {
		// The count is highest at some span's start.
		n := 0
		for _, o := range spans {
			if !o.Start.After(s.Start) && o.End.After(s.Start) {
				n++
			}
		}
		most = max(most, n)
	}
	return most
}

// Result is one finished nix-build.
type Result struct {
	OutPaths []string      // the outputs, /nix/store/<hash>-nba-e2e-<nonce>[-<i>]
	Output   string        // nix-build's stdout and stderr
	Command  string        // the command line, for logs
	Duration time.Duration // how long nix-build ran
	Spans    []Span        // with BuildOptions.Stamp: one per output, in order
}

// Build builds one new derivation on the builder at hostport with the real
// Nix client, and returns nix-build's output (stdout and stderr; its last
// line is the output path). It fails unless the output arrived in the
// client's store with the content the builder wrote.
func (e *Env) Build(ctx context.Context, hostport string) (string, error) {
	r, err := e.BuildWith(ctx, hostport, BuildOptions{})
	if r == nil {
		return "", err
	}
	return r.Output, err
}

// BuildWith is Build with options. On a failed build the Result (without
// OutPaths) still carries nix-build's output.
func (e *Env) BuildWith(ctx context.Context, hostport string, opts BuildOptions) (*Result, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, fmt.Errorf("nixbuilder: builder address %q: %w", hostport, err)
	}
	if strings.Contains(host, ":") {
		return nil, fmt.Errorf("nixbuilder: builder address %q: Nix 2.8 takes no IPv6 literal in a store URI", hostport)
	}
	if opts.Derivations <= 0 {
		opts.Derivations = 1
	}
	if opts.Jobs <= 0 {
		opts.Jobs = opts.Derivations
	}
	if opts.Protocol == "" {
		opts.Protocol = "ssh-ng"
	}
	nonce := fmt.Sprintf("%s-%d", e.nonce, e.seq.Add(1))
	args := []string{
		e.Derivation,
		"--argstr", "nonce", nonce,
		"--argstr", "system", e.System,
		"--argstr", "count", strconv.Itoa(opts.Derivations),
		"--argstr", "sleep", strconv.FormatFloat(opts.Sleep.Seconds(), 'f', -1, 64),
		"--argstr", "stamp", map[bool]string{false: "0", true: "1"}[opts.Stamp],
		"--no-out-link",
		"--store", "local?root=" + e.ClientStore,
		"--max-jobs", "0",
		"--builders", e.BuildersSpec(opts.Protocol, host, opts.Jobs),
		"--option", "substituters", "",
		"--option", "builders-use-substitutes", "false",
	}
	cmd := exec.CommandContext(ctx, "nix-build", args...)
	cmd.Env = e.ClientEnv(port)
	cmd.Dir = e.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	var stdout bytes.Buffer
	var both syncbuf.Buffer
	cmd.Stdout = io.MultiWriter(&stdout, &both)
	cmd.Stderr = &both
	r := &Result{Command: "NIX_SSHOPTS=" + shellQuote(e.SSHOpts(port)) + " nix-build " + shellJoin(args)}
	start := time.Now()
	err = cmd.Run()
	r.Duration = time.Since(start)
	r.Output = both.String()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
		return r, fmt.Errorf("nixbuilder: nix-build on %s: %w\n%s", hostport, err, r.Output)
	}
	for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			r.OutPaths = append(r.OutPaths, line)
		}
	}
	if len(r.OutPaths) != opts.Derivations {
		return r, fmt.Errorf("nixbuilder: nix-build on %s printed %d output paths, want %d\n%s", hostport, len(r.OutPaths), opts.Derivations, r.Output)
	}
	for _, p := range r.OutPaths {
		if !strings.HasPrefix(p, "/nix/store/") || !strings.Contains(p, "-nba-e2e-"+nonce) {
			return r, fmt.Errorf("nixbuilder: nix-build on %s printed %q, not an output of this build", hostport, p)
		}
		got, err := os.ReadFile(filepath.Join(e.ClientStore, p))
		if err != nil || !strings.HasSuffix(string(got), "ok\n") {
			return r, fmt.Errorf("nixbuilder: output %s in the client store: %q, %v", p, got, err)
		}
		if opts.Stamp {
			sp, err := parseSpan(string(got))
			if err != nil {
				return r, fmt.Errorf("nixbuilder: output %s: %w", p, err)
			}
			r.Spans = append(r.Spans, sp)
		}
	}
	return r, nil
}

// parseSpan reads the "start NANOS" and "end NANOS" lines a stamped build
// writes before its "ok".
func parseSpan(out string) (Span, error) {
	var start, end int64
	if _, err := fmt.Sscanf(out, "start %d\nend %d\nok\n", &start, &end); err != nil {
		return Span{}, fmt.Errorf("not a stamped output (%q): %w", out, err)
	}
	return Span{Start: time.Unix(0, start), End: time.Unix(0, end)}, nil
}

// BuildersSpec is the Nix `builders` entry for a builder reached at host
// (the port goes into NIX_SSHOPTS, see SSHOpts): protocol is "ssh-ng" or
// "ssh". The builder's wrapper picks its own store, so the URI needs no
// remote-program or remote-store.
func (e *Env) BuildersSpec(protocol, host string, jobs int) string {
	return fmt.Sprintf("%s://%s@%s %s - %d", protocol, e.User, host, e.System, jobs)
}

// SSHOpts is NIX_SSHOPTS for a builder at port: the Env's ssh_config (key,
// known_hosts, HostKeyAlias, batch mode) and the port. Nix splits it at
// whitespace; Setup's paths have none.
func (e *Env) SSHOpts(port string) string {
	return "-F " + e.SSHConfig + " -p " + port
}

// ClientEnv is the environment nix-build runs in: nothing from the caller
// but PATH, a home, caches and Nix configuration of its own (so neither
// /etc/nix/nix.conf nor /etc/nix/machines applies), and NIX_SSHOPTS for the
// builder's port.
func (e *Env) ClientEnv(port string) []string {
	home := filepath.Join(e.Dir, "home")
	return []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + home,
		"USER=" + e.User,
		"TMPDIR=" + filepath.Join(e.Dir, "tmp"),
		"XDG_CACHE_HOME=" + filepath.Join(home, ".cache"),
		"XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		"XDG_DATA_HOME=" + filepath.Join(home, ".local", "share"),
		"XDG_STATE_HOME=" + filepath.Join(home, ".local", "state"),
		"NIX_CONF_DIR=" + filepath.Join(e.Dir, "nixconf"),
		"NIX_USER_CONF_FILES=" + filepath.Join(e.Dir, "nixconf", "nix.conf"),
		"NIX_PATH=",
		"NIX_SSHOPTS=" + e.SSHOpts(port),
	}
}

// nixSystem is the Nix system of this machine.
func nixSystem() string {
	switch runtime.GOARCH {
	case "amd64":
		return "x86_64-linux"
	case "arm64":
		return "aarch64-linux"
	case "386":
		return "i686-linux"
	case "riscv64":
		return "riscv64-linux"
	}
	return runtime.GOARCH + "-linux"
}

func safePathRune(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._/+-", r)
}

// shellQuote quotes s for /bin/sh (as the daemon's `quote` does).
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = shellQuote(a)
	}
	return strings.Join(q, " ")
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// removeAll removes dir, making read-only store paths writable first.
func removeAll(dir string) error {
	if err := os.RemoveAll(dir); err == nil {
		return nil
	}
	filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			os.Chmod(path, 0o755)
		}
		return nil
	})
	return os.RemoveAll(dir)
}

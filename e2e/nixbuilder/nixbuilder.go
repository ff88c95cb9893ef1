// Package nixbuilder gives end-to-end tests real Nix remote builders: real
// sshd processes serving private Nix stores, started and stopped by shell
// scripts that the daemon's local provider can run as its launch_command
// and terminate_command, and a real Nix client that builds on them.
//
// Setup makes the shared material (a client key, the one host key every
// builder presents, a known_hosts line for the logical host name behind
// HAProxy, an ssh_config, a trivial derivation, a client store).
// LaunchCommand and TerminateCommand are the hook templates for the daemon's
// config; Launch and Terminate run the same scripts directly. Build runs
// nix-build with --max-jobs 0 so that the build must happen on the builder
// at the given address.
//
// As root, and where unshare works, each builder's sshd runs in its own
// network namespace with a 100.64.x.y address on port 22 (a veth pair to the
// host, nothing under /run/netns); otherwise it listens on 127.0.0.x and a
// free port. See scripts/launch-builder.sh.
package nixbuilder

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/syncbuf"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

var (
	//go:embed scripts/launch-builder.sh
	launchScript []byte
	//go:embed scripts/terminate-builder.sh
	terminateScript []byte
	//go:embed derivation.nix
	derivationNix []byte
)

// HostAlias is the logical host name all builders share: the known_hosts
// line names it, and ssh checks every builder's key against it
// (HostKeyAlias), whatever address it reached.
const HostAlias = "nba-builders"

// Env is the client side and the shared builder material of one test.
// Every path is absolute; Dir is removed when the test ends, after every
// builder under StateDir (and under any directory given to TrackStateDir)
// has been terminated.
type Env struct {
	Dir             string // everything below lives here
	User            string // the user clients log in as: root, or the current user
	System          string // the Nix system the derivations are for, e.g. x86_64-linux
	ClientKey       string // the client's private key
	AuthorizedKeys  string // the client's public key, as an authorized_keys file
	HostKey         string // the private host key every builder presents
	HostPublicKey   string // its public half, "ssh-ed25519 AAAA…"
	KnownHosts      string // one line: HostAlias and HostPublicKey
	SSHConfig       string // ssh_config for the client (key, known_hosts, HostKeyAlias, batch mode)
	LaunchScript    string // scripts/launch-builder.sh, written here
	TerminateScript string // scripts/terminate-builder.sh, written here
	Derivation      string // derivation.nix
	StateDir        string // where Launch puts builders (StateDir/nixbuilder/<id>)
	ClientStore     string // the root of the client's store, local?root=ClientStore

	t     testing.TB
	nonce string
	seq   atomic.Int64
	mu    sync.Mutex
	dirs  map[string]bool // state directories whose builders are terminated at the end
}

// Setup creates an Env for t, or fails the test if a program it needs is
// missing (nix-build, nix-daemon, nix-store, sshd, ssh, ssh-keygen,
// ssh-keyscan).
func Setup(t testing.TB) *Env {
	t.Helper()
	if err := Check(); err != nil {
		t.Fatal(err)
	}
	// Not t.TempDir: the scripts accept only [A-Za-z0-9._/+-] in paths, and
	// read-only store paths need chmod before removal as non-root.
	dir, err := os.MkdirTemp("", "nbab")
	if err != nil {
		t.Fatal(err)
	}
	dir, err = filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	if strings.ContainsFunc(dir, func(r rune) bool { return !safePathRune(r) }) {
		os.RemoveAll(dir)
		t.Fatalf("temporary directory %q has characters the builder scripts refuse; set TMPDIR to a plain path", dir)
	}
	e := &Env{
		Dir:             dir,
		System:          nixSystem(),
		ClientKey:       filepath.Join(dir, "client_key"),
		AuthorizedKeys:  filepath.Join(dir, "authorized_keys"),
		HostKey:         filepath.Join(dir, "host_key"),
		KnownHosts:      filepath.Join(dir, "known_hosts"),
		SSHConfig:       filepath.Join(dir, "ssh_config"),
		LaunchScript:    filepath.Join(dir, "bin", "launch-builder.sh"),
		TerminateScript: filepath.Join(dir, "bin", "terminate-builder.sh"),
		Derivation:      filepath.Join(dir, "derivation.nix"),
		StateDir:        filepath.Join(dir, "state"),
		ClientStore:     filepath.Join(dir, "client-store"),
		t:               t,
		nonce:           randomHex(4),
		dirs:            map[string]bool{},
	}
	routeUser := holdRouteUser()
	t.Cleanup(func() {
		if err := removeAll(dir); err != nil {
			t.Errorf("nixbuilder: remove %s: %v", dir, err)
		}
		if err := releaseRoute(routeUser); err != nil {
			t.Errorf("nixbuilder: %v", err)
		}
	})
	e.User = "root"
	if os.Geteuid() != 0 {
		u, err := user.Current()
		if err != nil {
			t.Fatal(err)
		}
		e.User = u.Username
	}
	for _, d := range []string{"bin", "state", "client-store", "home", "tmp", "nixconf"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{e.LaunchScript, launchScript, 0o755},
		{e.TerminateScript, terminateScript, 0o755},
		{e.Derivation, derivationNix, 0o644},
		{filepath.Join(dir, "nixconf", "nix.conf"), nil, 0o644},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, f.data, f.mode); err != nil {
			t.Fatal(err)
		}
	}
	for _, key := range []struct{ path, comment string }{
		{e.ClientKey, "nba-e2e-client"},
		{e.HostKey, "nba-e2e-host"},
	} {
		out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.comment, "-f", key.path).CombinedOutput()
		if err != nil {
			t.Fatalf("ssh-keygen: %v: %s", err, out)
		}
	}
	pub, err := os.ReadFile(e.HostKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(string(pub))
	if len(fields) < 2 {
		t.Fatalf("odd host public key %q", pub)
	}
	e.HostPublicKey = fields[0] + " " + fields[1]
	clientPub, err := os.ReadFile(e.ClientKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.AuthorizedKeys, clientPub, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.KnownHosts, []byte(HostAlias+" "+e.HostPublicKey+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sshConfig := fmt.Sprintf(`# Written by nixbuilder.Setup: every builder is one logical host.
Host *
	User %s
	IdentityFile %s
	IdentitiesOnly yes
	IdentityAgent none
	UserKnownHostsFile %s
	GlobalKnownHostsFile /dev/null
	HostKeyAlias %s
	StrictHostKeyChecking yes
	UpdateHostKeys no
	CheckHostIP no
	BatchMode yes
	PasswordAuthentication no
	KbdInteractiveAuthentication no
	ConnectTimeout 5
	ConnectionAttempts 1
	ServerAliveInterval 5
	ServerAliveCountMax 3
	ControlMaster no
	ControlPath none
	ForwardAgent no
	ForwardX11 no
	LogLevel ERROR
`, e.User, e.ClientKey, e.KnownHosts, HostAlias)
	if err := os.WriteFile(e.SSHConfig, []byte(sshConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	// Create the client store now: Nix 2.8 races when two first builds
	// create it at once ("creating symlink … File exists").
	initStore := exec.Command("nix-store", "--store", "local?root="+e.ClientStore, "--init")
	initStore.Env = e.ClientEnv("22")
	if out, err := initStore.CombinedOutput(); err != nil {
		t.Fatalf("nix-store --init: %v: %s", err, out)
	}
	e.TrackStateDir(e.StateDir)
	return e
}

// Check reports the first program the harness needs that is missing.
func Check() error {
	for _, p := range []string{"nix-build", "nix-daemon", "nix-store", "ssh", "ssh-keygen", "ssh-keyscan"} {
		if _, err := exec.LookPath(p); err != nil {
			return fmt.Errorf("nixbuilder: %s not found (Debian: apt-get install nix-bin openssh-client openssh-server): %w", p, err)
		}
	}
	if _, err := exec.LookPath("sshd"); err != nil {
		if _, err := os.Stat("/usr/sbin/sshd"); err != nil {
			return errors.New("nixbuilder: sshd not found (Debian: apt-get install openssh-server)")
		}
	}
	return nil
}

// The host route launch-builder.sh adds so that addresses of terminated
// builders are unreachable rather than routed off the machine; the lock
// under which launch adds it and creates veth pairs; and the lock every live
// Env holds shared, so the last one to end (in any process) removes the
// route.
const (
	builderNet     = "100.64.0.0/16"
	netLockFile    = "/run/lock/nba-nixbuilder-net.lock"
	usersLockFile  = "/run/lock/nba-nixbuilder-users.lock"
	lockWaitBudget = 2 * time.Minute // a hang guard: holders keep these locks briefly
)

// holdRouteUser takes the users lock shared, or returns nil (not root, or
// no /run/lock).
func holdRouteUser() *os.File {
	if os.Geteuid() != 0 {
		return nil
	}
	f, err := os.OpenFile(usersLockFile, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil
	}
	if flockWait(f, syscall.LOCK_SH) != nil {
		f.Close()
		return nil
	}
	return f
}

// releaseRoute drops this Env's share of the users lock, and if no other
// Env is alive and no builder's veth (nbabN) exists, removes the host route
// `unreachable 100.64.0.0/16` that launch-builder.sh added.
func releaseRoute(user *os.File) error {
	if user == nil {
		return nil
	}
	user.Close()
	f, err := os.OpenFile(usersLockFile, os.O_RDWR, 0)
	if err != nil {
		return nil
	}
	defer f.Close()
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		return nil // another Env is alive; the last one cleans up
	}
	net, err := os.OpenFile(netLockFile, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil // no launch ever took the lock: no route
	}
	if err != nil {
		return err
	}
	defer net.Close()
	if err := flockWait(net, syscall.LOCK_EX); err != nil {
		return err
	}
	if m, _ := filepath.Glob("/sys/class/net/nbab[0-9]*"); len(m) > 0 {
		return nil
	}
	out, err := exec.Command("ip", "route", "show", "exact", builderNet).Output()
	if err != nil || !strings.HasPrefix(strings.TrimSpace(string(out)), "unreachable") {
		return nil
	}
	if out, err := exec.Command("ip", "route", "del", "unreachable", builderNet).CombinedOutput(); err != nil {
		return fmt.Errorf("ip route del unreachable %s: %v: %s", builderNet, err, out)
	}
	return nil
}

// flockWait takes a lock on f, waiting a bounded time.
func flockWait(f *os.File, how int) error {
	deadline := time.Now().Add(lockWaitBudget)
	for syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB) != nil {
		if time.Now().After(deadline) {
			return fmt.Errorf("cannot lock %s", f.Name())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// LaunchCommand is a launch_command template for the daemon's local
// provider: it starts a builder in <StateDir>/nixbuilder/<InstanceID> of the
// daemon and prints its address.
func (e *Env) LaunchCommand() string {
	return shellQuote(e.LaunchScript) + " {{quote .InstanceID}} {{quote .StateDir}} " +
		shellQuote(e.HostKey) + " " + shellQuote(e.AuthorizedKeys)
}

// TerminateCommand is the matching terminate_command template.
func (e *Env) TerminateCommand() string {
	return shellQuote(e.TerminateScript) + " {{quote .InstanceID}} {{quote .StateDir}}"
}

// BuilderEnv is the environment with which the scripts find the shared keys
// when the command line does not name them (see the script's header).
func (e *Env) BuilderEnv() []string {
	return []string{
		"NBA_BUILDER_HOST_KEY=" + e.HostKey,
		"NBA_BUILDER_AUTHORIZED_KEYS=" + e.AuthorizedKeys,
	}
}

// TrackStateDir makes the end of the test terminate every builder found
// under dir/nixbuilder, such as those a daemon with state_dir = dir
// launched and did not terminate. Call it before starting the daemon, so
// the daemon is stopped first.
func (e *Env) TrackStateDir(dir string) {
	e.mu.Lock()
	seen := e.dirs[dir]
	e.dirs[dir] = true
	e.mu.Unlock()
	if seen {
		return
	}
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := e.TerminateAll(ctx, dir); err != nil {
			e.t.Error(err)
		}
	})
}

// TerminateAll terminates every builder under stateDir/nixbuilder.
func (e *Env) TerminateAll(ctx context.Context, stateDir string) error {
	entries, err := os.ReadDir(filepath.Join(stateDir, "nixbuilder"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, ent := range entries {
		if ent.IsDir() {
			if _, err := e.runScript(ctx, nil, e.TerminateScript, ent.Name(), stateDir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Builder is what launch-builder.sh recorded about a builder.
type Builder struct {
	ID        string
	StateDir  string
	Dir       string // StateDir/nixbuilder/ID
	Address   string // host:port, as printed
	Mode      string // "netns" or "loopback"
	SSHDPID   int    // the sshd listener
	HolderPID int    // the process holding the network namespace (netns only)
	NetNS     string // the namespace, as /proc/<pid>/ns/net reads ("net:[…]")
	Veth      string // the host end of the veth pair (netns only)
	VethIndex int    // its interface index
}

// Launch runs launch-builder.sh for a builder id under e.StateDir, with env
// added to the environment (such as "NBA_BUILDER_NETNS=0"). The builder is
// terminated when the test ends.
func (e *Env) Launch(ctx context.Context, id string, env ...string) (*Builder, error) {
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := e.Terminate(ctx, id); err != nil {
			e.t.Error(err)
		}
	})
	out, err := e.runScript(ctx, env, e.LaunchScript, id, e.StateDir, e.HostKey, e.AuthorizedKeys)
	if err != nil {
		return nil, err
	}
	addr := lastLine(out)
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("nixbuilder: launch %s printed %q last, not host:port", id, addr)
	}
	b, err := ReadBuilder(e.StateDir, id)
	if err != nil {
		return nil, err
	}
	if b.Address != addr {
		return nil, fmt.Errorf("nixbuilder: launch %s printed %s but recorded %s", id, addr, b.Address)
	}
	return b, nil
}

// Terminate runs terminate-builder.sh for a builder under e.StateDir.
func (e *Env) Terminate(ctx context.Context, id string) error {
	_, err := e.runScript(ctx, nil, e.TerminateScript, id, e.StateDir)
	return err
}

// ReadBuilder reads what launch-builder.sh recorded in
// stateDir/nixbuilder/id/builder.env.
func ReadBuilder(stateDir, id string) (*Builder, error) {
	dir := filepath.Join(stateDir, "nixbuilder", id)
	f, err := os.Open(filepath.Join(dir, "builder.env"))
	if err != nil {
		return nil, fmt.Errorf("nixbuilder: %w", err)
	}
	defer f.Close()
	b := &Builder{ID: id, StateDir: stateDir, Dir: dir}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		switch k {
		case "address":
			b.Address = v
		case "mode":
			b.Mode = v
		case "sshd_pid":
			b.SSHDPID, _ = strconv.Atoi(v)
		case "holder_pid":
			b.HolderPID, _ = strconv.Atoi(v)
		case "netns":
			b.NetNS = v
		case "veth":
			b.Veth = v
		case "veth_ifindex":
			b.VethIndex, _ = strconv.Atoi(v)
		}
	}
	return b, sc.Err()
}

// HasPath reports whether the builder's own store holds a store path
// (/nix/store/…): proof that it built or received it.
func (b *Builder) HasPath(storePath string) bool {
	_, err := os.Lstat(filepath.Join(b.Dir, "root", storePath))
	return err == nil
}

// runScript runs a script in its own process group, bounded by ctx, and
// returns its stdout; an error carries its stderr.
func (e *Env) runScript(ctx context.Context, env []string, script string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, script, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("nixbuilder: %s %s: %w\n%s", filepath.Base(script), strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

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

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
	_ "embed"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
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

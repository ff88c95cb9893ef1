package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"
)

// hookData is what a launch or terminate command template sees.
type hookData struct {
	Cluster    string
	Pool       string
	Slot       string
	LaunchID   string
	InstanceID string
	StateDir   string
	Address    string // terminate only: the address the launch command printed
}

func parseHook(name, text string) (*template.Template, error) {
	return template.New(name).
		Option("missingkey=error").
		Funcs(template.FuncMap{"quote": shellQuote}).
		Parse(text)
}

// shellQuote quotes s for /bin/sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func (p *Provider) hookData(r record) hookData {
	return hookData{
		Cluster:    r.Cluster,
		Pool:       r.Pool,
		Slot:       r.Slot,
		LaunchID:   r.LaunchID,
		InstanceID: r.ID,
		StateDir:   p.stateDir,
		Address:    r.Address,
	}
}

// launchHook runs the pool's launch command for r and records the address
// it printed. On failure r is recorded as terminated.
func (p *Provider) launchHook(ctx context.Context, r *record, pl pool) error {
	out, err := p.runHook(ctx, "launch", r.Pool, pl.launch, p.hookData(*r), func(pid int) {
		p.mu.Lock()
		defer p.mu.Unlock()
		r.HookPID = pid
		if err := p.writeRecord(*r); err != nil {
			p.log.Warn("local provider: cannot record launch command pid", "instance", r.ID, "err", err)
		}
	})
	r.HookPID = 0
	if err == nil {
		r.Address, err = hookAddress(r.Pool, pl.LaunchCommand, out)
	}
	if err != nil {
		p.failLaunch(r, err)
		return err
	}
	p.mu.Lock()
	err = p.writeRecord(*r)
	p.mu.Unlock()
	if err != nil {
		// The builder exists but no record says where: undo it.
		p.failLaunch(r, err)
		if _, terr := p.runHook(context.Background(), "terminate", r.Pool, pl.terminate, p.hookData(*r), nil); terr != nil {
			p.log.Error("local provider: cannot undo launch", "instance", r.ID, "err", terr)
		}
		return fmt.Errorf("local provider: write record: %w", err)
	}
	return nil
}

// hookAddress takes the builder's address from the last non-empty line of a
// launch command's output.
func hookAddress(poolName, command, stdout string) (string, error) {
	line := lastLines(stdout, 1)
	if line == "" {
		return "", fmt.Errorf("local provider: launch command of pool %q (%s) printed nothing; its last line must be the builder's address host:port",
			poolName, shorten(command))
	}
	addr := strings.TrimSpace(line)
	host, port, err := net.SplitHostPort(addr)
	if err == nil {
		if n, perr := strconv.Atoi(port); host == "" || perr != nil || n < 1 || n > 65535 {
			err = errors.New("want a host and a numeric port")
		}
	}
	if err != nil {
		return "", fmt.Errorf("local provider: launch command of pool %q (%s) printed %q as its last line; want the builder's address host:port: %w",
			poolName, shorten(command), line, err)
	}
	return addr, nil
}

// runHook renders tmpl and runs it with /bin/sh -c, bounded by ctx and
// hookTimeout, and returns its standard output. started, if set, learns the
// command's pid (its process group) once it runs.
func (p *Provider) runHook(ctx context.Context, what, poolName string, tmpl *template.Template, data hookData, started func(pid int)) (string, error) {
	var script bytes.Buffer
	if err := tmpl.Execute(&script, data); err != nil {
		return "", fmt.Errorf("local provider: %s command of pool %q: %w", what, poolName, err)
	}
	runCtx, cancel := context.WithTimeout(ctx, hookTimeout)
	defer cancel()
	cmd := exec.CommandContext(runCtx, "/bin/sh", "-c", script.String())
	cmd.Env = append(os.Environ(), p.builderEnv...)
	cmd.Env = append(cmd.Env,
		"NBA_CLUSTER="+data.Cluster,
		"NBA_POOL="+data.Pool,
		"NBA_SLOT="+data.Slot,
		"NBA_LAUNCH_ID="+data.LaunchID,
		"NBA_INSTANCE_ID="+data.InstanceID,
		"NBA_STATE_DIR="+data.StateDir,
		"NBA_ADDRESS="+data.Address,
	)
	// Its own process group, like a stand-in: what the command leaves
	// running in the background is not in the daemon's group. On timeout the
	// whole group is killed, so a half-done launch leaves nothing behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// A background process that keeps stdout or stderr open must not hold
	// the command up once the shell has exited.
	cmd.WaitDelay = time.Second
	stdout := &tailBuffer{max: 64 << 10}
	stderr := &tailBuffer{max: 64 << 10}
	cmd.Stdout = stdout
	cmd.Stderr = stderr

	err := cmd.Start()
	if err == nil {
		if started != nil {
			started(cmd.Process.Pid)
		}
		err = cmd.Wait()
	}
	if errors.Is(err, exec.ErrWaitDelay) {
		p.log.Warn("local provider: hook command left a process holding its output open; redirect the output of what it starts in the background",
			"pool", poolName, "command", what)
		err = nil
	}
	if err == nil {
		return stdout.String(), nil
	}
	if runCtx.Err() != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		} else {
			err = fmt.Errorf("timed out after %s (%w)", hookTimeout, err)
		}
	}
	var stderrTail string
	if tail := lastLines(stderr.String(), 20); tail != "" {
		stderrTail = "; stderr:\n" + tail
	}
	return "", fmt.Errorf("local provider: %s command of pool %q (%s) failed: %w%s",
		what, poolName, shorten(script.String()), err, stderrTail)
}

// shorten cuts a command for an error message.
func shorten(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	const max = 120
	if len(s) > max {
		s = s[:max] + "…"
	}
	return strconv.Quote(s)
}

// tailBuffer is an io.Writer that keeps the last max bytes written.
type tailBuffer struct {
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string { return string(b.buf) }

// killHookGroup kills the process group of an interrupted launch command,
// if that pid still runs a shell (the group id is not trusted blindly).
func killHookGroup(pid int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.HasPrefix(string(b), "/bin/sh\x00") {
		return
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
}

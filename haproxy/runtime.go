package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultTimeout bounds one runtime-API exchange when NewClient is given none.
const DefaultTimeout = 5 * time.Second

// maxAnswer caps what one command may answer (a `show stat` line is about
// 700 bytes; this is room for tens of thousands of servers).
const maxAnswer = 32 << 20

// ErrUnreachable is wrapped by every error that means the daemon could not
// talk to HAProxy at all: the socket is missing, refused, not permitted, the
// exchange timed out or broke. Callers treat HAProxy's view as unknown.
var ErrUnreachable = errors.New("haproxy runtime API unreachable")

// ErrNotFound is matched (errors.Is) by a CommandError whose answer says the
// backend or server does not exist ("No such backend.", "No such server.",
// "Can't find backend."): HAProxy's configuration lacks the pool or slot.
var ErrNotFound = errors.New("no such backend or server in HAProxy")

// CommandError is HAProxy refusing a command: it answered, with an error
// text, which the error quotes.
type CommandError struct {
	Command string
	Answer  string // HAProxy's answer, as received
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("haproxy refused %q: %q", e.Command, clipAnswer(strings.TrimSpace(e.Answer)))
}

// Is makes errors.Is(err, ErrNotFound) true for "no such backend/server".
func (e *CommandError) Is(target error) bool {
	return target == ErrNotFound && isNotFoundAnswer(e.Answer)
}

func isNotFoundAnswer(a string) bool {
	a = strings.ToLower(a)
	return strings.Contains(a, "no such backend") || strings.Contains(a, "no such server") ||
		strings.Contains(a, "can't find backend") || strings.Contains(a, "can't find server")
}

// Client talks to HAProxy's runtime API (the `stats socket` of haproxy.cfg,
// at level admin for SetServerAddr).
//
// Every call dials the socket, sends one command and reads the answer until
// HAProxy closes the connection (its non-interactive mode). One connection
// per command keeps the protocol trivial: there is no prompt to parse and no
// shared connection that a timed-out or cancelled command could leave
// holding half an answer for the next caller; HAProxy also closes idle CLI
// sessions after `stats timeout`, so a kept connection would need redialing
// anyway. The daemon sends a handful of commands per reconcile round, and a
// unix-socket dial costs microseconds. A Client is safe for concurrent use.
type Client struct {
	socket  string
	timeout time.Duration
	// answers holds, per command (its first two words), the size of the
	// largest answer read so far: reading into a buffer of that size at
	// once, rather than one grown by doubling, halves the garbage of each
	// round's show stat.
	answers sync.Map // string → *atomic.Int64
}

// NewClient returns a client for the runtime socket at path socket. Each
// call is bounded by its ctx and by timeout (<= 0 means DefaultTimeout).
func NewClient(socket string, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{socket: socket, timeout: timeout}
}

// Socket is the path of the runtime socket.
func (c *Client) Socket() string { return c.socket }

// Exec sends one command line and returns HAProxy's answer as is. HAProxy
// answers errors as text too, so Exec fails only when the exchange itself
// fails (every such error wraps ErrUnreachable, except the caller's own
// cancellation, which wraps context.Canceled). The command must be one line;
// note that HAProxy's CLI runs ';'-separated commands one after another.
func (c *Client) Exec(ctx context.Context, cmd string) (string, error) {
	if cmd == "" || strings.ContainsAny(cmd, "\r\n\x00") {
		return "", fmt.Errorf("haproxy runtime command %q: must be one non-empty line", cmd)
	}
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("haproxy %q: %w", cmd, err)
	}
	cctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(cctx, "unix", c.socket)
	if err != nil {
		if ctx.Err() == context.Canceled {
			return "", fmt.Errorf("haproxy %q: %w", cmd, ctx.Err())
		}
		if isTimeoutErr(err) || cctx.Err() != nil {
			return "", c.timeoutError(cmd, "connecting", err)
		}
		return "", c.dialError(err)
	}
	defer conn.Close()
	if dl, ok := cctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	// Cancelling ctx interrupts a blocked read or write at once.
	stop := context.AfterFunc(cctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := io.WriteString(conn, cmd+"\n"); err != nil {
		return "", c.ioError(ctx, cctx, cmd, "sending", err)
	}
	size := c.answerSize(cmd)
	buf := bytes.NewBuffer(make([]byte, 0, size.Load()+bytes.MinRead))
	_, err = buf.ReadFrom(io.LimitReader(conn, maxAnswer+1))
	b := buf.Bytes()
	if n := int64(len(b)); n > size.Load() && n <= maxAnswer {
		size.Store(n)
	}
	if err != nil {
		return "", c.ioError(ctx, cctx, cmd, "reading the answer", err)
	}
	if len(b) > maxAnswer {
		return "", fmt.Errorf("haproxy %q: answer longer than %d bytes", cmd, maxAnswer)
	}
	return string(b), nil
}

// answerSize is the largest answer seen for cmd's kind (its first two
// words, e.g. "show stat").
func (c *Client) answerSize(cmd string) *atomic.Int64 {
	f := strings.Fields(cmd)
	key := strings.Join(f[:min(2, len(f))], " ")
	if v, ok := c.answers.Load(key); ok {
		return v.(*atomic.Int64)
	}
	v, _ := c.answers.LoadOrStore(key, new(atomic.Int64))
	return v.(*atomic.Int64)
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

func (c *Client) timeoutError(cmd, doing string, err error) error {
	return fmt.Errorf("haproxy runtime socket %s: timed out %s (command %q; limit %s or the caller's deadline): %w: %w",
		c.socket, doing, cmd, c.timeout, ErrUnreachable, err)
}

func (c *Client) ioError(parent, cctx context.Context, cmd, doing string, err error) error {
	if parent.Err() == context.Canceled {
		return fmt.Errorf("haproxy %q: %w", cmd, parent.Err())
	}
	if cctx.Err() != nil || isTimeoutErr(err) {
		return c.timeoutError(cmd, doing, err)
	}
	return fmt.Errorf("haproxy runtime socket %s: connection broke while %s (command %q): %w: %w",
		c.socket, doing, cmd, ErrUnreachable, err)
}

// dialError explains a failed connect, looking up who may use the socket
// when permission was denied.
func (c *Client) dialError(err error) error {
	var p permInfo
	if errors.Is(err, fs.ErrPermission) {
		p = lookupPerm(c.socket)
	}
	return classifyDialError(c.socket, err, p)
}

// permInfo says who the daemon runs as and who owns the socket, for the
// permission-denied message. Fields may be empty when unknown.
type permInfo struct {
	User   string // the daemon's user, e.g. "nix-builder-autoscaler (uid 990)"
	Owner  string // the socket's owner user
	Group  string // the socket's group
	Mode   string // the socket's permission bits, e.g. "0600"
	Detail string // why the socket could not be examined, if it could not
}

func lookupPerm(socket string) permInfo {
	var p permInfo
	uid := os.Getuid()
	p.User = "uid " + strconv.Itoa(uid)
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		p.User = fmt.Sprintf("%s (uid %d)", u.Username, uid)
	}
	fi, err := os.Stat(socket)
	if err != nil {
		p.Detail = err.Error()
		return p
	}
	p.Mode = fmt.Sprintf("%04o", fi.Mode().Perm())
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		p.Owner = strconv.FormatUint(uint64(st.Uid), 10)
		if u, err := user.LookupId(p.Owner); err == nil {
			p.Owner = u.Username
		}
		p.Group = strconv.FormatUint(uint64(st.Gid), 10)
		if g, err := user.LookupGroupId(p.Group); err == nil {
			p.Group = g.Name
		}
	}
	return p
}

// classifyDialError turns a failed connect to the runtime socket into an
// error an operator can act on. Every result wraps ErrUnreachable and err.
func classifyDialError(socket string, err error, p permInfo) error {
	switch {
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("haproxy runtime socket %s does not exist: HAProxy is not running, or haproxy.runtime_socket does not match the `stats socket` line of haproxy.cfg: %w: %w",
			socket, ErrUnreachable, err)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("nothing answers on haproxy runtime socket %s (connection refused): HAProxy is not running (stale socket file), or haproxy.runtime_socket is not HAProxy's `stats socket`: %w: %w",
			socket, ErrUnreachable, err)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		who := p.User
		if who == "" {
			who = "the daemon's user"
		}
		var sock string
		switch {
		case p.Mode != "":
			sock = fmt.Sprintf(" (owner %s, group %s, mode %s)", orUnknown(p.Owner), orUnknown(p.Group), p.Mode)
		case p.Detail != "":
			sock = " (" + p.Detail + ")"
		}
		group := "<a group of that user>"
		if p.Group != "" && p.Group != "0" && p.Group != "root" {
			group = p.Group
		}
		return fmt.Errorf("permission denied on haproxy runtime socket %s%s: the daemon runs as %s, which needs read and write access to the socket and search access to its directory; "+
			"add that user to the socket's group and make HAProxy's `stats socket` line give the group access (`mode 660 group %s level admin`): %w: %w",
			socket, sock, who, group, ErrUnreachable, err)
	case errors.Is(err, syscall.EINVAL) && len(socket) > maxSocketPath:
		return fmt.Errorf("haproxy runtime socket path %s is %d bytes long, more than the %d a unix socket path may have: move the socket (haproxy.runtime_socket and `stats socket`): %w: %w",
			socket, len(socket), maxSocketPath, ErrUnreachable, err)
	default:
		return fmt.Errorf("cannot connect to haproxy runtime socket %s: %w: %w", socket, ErrUnreachable, err)
	}
}

// maxSocketPath is the longest unix socket path Linux accepts (sun_path is
// 108 bytes with the terminating NUL).
const maxSocketPath = 107

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// isProxyName reports whether s can be a HAProxy proxy or server name (and so
// cannot smuggle another word or command into a CLI line).
func isProxyName(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.', r == ':':
		default:
			return false
		}
	}
	return true
}

// parseLiteralIP parses a literal IPv4 or IPv6 address (no zone, no hostname).
func parseLiteralIP(s string) (netip.Addr, error) {
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	if ip.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("ParseAddr(%q): IPv6 zones are not supported by HAProxy's set server addr", s)
	}
	return ip, nil
}

// SetServerAddr points a server at ip:port with
// `set server <backend>/<server> addr <ip> port <port>`. ip must be a literal
// IP address: HAProxy does not resolve names here. HAProxy answers text both
// on success and on error; an error answer ("No such server.", "No such
// backend.", "Require 'backend/server'.", "Invalid addr ...", "Permission
// denied", ...) becomes a *CommandError quoting it. Answers that name no
// error count as success: the caller verifies the address in `show stat`
// anyway.
//
// Ports outside 1..65535 are refused here: HAProxy 2.6.12 silently takes
// 99999 modulo 65536 and accepts port 0.
func (c *Client) SetServerAddr(ctx context.Context, backend, server, ip string, port int) error {
	if !isProxyName(backend) || !isProxyName(server) {
		return fmt.Errorf("set server addr: invalid backend/server name %q/%q", backend, server)
	}
	addr, err := parseLiteralIP(ip)
	if err != nil {
		return fmt.Errorf("set server %s/%s addr: %q is not an IP address (HAProxy servers are bound by IP; names are not resolved): %w", backend, server, ip, err)
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("set server %s/%s addr: port %d is outside 1..65535", backend, server, port)
	}
	cmd := fmt.Sprintf("set server %s/%s addr %s port %d", backend, server, addr, port)
	out, err := c.Exec(ctx, cmd)
	if err != nil {
		return err
	}
	return checkSetAddrAnswer(cmd, out)
}

// setAddrErrors are (lower-case) fragments of HAProxy's error answers to
// `set server ... addr`, measured on 2.6.12 and read from the management
// guide: "No such server.", "No such backend.", "Require 'backend/server'.",
// "Invalid addr 'x' by ...", "no need to change the addr, problem converting
// port 'x' to an int", "can't change <port> to port map because ...",
// "set server <b>/<s> addr requires an address ...", "Permission denied",
// "Unknown command ...". Success reads "IP changed from 'a' to 'b', port
// changed from 'p' to 'q' by 'stats socket command'" or "no need to change
// the addr, no need to change the port by ...".
var setAddrErrors = []string{
	"no such", "can't find", "require", "invalid", "problem", "can't", "cannot", "unknown command",
	"permission denied", "not allowed", "not supported", "doesn't support", "unsupported",
	"incompatible", "failed", "error", "usage", "unknown", "missing",
}

func checkSetAddrAnswer(cmd, out string) error {
	lower := strings.ToLower(out)
	for _, frag := range setAddrErrors {
		if strings.Contains(lower, frag) {
			return &CommandError{Command: cmd, Answer: out}
		}
	}
	return nil
}

// SetServerState runs `set server <backend>/<server> state <state>` with
// state ready, drain or maint. HAProxy answers nothing on success; any
// answer is an error (*CommandError), e.g. "No such server.".
func (c *Client) SetServerState(ctx context.Context, backend, server, state string) error {
	if !isProxyName(backend) || !isProxyName(server) {
		return fmt.Errorf("set server state: invalid backend/server name %q/%q", backend, server)
	}
	switch state {
	case "ready", "drain", "maint":
	default:
		return fmt.Errorf("set server %s/%s state: %q is not ready, drain or maint", backend, server, state)
	}
	cmd := fmt.Sprintf("set server %s/%s state %s", backend, server, state)
	out, err := c.Exec(ctx, cmd)
	if err != nil {
		return err
	}
	if strings.TrimSpace(out) != "" {
		return &CommandError{Command: cmd, Answer: out}
	}
	return nil
}

// ShowStat runs `show stat` and parses it (see ParseStat).
func (c *Client) ShowStat(ctx context.Context) ([]Stat, error) {
	return c.showStat(ctx, "show stat")
}

func (c *Client) showStat(ctx context.Context, cmd string) ([]Stat, error) {
	out, err := c.Exec(ctx, cmd)
	if err != nil {
		return nil, err
	}
	stats, err := ParseStat(out)
	if errors.Is(err, errNoHeader) {
		return nil, &CommandError{Command: cmd, Answer: out}
	}
	return stats, err
}

// ShowServersState runs `show servers state [<backend>]` ("" for every
// backend) and parses it (see ParseServersState).
func (c *Client) ShowServersState(ctx context.Context, backend string) ([]ServerState, error) {
	cmd := "show servers state"
	if backend != "" {
		if !isProxyName(backend) {
			return nil, fmt.Errorf("show servers state: invalid backend name %q", backend)
		}
		cmd += " " + backend
	}
	out, err := c.Exec(ctx, cmd)
	if err != nil {
		return nil, err
	}
	states, err := ParseServersState(out)
	if errors.Is(err, errNoHeader) {
		return nil, &CommandError{Command: cmd, Answer: out}
	}
	return states, err
}

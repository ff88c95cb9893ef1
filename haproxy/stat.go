package haproxy

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
)

// Stat is one line of `show stat`: a frontend, backend or server of a proxy.
// Fields are kept by their header name, because HAProxy adds columns between
// versions (2.6.12 prints 100+ of them); a column the running HAProxy does
// not print reads as "". The lines of one answer share the index of its
// header (a map per line of 100+ columns made a reconcile round's parse
// cost most of its time, on 256 servers).
type Stat struct {
	index map[string]int // header name → column, shared by the answer's lines
	// Either the line's fields (read as CSV), or the line and where each
	// of its fields ends (split at commas): offsets hold no pointers, so
	// hundreds of lines of 100+ columns give the collector nothing to scan.
	vals []string
	line string
	ends []int32
}

// field returns the named column and whether the line has it.
func (s Stat) field(name string) (string, bool) {
	i, ok := s.index[name]
	if !ok {
		return "", false
	}
	if s.ends == nil {
		if i >= len(s.vals) {
			return "", false
		}
		return s.vals[i], true
	}
	if i >= len(s.ends) {
		return "", false
	}
	start := 0
	if i > 0 {
		start = int(s.ends[i-1]) + 1
	}
	return s.line[start:s.ends[i]], true
}

// fields returns every field of the line.
func (s Stat) fields() []string {
	if s.ends == nil {
		return s.vals
	}
	out := make([]string, len(s.ends))
	start := 0
	for i, e := range s.ends {
		out[i] = s.line[start:e]
		start = int(e) + 1
	}
	return out
}

// Str returns the named column ("" when absent or empty).
func (s Stat) Str(name string) string { v, _ := s.field(name); return v }

// Has reports whether the running HAProxy printed the named column.
func (s Stat) Has(name string) bool {
	_, ok := s.field(name)
	return ok
}

// Int returns the named column as an integer; empty, absent or non-numeric
// columns read as 0 (HAProxy leaves counters empty where they do not apply).
func (s Stat) Int(name string) int64 {
	n, err := strconv.ParseInt(strings.TrimSpace(s.Str(name)), 10, 64)
	if err != nil {
		return 0
	}
	return n
}

// Proxy is the frontend or backend name (pxname).
func (s Stat) Proxy() string { return s.Str("pxname") }

// Server is the server name (svname), or FRONTEND / BACKEND for the proxy's
// own lines.
func (s Stat) Server() string { return s.Str("svname") }

// Status is HAProxy's status text: "UP", "UP 1/3", "DOWN", "DOWN 1/2",
// "DOWN (agent)", "DRAIN", "DRAIN (agent)", "NOLB", "MAINT",
// "MAINT (resolution)", "MAINT (via be/srv)", "no check", "OPEN", ...
func (s Stat) Status() string { return s.Str("status") }

// IsServer reports whether the line is a server (not a FRONTEND, BACKEND or
// listener line).
func (s Stat) IsServer() bool {
	if t, ok := s.field("type"); ok && t != "" {
		return t == "2" // 0 frontend, 1 backend, 2 server, 3 listener
	}
	sv := s.Server()
	return sv != "" && sv != "FRONTEND" && sv != "BACKEND"
}

// Addr returns the address the server points at now, as "ip:port" ("[ip]:port"
// for IPv6), from the `addr` column, which HAProxy 2.6.12 prints and updates on
// `set server addr`. It is "" for a server without an address (init-addr none:
// "MAINT (resolution)") and for a HAProxy without the column.
func (s Stat) Addr() string { return canonicalAddr(s.Str("addr")) }

// canonicalAddr writes an "ip:port" address the way Go does (netip), so it
// compares equal to addresses formatted with net.JoinHostPort; anything else
// is returned unchanged.
func canonicalAddr(a string) string {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return a
	}
	ip, err := parseLiteralIP(host)
	if err != nil {
		return a
	}
	return net.JoinHostPort(ip.String(), port)
}

// errNoHeader marks an answer that is not the expected table at all,
// typically an error text from HAProxy.
var errNoHeader = errors.New("no header line")

// ParseStat parses the CSV answer of `show stat`: a header line
// "# pxname,svname,..." and one line per proxy and server. Columns are looked
// up by the header's names, so extra, missing or reordered columns are fine.
// A line shorter than the header leaves the missing columns absent; extra
// values without a header name are ignored. An answer without the header
// (an error text such as "Permission denied" or "Unknown command") is an
// error quoting it.
func ParseStat(out string) ([]Stat, error) {
	header, body, err := splitHeader(out, "show stat", 0)
	if err != nil {
		return nil, err
	}
	names, err := readCSVLine(header)
	if err != nil {
		return nil, fmt.Errorf("show stat: header: %w", err)
	}
	for i := range names {
		names[i] = strings.TrimSpace(names[i])
	}
	if !statHasColumn(names, "pxname") || !statHasColumn(names, "svname") {
		return nil, fmt.Errorf("show stat: header has no pxname/svname column: %q", clipAnswer(header))
	}
	index := make(map[string]int, len(names))
	for i, n := range names {
		if _, dup := index[n]; n != "" && n != "-" && !dup {
			index[n] = i
		}
	}
	if !strings.ContainsAny(body, "\"\r") {
		return splitStat(body, names, index), nil
	}
	return csvStat(body, names, index)
}

// csvStat is ParseStat's body read as CSV, with quotes.
func csvStat(body string, names []string, index map[string]int) ([]Stat, error) {
	r := csv.NewReader(strings.NewReader(body))
	r.FieldsPerRecord = -1
	r.LazyQuotes = true
	r.ReuseRecord = true
	var stats []Stat
	// Each line's fields are substrings of one string csv makes for the
	// line; copying the slice headers into one array for the whole answer
	// keeps the per-line garbage at that string.
	var all []string
	for {
		rec, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("show stat: %w", err)
		}
		if len(rec) == 1 && strings.TrimSpace(rec[0]) == "" {
			continue
		}
		n := min(len(rec), len(names))
		start := len(all)
		all = append(all, rec[:n]...)
		stats = append(stats, Stat{index: index, vals: all[start : start+n : start+n]})
	}
	return stats, nil
}

// splitStat is ParseStat's body without quotes or carriage returns, which
// is what HAProxy prints unless a description holds a comma: each line is
// kept as a substring of body with the offsets of its commas, so nothing is
// copied. The reconciler reads show stat every round, and with hundreds of
// servers encoding/csv, and the garbage of its field strings, was a large
// part of a round's CPU.
func splitStat(body string, names []string, index map[string]int) []Stat {
	var stats []Stat
	ends := make([]int32, 0, strings.Count(body, ",")+strings.Count(body, "\n")+1)
	for line := range strings.SplitSeq(body, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		start, pos := len(ends), 0
		for len(ends)-start < len(names) {
			j := strings.IndexByte(line[pos:], ',')
			if j < 0 {
				ends = append(ends, int32(len(line)))
				break
			}
			ends = append(ends, int32(pos+j))
			pos += j + 1
		}
		stats = append(stats, Stat{index: index, line: line, ends: ends[start:len(ends):len(ends)]})
	}
	return stats
}

func readCSVLine(line string) ([]string, error) {
	r := csv.NewReader(strings.NewReader(line))
	r.FieldsPerRecord = -1
	r.LazyQuotes = true
	rec, err := r.Read()
	if err == io.EOF {
		return nil, errors.New("empty")
	}
	return rec, err
}

// splitHeader finds the "# ..." header line, after at most skip leading
// lines (the servers-state format version), and returns it without "#" and
// the text after it.
func splitHeader(out, what string, skip int) (header, body string, err error) {
	rest := out
	for range skip + 1 {
		line, after, found := strings.Cut(rest, "\n")
		if h, ok := strings.CutPrefix(strings.TrimSpace(line), "#"); ok {
			return strings.TrimSpace(h), after, nil
		}
		if !found {
			break
		}
		rest = after
	}
	return "", "", fmt.Errorf("unexpected answer to %s: %q: %w", what, clipAnswer(answerHead(out)), errNoHeader)
}

// ServerState is one server line of `show servers state`. Like Stat, fields
// are kept by header name; the common ones have accessors.
type ServerState struct {
	fields map[string]string
}

// Str returns the named column ("" when absent).
func (s ServerState) Str(name string) string { return s.fields[name] }

// Int returns the named column as an integer (0 when absent or not a number).
func (s ServerState) Int(name string) int64 {
	n, err := strconv.ParseInt(s.fields[name], 10, 64)
	if err != nil {
		return 0
	}
	return n
}

// Backend is the server's backend (be_name).
func (s ServerState) Backend() string { return s.fields["be_name"] }

// Server is the server's name (srv_name).
func (s ServerState) Server() string { return s.fields["srv_name"] }

// Addr returns "ip:port" from srv_addr and srv_port, or "" when the server
// has no address (srv_addr "-").
func (s ServerState) Addr() string {
	ip := s.fields["srv_addr"]
	if ip == "" || ip == "-" {
		return ""
	}
	return canonicalAddr(net.JoinHostPort(ip, s.fields["srv_port"]))
}

// OpState is srv_op_state: 0 stopped, 1 starting, 2 running, 3 stopping.
func (s ServerState) OpState() int { return int(s.Int("srv_op_state")) }

// AdminState is srv_admin_state, a bit field (HAProxy 2.6): 0x01 forced
// maintenance (CLI, agent or `disabled`), 0x02 inherited maintenance, 0x04
// declared `disabled` (kept after the server left maintenance), 0x08 forced
// drain, 0x10 inherited drain, 0x20 maintenance for want of an address
// (resolution), 0x40 FQDN set over the CLI. In maintenance: any of 0x23.
func (s ServerState) AdminState() int { return int(s.Int("srv_admin_state")) }

// ParseServersState parses the answer of `show servers state [<backend>]`:
// a format version line ("1"), a header "# be_id be_name srv_id ..." and one
// space-separated line per server. Columns are looked up by the header's
// names. Lines with fewer values than the header keep only those they have.
// An answer without the header (such as "Can't find backend.") is an error
// quoting it.
func ParseServersState(out string) ([]ServerState, error) {
	version, _, _ := strings.Cut(out, "\n")
	version = strings.TrimSpace(version)
	if _, err := strconv.Atoi(version); err != nil {
		return nil, fmt.Errorf("unexpected answer to show servers state: %q: %w", clipAnswer(answerHead(out)), errNoHeader)
	}
	header, body, err := splitHeader(out, "show servers state", 1)
	if err != nil {
		return nil, err
	}
	names := strings.Fields(header)
	if !statHasColumn(names, "be_name") || !statHasColumn(names, "srv_name") {
		return nil, fmt.Errorf("show servers state: header has no be_name/srv_name column: %q", clipAnswer(header))
	}
	var states []ServerState
	for line := range strings.SplitSeq(body, "\n") {
		vals := strings.Fields(line)
		if len(vals) == 0 || strings.HasPrefix(vals[0], "#") {
			continue
		}
		f := make(map[string]string, len(names))
		for i, v := range vals {
			if i >= len(names) {
				break
			}
			f[names[i]] = v
		}
		states = append(states, ServerState{fields: f})
	}
	return states, nil
}

func statHasColumn(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// answerHead returns the first two non-empty lines of s, for error messages.
func answerHead(s string) string {
	var out []string
	for line := range strings.SplitSeq(s, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			out = append(out, line)
			if len(out) == 2 {
				break
			}
		}
	}
	return strings.Join(out, " / ")
}

// clipAnswer shortens s for error messages.
func clipAnswer(s string) string {
	const limit = 400
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}

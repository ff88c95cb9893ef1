// Package discoverytest is a fake tailscaled for tests: it serves the
// LocalAPI's GET /localapi/v0/status on a unix socket, with a status
// document of the real shape (testdata/status.json) whose peers the test
// sets. Like tailscaled it answers 403 to a Host header other than
// local-tailscaled.sock.
//
// It does not import package discovery, so that package's own tests can use
// it; it spells out the LocalAPI's host and path itself.
package discoverytest

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Host is the Host header tailscaled accepts on its LocalAPI (besides an
// empty one).
const Host = "local-tailscaled.sock"

// StatusPath is the path of the status document.
const StatusPath = "/localapi/v0/status"

// referenceJSON is a LocalAPI status document of the real shape: a node
// "scheduler" (Self) with one tagged peer.
//
//go:embed testdata/status.json
var referenceJSON []byte

// ShortDir is a temporary directory, removed when the test ends, with a path
// short enough for a unix socket (tb.TempDir paths can pass the 108-byte
// limit).
func ShortDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "nbat")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// ReferenceDoc is testdata/status.json decoded generically, a fresh copy on
// every call, so tests can change it.
func ReferenceDoc() map[string]any {
	var doc map[string]any
	if err := json.Unmarshal(referenceJSON, &doc); err != nil {
		panic("discoverytest: testdata/status.json: " + err.Error())
	}
	return doc
}

// Peer is one entry of the status document's Peer map, decoded
// generically: tests may change any of its keys.
type Peer map[string]any

// NewPeer is the reference document's peer changed to node id with host
// name host (and the MagicDNS name made from it), Tailscale IPv4 address ip
// (none if empty) followed by an IPv6 address, and online or not. An
// offline peer has no current address and is not active, as tailscaled
// shows one.
func NewPeer(id, host, ip string, online bool) Peer {
	var tmpl map[string]any
	for _, p := range ReferenceDoc()["Peer"].(map[string]any) {
		tmpl = p.(map[string]any)
	}
	if tmpl == nil {
		panic("discoverytest: testdata/status.json has no peer")
	}
	sum := sha256.Sum256([]byte(id))
	tmpl["ID"] = id
	tmpl["PublicKey"] = "nodekey:" + hex.EncodeToString(sum[:])
	tmpl["HostName"] = host
	tmpl["DNSName"] = strings.ToLower(host) + ".tail1234.ts.net."
	ips := []any{}
	if ip != "" {
		ips = append(ips, ip)
	}
	tmpl["TailscaleIPs"] = append(ips, "fd7a:115c:a1e0::"+hex.EncodeToString(sum[:2]))
	tmpl["Online"] = online
	tmpl["Active"] = online
	if !online {
		tmpl["CurAddr"] = ""
	}
	return tmpl
}

// Status is the reference document with its peers replaced by peers
// (keyed by their PublicKey, as tailscaled keys them).
func Status(peers ...Peer) map[string]any {
	doc := ReferenceDoc()
	m := map[string]any{}
	for _, p := range peers {
		key, ok := p["PublicKey"].(string)
		if !ok {
			panic(fmt.Sprintf("discoverytest: peer %v has no PublicKey", p["ID"]))
		}
		m[key] = map[string]any(p)
	}
	doc["Peer"] = m
	return doc
}

// LocalAPI is a fake tailscaled serving its LocalAPI on a unix socket.
type LocalAPI struct {
	// Socket is the path it listens on.
	Socket string

	srv *http.Server

	mu     sync.Mutex
	doc    any    // served as JSON
	raw    []byte // served as is, when set
	code   int    // response status (200 if 0)
	delay  time.Duration
	hosts  []string
	paths  []string
	calls  int
	closed bool
}

// Start serves Status(peers...) on a socket in a new ShortDir until the
// test ends (or Stop).
func Start(tb testing.TB, peers ...Peer) *LocalAPI {
	tb.Helper()
	return StartAt(tb, ShortDir(tb)+"/tailscaled.sock", Status(peers...))
}

// StartAt serves doc (as JSON) on socket until the test ends (or Stop).
// Starting again on the socket of a stopped LocalAPI is how a test brings
// tailscaled back.
func StartAt(tb testing.TB, socket string, doc any) *LocalAPI {
	tb.Helper()
	f := &LocalAPI{Socket: socket, doc: doc}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		tb.Fatal(err)
	}
	f.srv = &http.Server{Handler: http.HandlerFunc(f.serve), ReadHeaderTimeout: 5 * time.Second}
	go f.srv.Serve(ln)
	tb.Cleanup(f.Stop)
	return f
}

// Stop closes the socket (and removes it), as when tailscaled stops. It is
// idempotent.
func (f *LocalAPI) Stop() {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.closed = true
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f.srv.Shutdown(ctx)
}

func (f *LocalAPI) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.calls++
	f.hosts = append(f.hosts, r.Host)
	f.paths = append(f.paths, r.Method+" "+r.URL.Path)
	doc, raw, code, delay := f.doc, f.raw, f.code, f.delay
	f.mu.Unlock()

	if r.Host != "" && r.Host != Host {
		http.Error(w, "invalid localapi request", http.StatusForbidden)
		return
	}
	if r.Method != http.MethodGet || r.URL.Path != StatusPath {
		http.NotFound(w, r)
		return
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			return
		}
	}
	if raw == nil {
		var err error
		if raw, err = json.Marshal(doc); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if code != 0 {
		w.WriteHeader(code)
	}
	w.Write(raw)
}

// SetDoc serves doc (as JSON) with status 200 from now on.
func (f *LocalAPI) SetDoc(doc any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.doc, f.raw, f.code = doc, nil, 0
}

// SetPeers serves Status(peers...) from now on.
func (f *LocalAPI) SetPeers(peers ...Peer) { f.SetDoc(Status(peers...)) }

// SetRaw serves body as it is, with status code (200 if 0), from now on.
func (f *LocalAPI) SetRaw(code int, body []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.raw, f.code = slices.Clone(body), code
	if f.raw == nil {
		f.raw = []byte{}
	}
}

// SetDelay makes each answer wait d (or until the request is abandoned).
func (f *LocalAPI) SetDelay(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.delay = d
}

// Requests counts the requests so far, of any path.
func (f *LocalAPI) Requests() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// Hosts returns the Host header of every request so far.
func (f *LocalAPI) Hosts() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.hosts)
}

// Paths returns "METHOD /path" of every request so far.
func (f *LocalAPI) Paths() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.paths)
}

package main

import (
	"bytes"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// The dependency checks below are in the style of Tailscale's depaware: they
// ask the go command what a package links in and fail when something that
// belongs to the daemon shows up.
//
// autoscalerctl is an API client. It may use this module's internal/api (the
// wire types and the client) and clock (the time source, standard library
// only) and nothing else of the module: not the server
// (internal/apiserver), the store (internal/store, cgo SQLite), the config
// parser (internal/config, TOML), the reconciler (scaler) nor anything else
// under the module path. Third-party packages the daemon needs are banned
// by name too, so that the failure says why.

// module is this module's path.
const module = "guardianproject.dev/ops/nix-builder-autoscaler"

// banned are third-party packages no API client may link. A path ending in
// "/" bans everything under it; otherwise the package and its subpackages.
var banned = []struct{ path, why string }{
	{"github.com/mattn/go-sqlite3", "the store's cgo SQLite driver"},
	{"github.com/BurntSushi/toml", "the daemon's config parser"},
	{"github.com/prometheus/", "the daemon's metrics"},
}

func TestAutoscalerctlDeps(t *testing.T) {
	checkDeps(t, module+"/cmd/autoscalerctl", depRules{
		moduleAllowed: []string{module + "/cmd/autoscalerctl", module + "/internal/api", module + "/clock"},
		moduleWhy: "autoscalerctl may use only internal/api and clock of this module; everything else under " + module +
			"/ is forbidden (e.g. internal/config, internal/store, internal/apiserver, scaler)",
	})
}

func TestAPIDeps(t *testing.T) {
	checkDeps(t, module+"/internal/api", depRules{
		moduleAllowed: []string{module + "/internal/api", module + "/clock"},
		moduleWhy:     "internal/api holds the wire types and the client and depends on nothing of this module but clock; the server is internal/apiserver",
		stdOnly:       true,
	})
}

type depRules struct {
	moduleAllowed []string // packages of this module root may depend on
	moduleWhy     string   // why the rest of the module is forbidden
	stdOnly       bool     // no packages outside the standard library and moduleAllowed
}

type goPkg struct {
	standard bool
	imports  []string
}

// forbidden says why package path (p) may not be a dependency under r ("" if
// it may).
func (r depRules) forbidden(path string, p goPkg) string {
	if path == module || strings.HasPrefix(path, module+"/") {
		if slices.Contains(r.moduleAllowed, path) {
			return ""
		}
		return r.moduleWhy
	}
	for _, b := range banned {
		if path == b.path || strings.HasPrefix(path, strings.TrimSuffix(b.path, "/")+"/") {
			return b.why
		}
	}
	if r.stdOnly && !p.standard {
		return "only the standard library is allowed"
	}
	return ""
}

// checkDeps runs "go list -deps" on root and fails for every forbidden
// dependency, naming the shortest import chain that brings it in.
func checkDeps(t *testing.T, root string, r depRules) {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("go command not on PATH: %v", err)
	}
	cmd := exec.Command(goTool, "list", "-deps", "-f", `{{.ImportPath}} {{.Standard}} {{join .Imports " "}}`, root)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v\n%s", root, err, stderr.Bytes())
	}
	pkgs := map[string]goPkg{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		pkgs[f[0]] = goPkg{standard: f[1] == "true", imports: f[2:]}
	}
	if _, ok := pkgs[root]; !ok {
		t.Fatalf("go list -deps %s did not list %s itself; output:\n%s", root, root, out)
	}

	// Breadth first from root, not walking through forbidden packages: each
	// forbidden package found is one that an allowed package imports
	// directly, with the shortest chain that gets there.
	from := map[string]string{root: ""}
	queue := []string{root}
	var entries []string
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, imp := range pkgs[p].imports {
			if _, seen := from[imp]; seen || imp == "C" { // "C" is cgo, not a package
				continue
			}
			from[imp] = p
			if r.forbidden(imp, pkgs[imp]) != "" {
				entries = append(entries, imp)
				continue
			}
			queue = append(queue, imp)
		}
	}
	chain := func(p string) string {
		var c []string
		for ; p != ""; p = from[p] {
			c = append(c, p)
		}
		slices.Reverse(c)
		return strings.Join(c, " -> ")
	}
	for _, e := range entries {
		t.Errorf("%s must not depend on %s: %s\n\timport chain: %s", root, e, r.forbidden(e, pkgs[e]), chain(e))
	}

	// Everything else forbidden that comes in through those imports.
	var more []string
	for p, pk := range pkgs {
		if !slices.Contains(entries, p) && r.forbidden(p, pk) != "" {
			more = append(more, p)
		}
	}
	if len(more) > 0 {
		slices.Sort(more)
		n := len(more)
		if n > 20 {
			more = append(more[:20], "...")
		}
		t.Errorf("%s also pulls in, through the imports above, %d more forbidden packages:\n\t%s", root, n, strings.Join(more, "\n\t"))
	}
}

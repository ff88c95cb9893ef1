package clock_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

// TestProductionCodeAsksTheClock: production code of the daemon's parts asks
// a clock.Clock for the time, timers and tickers, never package time, so
// that tests run it on a manual clock. A network deadline is the one
// exception (the kernel enforces it): time.Now inside the argument of
// SetDeadline, SetReadDeadline or SetWriteDeadline.
func TestProductionCodeAsksTheClock(t *testing.T) {
	forbidden := map[string]bool{"Now": true, "Since": true, "Until": true, "Sleep": true, "After": true,
		"AfterFunc": true, "NewTimer": true, "NewTicker": true, "Tick": true}
	// Test support packages run tests, not the daemon.
	testSupport := map[string]bool{"ec2test": true, "haproxytest": true, "discoverytest": true, "daemontest": true, "testwait": true}
	deadlines := map[string]bool{"SetDeadline": true, "SetReadDeadline": true, "SetWriteDeadline": true}
	checked := 0
	for _, root := range []string{"../scaler", "../haproxy", "../spoa", "../agentcheck", "../internal"} {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				if testSupport[d.Name()] || d.Name() == "testdata" {
					return filepath.SkipDir
				}
				return nil
			}
			if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
			if err != nil {
				return err
			}
			checked++
			timeName := ""
			for _, imp := range f.Imports {
				if imp.Path.Value == `"time"` {
					timeName = "time"
					if imp.Name != nil {
						timeName = imp.Name.Name
					}
				}
			}
			if timeName == "" {
				return nil
			}
			var allowed []ast.Node // deadline arguments
			ast.Inspect(f, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				if sel, ok := call.Fun.(*ast.SelectorExpr); ok && deadlines[sel.Sel.Name] {
					for _, a := range call.Args {
						allowed = append(allowed, a)
					}
				}
				return true
			})
			inAllowed := func(n ast.Node) bool {
				for _, a := range allowed {
					if n.Pos() >= a.Pos() && n.End() <= a.End() {
						return true
					}
				}
				return false
			}
			ast.Inspect(f, func(n ast.Node) bool {
				sel, ok := n.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				if id, ok := sel.X.(*ast.Ident); ok && id.Name == timeName && forbidden[sel.Sel.Name] && !inAllowed(sel) {
					t.Errorf("%s: time.%s: ask the injected clock.Clock instead (clock.Real where the wall clock is meant)",
						fset.Position(sel.Pos()), sel.Sel.Name)
				}
				return true
			})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if checked < 20 {
		t.Fatalf("checked %d files; the walk is broken", checked)
	}
}

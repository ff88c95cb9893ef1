package scaler

import "testing"

// TestMatchPool covers Route.Serves too; internal/config's TestServes has
// its full table.
func TestMatchPool(t *testing.T) {
	pools := []Route{
		{Systems: []string{"x86_64-linux"}},
		{Systems: []string{"x86_64-linux"}, Features: []string{"kvm"}},
		{Systems: []string{"x86_64-linux", "aarch64-linux"}, Features: []string{"kvm", "big-parallel"}},
	}
	self := func(r Route) Route { return r }
	tests := []struct {
		system   string
		features []string
		want     int
	}{
		{"x86_64-linux", nil, 0},                             // the first that serves, not the best
		{"x86_64-linux", []string{"kvm"}, 1},                 // skips a pool without the feature
		{"x86_64-linux", []string{"big-parallel", "kvm"}, 2}, // needs every feature
		{"aarch64-linux", []string{}, 2},
		{"riscv64-linux", nil, -1},
		{"x86_64-linux", []string{"nixos-test"}, -1},
	}
	for _, tt := range tests {
		if got := MatchPool(pools, self, tt.system, tt.features); got != tt.want {
			t.Errorf("MatchPool(%q, %q) = %d, want %d", tt.system, tt.features, got, tt.want)
		}
	}
	if got := MatchPool(nil, self, "x86_64-linux", nil); got != -1 {
		t.Errorf("MatchPool(no pools) = %d, want -1", got)
	}
}

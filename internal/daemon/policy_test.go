package daemon_test

import (
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
)

// TestPolicyIdleSettings: idle_timeout and billing_minimum reach the
// scaling policy: "auto" and EC2's 60 s by default, as written otherwise.
func TestPolicyIdleSettings(t *testing.T) {
	cfg, err := config.Load("../config/testdata/good/ec2.toml")
	if err != nil {
		t.Fatal(err)
	}
	for _, pp := range daemon.Policy(cfg).Pools {
		if !pp.IdleAuto || pp.BillingMinimum != time.Minute {
			t.Errorf("ec2 pool %s: IdleAuto %v, BillingMinimum %s; want auto and 1m", pp.Name, pp.IdleAuto, pp.BillingMinimum)
		}
	}
	cfg, err = config.Parse([]byte(`
[[pool]]
name = "x86"
systems = ["x86_64-linux"]
max_builders = 2
provider = "local"
idle_timeout = "5m"
`))
	if err != nil {
		t.Fatal(err)
	}
	if pp := daemon.Policy(cfg).Pools[0]; pp.IdleAuto || pp.IdleTimeout != 5*time.Minute || pp.BillingMinimum != 0 {
		t.Errorf("local pool: IdleAuto %v, IdleTimeout %s, BillingMinimum %s; want fixed 5m and 0", pp.IdleAuto, pp.IdleTimeout, pp.BillingMinimum)
	}
}

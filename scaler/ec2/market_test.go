package ec2

import "testing"

func TestEffectiveMarket(t *testing.T) {
	tests := []struct {
		o    PoolOptions
		want string
	}{
		{PoolOptions{}, MarketSpot},
		{PoolOptions{NestedVirtualization: true}, MarketOnDemand},
		{PoolOptions{Market: MarketSpot, NestedVirtualization: true}, MarketSpot}, // an explicit market wins
		{PoolOptions{Market: MarketOnDemand}, MarketOnDemand},
		{PoolOptions{Market: "bogus"}, "bogus"}, // returned as is, for New to reject
	}
	for _, tt := range tests {
		if got := tt.o.EffectiveMarket(); got != tt.want {
			t.Errorf("%+v.EffectiveMarket() = %q, want %q", tt.o, got, tt.want)
		}
	}
}

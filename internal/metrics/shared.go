package metrics

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// RegisterShared registers c on reg, or returns the collector already
// registered under the same name: several providers (one per region) may
// share one registry and so one set of counters. A conflicting
// registration still panics, as MustRegister would. A nil reg registers
// nothing.
func RegisterShared[T prometheus.Collector](reg prometheus.Registerer, c T) T {
	if reg == nil {
		return c
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(T); ok {
				return existing
			}
		}
		panic(err)
	}
	return c
}

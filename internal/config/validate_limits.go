package config

import "time"

// Upper bounds of the integer and duration keys. Each is far above any
// real use and low enough that no sum or product the daemon forms from
// them (min_builders + warm_pool, slots × max_jobs, now + a duration) can
// overflow: a value that passes validation never wraps.
const (
	// MaxJobs bounds max_jobs, a builder's HAProxy maxconn.
	MaxJobs = 1024
	// MaxReservationsPerBuilder bounds reservations_per_builder.
	MaxReservationsPerBuilder = 1024
	// MaxDuration bounds every duration key: a year (366 days).
	MaxDuration = 366 * 24 * time.Hour
)

// between reports an integer outside lo..hi, naming the key and the range,
// and tells whether it is inside.
func (v *validator) between(key string, n, lo, hi int, why string) bool {
	if n >= lo && n <= hi {
		return true
	}
	name := lastSegment(key)
	if n < lo {
		v.add(key, "must be at least %d; set %s = %d or more (at most %d)", lo, name, lo, hi)
	} else {
		v.add(key, "%d is more than %d, the most %s may be (%s); lower it", n, hi, name, why)
	}
	return false
}

func lastSegment(key string) string {
	for i := len(key) - 1; i >= 0; i-- {
		if key[i] == '.' {
			return key[i+1:]
		}
	}
	return key
}

// tooLong reports a duration above MaxDuration and tells whether it was.
func (v *validator) tooLong(key string, d Duration) bool {
	if d.err != nil || d.D() <= MaxDuration {
		return false
	}
	v.add(key, "%q is longer than %s, the most a duration may be; lower it", d, NewDuration(MaxDuration))
	return true
}

// poolCounts checks the pool's builder counts and per-builder limits, and
// that min_builders + warm_pool fits in max_builders. maxOK says
// max_builders itself is valid.
func (v *validator) poolCounts(p string, pool Pool, maxOK bool) {
	const slots = "the most slots a pool may have"
	minOK := v.between(p+"min_builders", pool.MinBuilders, 0, MaxBuilders, slots)
	warmOK := v.between(p+"warm_pool", pool.WarmPool, 0, MaxBuilders, slots)
	// With both bounded the sum cannot overflow.
	if maxOK && minOK && warmOK && pool.MinBuilders+pool.WarmPool > pool.MaxBuilders {
		v.add(p+"min_builders", "min_builders (%d) + warm_pool (%d) exceeds max_builders (%d); raise max_builders or lower the others",
			pool.MinBuilders, pool.WarmPool, pool.MaxBuilders)
	}
	v.between(p+"reservations_per_builder", pool.ReservationsPerBuilder, 1, MaxReservationsPerBuilder, "reservations one builder takes at once")
	v.between(p+"max_jobs", pool.MaxJobs, 1, MaxJobs, "concurrent jobs HAProxy sends one builder")
}

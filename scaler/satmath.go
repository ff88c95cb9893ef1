package scaler

import "unsafe"

// Counts the planner adds come from the config (validated, but a policy can
// be built by hand), from HAProxy's stats and from forecasts clients send.
// A sum that wrapped would turn "many builders wanted" into a negative
// target, and the pool would launch nothing; these saturate instead.

type integer interface {
	~int | ~int64
}

// satAdd is a+b, clamped to the type's range instead of wrapping.
func satAdd[T integer](a, b T) T {
	s := a + b
	switch {
	case a > 0 && b > 0 && s < 0:
		return maxOf(s)
	case a < 0 && b < 0 && s >= 0:
		return minOf(s)
	}
	return s
}

// satSub is a-b, clamped to the type's range instead of wrapping.
func satSub[T integer](a, b T) T {
	if b == minOf(b) {
		// -b does not exist; a - min is above the range unless a < 0.
		if a >= 0 {
			return maxOf(a)
		}
		return a - b
	}
	return satAdd(a, -b)
}

// maxOf is the largest value of v's type (int is 32 or 64 bits).
func maxOf[T integer](v T) T {
	return T(^uint64(0) >> (65 - 8*unsafe.Sizeof(v)))
}

func minOf[T integer](v T) T { return -maxOf(v) - 1 }

// ceilDiv is ⌈n/d⌉ for n ≥ 0, d ≥ 1, without the n+d-1 that can wrap.
func ceilDiv(n, d int) int {
	q := n / d
	if n%d != 0 {
		q++
	}
	return q
}

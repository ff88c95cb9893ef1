package spoa

import (
	"fmt"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
)

// GuardOptions bounds what one SPOE connection may cost. Zero fields take
// the defaults named after them.
type GuardOptions struct {
	// MaxFrameSize caps frames before HELLO and the max-frame-size the
	// agent accepts (DefaultMaxFrameSize).
	MaxFrameSize int
	// HelloTimeout bounds the time from accept to a complete HELLO
	// (DefaultHelloTimeout).
	HelloTimeout time.Duration
	// FrameTimeout bounds the time from a frame's first byte to its last
	// (DefaultFrameTimeout).
	FrameTimeout time.Duration
	// IdleTimeout closes a connection that has had nothing in flight and
	// sent nothing for this long (DefaultIdleTimeout).
	IdleTimeout time.Duration
	// WriteTimeout bounds each write to HAProxy (DefaultWriteTimeout).
	WriteTimeout time.Duration
	// MaxInFlight bounds a connection's unanswered NOTIFYs
	// (DefaultMaxInFlight).
	MaxInFlight int
	// MaxInFlightTotal bounds unanswered NOTIFYs over all connections
	// (DefaultMaxInFlightTotal).
	MaxInFlightTotal int
}

// Defaults of GuardOptions.
const (
	// DefaultMaxFrameSize is HAProxy's default tune.bufsize, which its
	// offered max-frame-size stays under.
	DefaultMaxFrameSize = 16384
	// DefaultHelloTimeout leaves room above the generated `timeout hello`
	// (2s), after which HAProxy gives up on the connection itself.
	DefaultHelloTimeout = 5 * time.Second
	DefaultFrameTimeout = 5 * time.Second
	// DefaultIdleTimeout is above SPOE's `timeout idle` so that HAProxy,
	// not the agent, closes an idle connection in the normal case.
	DefaultIdleTimeout  = haproxy.SPOEIdleTimeout + time.Minute
	DefaultWriteTimeout = 10 * time.Second
	// DefaultMaxInFlight is HAProxy's default max-waiting-frames.
	DefaultMaxInFlight = 20
	// DefaultMaxInFlightTotal bounds the frames the library holds to
	// 1024 × 16 KiB = 16 MiB, and as many handler goroutines.
	DefaultMaxInFlightTotal = 1024
)

func (o GuardOptions) withDefaults() GuardOptions {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defD := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.MaxFrameSize, DefaultMaxFrameSize)
	o.MaxFrameSize = max(o.MaxFrameSize, minMaxFrameSize)
	def(&o.MaxInFlight, DefaultMaxInFlight)
	def(&o.MaxInFlightTotal, DefaultMaxInFlightTotal)
	defD(&o.HelloTimeout, DefaultHelloTimeout)
	defD(&o.FrameTimeout, DefaultFrameTimeout)
	defD(&o.IdleTimeout, DefaultIdleTimeout)
	defD(&o.WriteTimeout, DefaultWriteTimeout)
	return o
}

// connState is implemented by connections whose listener may evict idle
// ones when it runs out of room: Busy marks the connection as not to be
// evicted, Idle as evictable. Before either is called a connection counts
// as new, the first to go. Implementations must not block.
type connState interface {
	Busy()
	Idle()
}

// closeReason is why the guard closed a connection. It selects the SPOP
// status code sent in the AGENT-DISCONNECT and labels the metric.
type closeReason uint8

const (
	reasonFrameTooBig closeReason = iota + 1
	reasonInvalidFrame
	reasonOutOfOrder
	reasonNoVersion
	reasonNoMaxFrameSize
	reasonNoCapabilities
	reasonUnsupportedVersion
	reasonBadMaxFrameSize
	reasonFragmented
	reasonHelloTimeout
	reasonFrameTimeout
	reasonIdleTimeout
	reasonTruncated
	reasonWriteFailed
)

// SPOP status codes (HAProxy's doc/SPOE.txt, "Errors & timeouts").
const (
	statusTimeout              uint32 = 2
	statusTooBig               uint32 = 3
	statusInvalid              uint32 = 4
	statusNoVersion            uint32 = 5
	statusNoMaxFrameSize       uint32 = 6
	statusNoCapabilities       uint32 = 7
	statusBadVersion           uint32 = 8
	statusBadMaxFrameSize      uint32 = 9
	statusFragmentationUnsuppd uint32 = 10
)

// reasonInfo is a reason's metric label and what the peer is told; send is
// false when the peer is gone or cannot be written to.
var reasonInfo = map[closeReason]struct {
	label  string
	status uint32
	send   bool
}{
	reasonFrameTooBig:        {"frame_too_big", statusTooBig, true},
	reasonInvalidFrame:       {"invalid_frame", statusInvalid, true},
	reasonOutOfOrder:         {"out_of_order", statusInvalid, true},
	reasonNoVersion:          {"version_not_found", statusNoVersion, true},
	reasonNoMaxFrameSize:     {"max_frame_size_not_found", statusNoMaxFrameSize, true},
	reasonNoCapabilities:     {"capabilities_not_found", statusNoCapabilities, true},
	reasonUnsupportedVersion: {"unsupported_version", statusBadVersion, true},
	reasonBadMaxFrameSize:    {"bad_max_frame_size", statusBadMaxFrameSize, true},
	reasonFragmented:         {"fragmentation", statusFragmentationUnsuppd, true},
	reasonHelloTimeout:       {"hello_timeout", statusTimeout, true},
	reasonFrameTimeout:       {"frame_timeout", statusTimeout, true},
	reasonIdleTimeout:        {"idle_timeout", statusTimeout, true},
	reasonTruncated:          {"truncated", 0, false},
	reasonWriteFailed:        {"write_failed", 0, false},
}

func (r closeReason) String() string { return reasonInfo[r].label }

// protocolError is the guard's verdict on a connection.
type protocolError struct {
	reason closeReason
	detail string
}

func (e *protocolError) Error() string {
	return fmt.Sprintf("spoa guard: %s: %s", e.reason, e.detail)
}

func protoErr(r closeReason, detail string) error {
	return &protocolError{reason: r, detail: detail}
}

package spoa

import "fmt"

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

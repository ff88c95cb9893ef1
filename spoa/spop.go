package spoa

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// This file is the guard's own reading of SPOP v2 (HAProxy's doc/SPOE.txt):
// enough to decide that a frame is complete and well-formed before the SPOE
// library parses it, since the library indexes and type-asserts what it
// reads without checking (see guard.go).

// SPOP frame types and flags.
const (
	frameUnset         byte = 0x00 // a fragment's continuation
	frameHAProxyHello  byte = 0x01
	frameHAProxyDiscon byte = 0x02
	frameNotify        byte = 0x03
	frameAgentHello    byte = 0x65
	frameAgentDiscon   byte = 0x66
	frameAgentAck      byte = 0x67

	flagFin   uint32 = 0x01
	flagAbort uint32 = 0x02
)

// SPOP typed-data types (the low nibble of the type byte).
const (
	typeNull byte = iota
	typeBool
	typeInt32
	typeUint32
	typeInt64
	typeUint64
	typeIPv4
	typeIPv6
	typeString
	typeBinary
)

// maxVarintLen is the longest varint a 64-bit value needs. The library keeps
// shifting for as long as continuation bits come, so a longer one is refused
// rather than decoded to a value the two sides could disagree on.
const maxVarintLen = 10

// minMaxFrameSize is SPOP's floor for a peer's max-frame-size.
const minMaxFrameSize = 256

// spopVersion is the only SPOP version the library speaks (it always
// answers "2.0").
const spopVersion = "2.0"

// spopReader walks a frame body. Each method reports false instead of
// reading past the end, so no input can index out of range.
type spopReader struct{ b []byte }

func (r *spopReader) empty() bool { return len(r.b) == 0 }

// varint decodes one varint exactly as the library does (the continuation
// byte is added whole, high bit included), so both sides agree on lengths.
func (r *spopReader) varint() (uint64, bool) {
	if len(r.b) == 0 {
		return 0, false
	}
	v := uint64(r.b[0])
	if v < 240 {
		r.b = r.b[1:]
		return v, true
	}
	shift := uint(4)
	for i := 1; i < len(r.b) && i < maxVarintLen; i++ {
		v += uint64(r.b[i]) << shift
		shift += 7
		if r.b[i] < 128 {
			r.b = r.b[i+1:]
			return v, true
		}
	}
	return 0, false
}

func (r *spopReader) take(n uint64) ([]byte, bool) {
	if n > uint64(len(r.b)) {
		return nil, false
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out, true
}

func (r *spopReader) byte() (byte, bool) {
	b, ok := r.take(1)
	if !ok {
		return 0, false
	}
	return b[0], true
}

// spopValue is one decoded typed-data value; only the fields its kind uses
// are set.
type spopValue struct {
	kind byte
	b    bool
	n    uint64
	s    []byte // string, binary and address bytes
}

// value decodes one typed-data value: a known type with all of its bytes.
func (r *spopReader) value() (spopValue, bool) {
	t, ok := r.byte()
	if !ok {
		return spopValue{}, false
	}
	v := spopValue{kind: t & 0x0f}
	switch v.kind {
	case typeNull:
		return v, true
	case typeBool:
		v.b = t&0x10 != 0
		return v, true
	case typeInt32, typeUint32, typeInt64, typeUint64:
		v.n, ok = r.varint()
		return v, ok
	case typeIPv4:
		v.s, ok = r.take(4)
		return v, ok
	case typeIPv6:
		v.s, ok = r.take(16)
		return v, ok
	case typeString, typeBinary:
		var n uint64
		if n, ok = r.varint(); !ok {
			return v, false
		}
		v.s, ok = r.take(n)
		return v, ok
	}
	return v, false
}

// name reads a length-prefixed name (a KV key or a message name).
func (r *spopReader) name() (string, bool) {
	n, ok := r.varint()
	if !ok {
		return "", false
	}
	b, ok := r.take(n)
	return string(b), ok
}

// kvList decodes a KV-LIST up to the end of the body. A repeated key keeps
// its first value, as the library's lookup does.
func (r *spopReader) kvList() (map[string]spopValue, bool) {
	kv := map[string]spopValue{}
	for !r.empty() {
		k, ok := r.name()
		if !ok {
			return nil, false
		}
		v, ok := r.value()
		if !ok {
			return nil, false
		}
		if _, dup := kv[k]; !dup {
			kv[k] = v
		}
	}
	return kv, true
}

// frameHead is the part of a frame common to all types.
type frameHead struct {
	typ           byte
	flags         uint32
	stream, frame uint64
	payload       spopReader
}

// parseHead reads type, flags and the two ids of a frame body (the bytes
// after the 4-byte length).
func parseHead(body []byte) (frameHead, error) {
	r := spopReader{b: body}
	var h frameHead
	var ok bool
	if h.typ, ok = r.byte(); !ok {
		return h, protoErr(reasonInvalidFrame, "empty frame")
	}
	switch h.typ {
	case frameHAProxyHello, frameHAProxyDiscon, frameNotify:
	case frameUnset:
		return h, protoErr(reasonFragmented, "fragment frame (type 0)")
	default:
		return h, protoErr(reasonInvalidFrame, fmt.Sprintf("frame type %#x is not one HAProxy sends", h.typ))
	}
	fl, ok := r.take(4)
	if !ok {
		return h, protoErr(reasonInvalidFrame, "frame shorter than its flags")
	}
	h.flags = binary.BigEndian.Uint32(fl)
	if h.flags&flagFin == 0 || h.flags&flagAbort != 0 {
		return h, protoErr(reasonFragmented, fmt.Sprintf("flags %#x: fragmented or aborted payload", h.flags))
	}
	if h.stream, ok = r.varint(); !ok {
		return h, protoErr(reasonInvalidFrame, "truncated stream-id")
	}
	if h.frame, ok = r.varint(); !ok {
		return h, protoErr(reasonInvalidFrame, "truncated frame-id")
	}
	h.payload = r
	return h, nil
}

// checkMessages checks a NOTIFY's LIST-OF-MESSAGES: each message's name,
// its nb-args byte and every argument are complete.
func checkMessages(r spopReader) error {
	for !r.empty() {
		if _, ok := r.name(); !ok {
			return protoErr(reasonInvalidFrame, "truncated message name")
		}
		nb, ok := r.byte()
		if !ok {
			return protoErr(reasonInvalidFrame, "message without nb-args")
		}
		for i := 0; i < int(nb); i++ {
			if _, ok := r.name(); !ok {
				return protoErr(reasonInvalidFrame, "truncated argument name")
			}
			if _, ok := r.value(); !ok {
				return protoErr(reasonInvalidFrame, "truncated or unknown argument value")
			}
		}
	}
	return nil
}

// hello is what the guard keeps of a valid HAPROXY-HELLO.
type hello struct {
	maxFrameSize uint32 // negotiated: HAProxy's offer capped at ours
	capabilities string
	healthcheck  bool
	engineID     string
	hasEngineID  bool
}

// parseHello checks a HAPROXY-HELLO payload against SPOP's mandatory keys
// and the types the library asserts, and negotiates the frame size.
func parseHello(r spopReader, ourMax uint32) (hello, error) {
	var h hello
	kv, ok := r.kvList()
	if !ok {
		return h, protoErr(reasonInvalidFrame, "malformed KV-LIST in HELLO")
	}
	v, ok := kv["supported-versions"]
	switch {
	case !ok:
		return h, protoErr(reasonNoVersion, "HELLO without supported-versions")
	case v.kind != typeString:
		return h, protoErr(reasonInvalidFrame, "supported-versions is not a string")
	case !offersVersion(string(v.s), spopVersion):
		return h, protoErr(reasonUnsupportedVersion, fmt.Sprintf("supported-versions %q lacks %s", v.s, spopVersion))
	}
	v, ok = kv["max-frame-size"]
	switch {
	case !ok:
		return h, protoErr(reasonNoMaxFrameSize, "HELLO without max-frame-size")
	case v.kind != typeUint32 || v.n > 0xffffffff:
		return h, protoErr(reasonInvalidFrame, "max-frame-size is not a uint32")
	case v.n < minMaxFrameSize:
		return h, protoErr(reasonBadMaxFrameSize, fmt.Sprintf("max-frame-size %d is under %d", v.n, minMaxFrameSize))
	}
	h.maxFrameSize = uint32(min(v.n, uint64(ourMax)))
	v, ok = kv["capabilities"]
	switch {
	case !ok:
		return h, protoErr(reasonNoCapabilities, "HELLO without capabilities")
	case v.kind != typeString:
		return h, protoErr(reasonInvalidFrame, "capabilities is not a string")
	}
	h.capabilities = string(v.s)
	if v, ok = kv["healthcheck"]; ok {
		if v.kind != typeBool {
			return h, protoErr(reasonInvalidFrame, "healthcheck is not a boolean")
		}
		h.healthcheck = v.b
	}
	if v, ok = kv["engine-id"]; ok {
		if v.kind != typeString {
			return h, protoErr(reasonInvalidFrame, "engine-id is not a string")
		}
		h.engineID, h.hasEngineID = string(v.s), true
	}
	return h, nil
}

// offersVersion reports whether the comma-separated list holds want.
func offersVersion(list, want string) bool {
	for v := range strings.SplitSeq(list, ",") {
		if strings.TrimSpace(v) == want {
			return true
		}
	}
	return false
}

// checkDisconnect checks a HAPROXY-DISCONNECT payload's mandatory keys.
func checkDisconnect(r spopReader) error {
	kv, ok := r.kvList()
	if !ok {
		return protoErr(reasonInvalidFrame, "malformed KV-LIST in DISCONNECT")
	}
	if v, ok := kv["status-code"]; !ok || v.kind != typeUint32 {
		return protoErr(reasonInvalidFrame, "DISCONNECT without a uint32 status-code")
	}
	if v, ok := kv["message"]; !ok || v.kind != typeString {
		return protoErr(reasonInvalidFrame, "DISCONNECT without a string message")
	}
	return nil
}

// spopWriter builds a frame: the 4-byte length is filled in by bytes.
type spopWriter struct{ b []byte }

func newFrame(typ byte) *spopWriter {
	w := &spopWriter{b: make([]byte, 4, 64)}
	w.b = append(w.b, typ)
	w.b = binary.BigEndian.AppendUint32(w.b, flagFin)
	w.b = append(w.b, 0, 0) // stream-id and frame-id 0, as HELLO and DISCONNECT carry
	return w
}

func (w *spopWriter) varint(n uint64) {
	if n < 240 {
		w.b = append(w.b, byte(n))
		return
	}
	w.b = append(w.b, byte(n)|0xf0)
	n = (n - 240) >> 4
	for n >= 128 {
		w.b = append(w.b, byte(n)|0x80)
		n = (n - 128) >> 7
	}
	w.b = append(w.b, byte(n))
}

func (w *spopWriter) key(k string) {
	w.varint(uint64(len(k)))
	w.b = append(w.b, k...)
}

func (w *spopWriter) str(k, v string) {
	w.key(k)
	w.b = append(w.b, typeString)
	w.varint(uint64(len(v)))
	w.b = append(w.b, v...)
}

func (w *spopWriter) uint32(k string, v uint32) {
	w.key(k)
	w.b = append(w.b, typeUint32)
	w.varint(uint64(v))
}

func (w *spopWriter) bool(k string, v bool) {
	w.key(k)
	t := typeBool
	if v {
		t |= 0x10
	}
	w.b = append(w.b, t)
}

func (w *spopWriter) bytes() []byte {
	binary.BigEndian.PutUint32(w.b, uint32(len(w.b)-4))
	return w.b
}

// canonicalHello is the HELLO the library is given in place of HAProxy's:
// only the keys the guard checked, with the negotiated max-frame-size (the
// library answers the value it reads) and the version it speaks.
func canonicalHello(h hello) []byte {
	w := newFrame(frameHAProxyHello)
	w.str("supported-versions", spopVersion)
	w.uint32("max-frame-size", h.maxFrameSize)
	w.str("capabilities", h.capabilities)
	if h.healthcheck {
		w.bool("healthcheck", true)
	}
	if h.hasEngineID {
		w.str("engine-id", h.engineID)
	}
	return w.bytes()
}

// canonicalDisconnect is the HAPROXY-DISCONNECT the library is given: it
// reads nothing of the payload but still type-asserts HELLO's keys in it.
func canonicalDisconnect() []byte {
	return newFrame(frameHAProxyDiscon).bytes()
}

// agentDisconnect is the AGENT-DISCONNECT frame the guard sends before
// closing a connection it refuses.
func agentDisconnect(status uint32, msg string) []byte {
	w := newFrame(frameAgentDiscon)
	w.uint32("status-code", status)
	w.str("message", msg)
	return w.bytes()
}

package config

import (
	"strings"
	"time"
)

// Duration is a time.Duration written in the config file as a Go duration
// string such as "5m" or "1h30m".
//
// Decoding never fails: text that is not a duration is kept, together with
// the parse error, so that Validate can report it along with every other
// problem in the file instead of stopping at the first one.
type Duration struct {
	d   time.Duration
	raw string // the text as written; kept only when it did not parse
	err error  // why raw is not a duration
}

// NewDuration returns a valid Duration of d.
func NewDuration(d time.Duration) Duration { return Duration{d: d} }

// D returns the duration. It is 0 when the text did not parse.
func (d Duration) D() time.Duration { return d.d }

// String formats the duration without trailing zero units ("5m", not "5m0s").
// A duration that did not parse is shown as it was written.
func (d Duration) String() string {
	if d.err != nil {
		return d.raw
	}
	s := d.d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// MarshalText writes the duration as String does, so a config that was read
// writes back the same values (including text that did not parse).
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText parses a Go duration. It never returns an error; see Duration.
func (d *Duration) UnmarshalText(text []byte) error {
	s := string(text)
	v, err := time.ParseDuration(s)
	if err != nil {
		*d = Duration{raw: s, err: err}
		return nil
	}
	*d = Duration{d: v}
	return nil
}

// Timeout is a Duration that may also be written "auto": the daemon
// then decides the value as it runs (idle_timeout: from the pool's measured
// boot time).
type Timeout struct {
	Duration
	auto bool
}

// Auto is the Timeout written "auto".
func Auto() Timeout { return Timeout{auto: true} }

// NewTimeout returns a valid fixed Timeout of d.
func NewTimeout(d time.Duration) Timeout { return Timeout{Duration: NewDuration(d)} }

// IsAuto reports whether the value was written "auto"; D is then 0.
func (a Timeout) IsAuto() bool { return a.auto }

// String is "auto", or the duration as Duration.String writes it.
func (a Timeout) String() string {
	if a.auto {
		return "auto"
	}
	return a.Duration.String()
}

// MarshalText writes the value as String does.
func (a Timeout) MarshalText() ([]byte, error) { return []byte(a.String()), nil }

// UnmarshalText parses "auto" or a Go duration. It never returns an error;
// see Duration.
func (a *Timeout) UnmarshalText(text []byte) error {
	if string(text) == "auto" {
		*a = Auto()
		return nil
	}
	*a = Timeout{}
	return a.Duration.UnmarshalText(text)
}

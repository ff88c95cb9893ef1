package apiserver

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Bounds of what a client may store. Each value ends up in every listing of
// its reservation or forecast, in events and in logs, so a client must not
// be able to widen those without limit (a create with 5,000 features once
// made one failure reason 30 KB long, and every table row with it).
const (
	// maxFeatures bounds the features of one request; a pool serves a
	// handful, so more can only be a mistake.
	maxFeatures = 32
	// maxFeatureLen bounds one feature name (also in reFeature).
	maxFeatureLen = 64
	// maxSystemLen bounds a Nix system name such as "x86_64-linux".
	maxSystemLen = 64
	// maxOwner bounds a reservation's owner, in bytes.
	maxOwner = 512
	// maxSource bounds a source, in bytes.
	maxSource = 256
	// maxReason bounds a reason the API stores, in bytes.
	maxReason = 1024
	// maxQuoted bounds how much of a bad value an error message repeats.
	maxQuoted = 64
)

// quote renders a client's value for an error message, cut to maxQuoted
// bytes so that the answer to a huge value is not huge itself.
func quote(v string) string {
	if len(v) <= maxQuoted {
		return fmt.Sprintf("%q", v)
	}
	cut := maxQuoted
	for cut > 0 && !utf8.RuneStart(v[cut]) {
		cut--
	}
	return fmt.Sprintf("%q... (%d bytes)", v[:cut], len(v))
}

// truncate cuts s to at most n bytes, on a rune boundary, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const mark = "..."
	cut := n - len(mark)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + mark
}

// checkSystem says what is wrong with a Nix system name, or "".
func checkSystem(system string) string {
	switch {
	case len(system) > maxSystemLen:
		return fmt.Sprintf("system: longer than %d bytes (%d given)", maxSystemLen, len(system))
	case !reSystem.MatchString(system):
		return fmt.Sprintf("system: %s is not a Nix system name like \"x86_64-linux\"", quote(system))
	}
	return ""
}

// checkFeatures says what is wrong with a list of features, or "".
func checkFeatures(fs []string) string {
	if len(fs) > maxFeatures {
		return fmt.Sprintf("features: more than %d (%d given)", maxFeatures, len(fs))
	}
	for _, f := range fs {
		if len(f) > maxFeatureLen {
			return fmt.Sprintf("features: %s is longer than %d bytes (%d given)", quote(f), maxFeatureLen, len(f))
		}
		if !reFeature.MatchString(f) {
			return fmt.Sprintf("features: %s is not a feature name like \"kvm\" or \"big-parallel\"", quote(f))
		}
	}
	return ""
}

// checkText says what is wrong with free text of field name, or "": at most
// max bytes of UTF-8 without control characters (they would garble a
// terminal that shows it).
func checkText(name, v string, max int) string {
	switch {
	case len(v) > max:
		return fmt.Sprintf("%s: longer than %d bytes (%d given)", name, max, len(v))
	case !utf8.ValidString(v) || strings.ContainsFunc(v, unicode.IsControl):
		return name + ": must be UTF-8 text without control characters"
	}
	return ""
}

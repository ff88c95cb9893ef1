package main

import (
	"slices"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// autoscalerctl may not link package scaler (deps_test.go), so it writes out
// the little it needs of it. These tests, which are not linked into the
// binary, keep those copies equal to the daemon's.

func TestSlotStateOrderIsScalers(t *testing.T) {
	var want []string
	for _, s := range scaler.SlotStates {
		want = append(want, string(s))
	}
	if !slices.Equal(slotStateOrder, want) {
		t.Errorf("slotStateOrder = %q, want scaler.SlotStates %q", slotStateOrder, want)
	}
}

func TestParseSlotIsScalers(t *testing.T) {
	for _, s := range []string{
		"x86/slot1", "a/b", "x86-kvm/slot12",
		"", "/", "x86", "x86/", "/slot1", "x86/slot1/", "x86/slot1/x", "a//b",
	} {
		pool, slot, err := parseSlot(s)
		key, kerr := scaler.ParseSlotKey(s)
		if (err == nil) != (kerr == nil) {
			t.Errorf("parseSlot(%q) error %v, scaler.ParseSlotKey error %v", s, err, kerr)
			continue
		}
		if err == nil && (pool != key.Pool || slot != key.Slot) {
			t.Errorf("parseSlot(%q) = %q, %q; scaler.ParseSlotKey = %+v", s, pool, slot, key)
		}
	}
}

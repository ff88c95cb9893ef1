package store

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

const slotColumns = `pool, name, state, instance_id, launch_id, address, instance_type,
	market, zone, state_since, last_active, weight, drain_reason, version`

func scanSlot(sc scanner) (scaler.Slot, error) {
	var s scaler.Slot
	var state string
	var since, active int64
	err := sc.Scan(&s.Pool, &s.Name, &state, &s.InstanceID, &s.LaunchID, &s.Address,
		&s.InstanceType, &s.Market, &s.Zone, &since, &active, &s.Weight, &s.DrainReason, &s.Version)
	if err != nil {
		return scaler.Slot{}, err
	}
	s.State = scaler.SlotState(state)
	s.StateSince = fromNanos(since)
	s.LastActive = fromNanos(active)
	return s, nil
}

// slotIndex is N of "slotN", so slot10 sorts after slot2 the way an operator
// reads the HAProxy backend; other names sort after all numbered ones.
func slotIndex(name string) (int, bool) {
	num, ok := strings.CutPrefix(name, "slot")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(num)
	if err != nil || n <= 0 {
		return 0, false
	}
	return n, true
}

func compareSlotNames(a, b string) int {
	ai, aok := slotIndex(a)
	bi, bok := slotIndex(b)
	switch {
	case aok && bok:
		if c := cmp.Compare(ai, bi); c != 0 {
			return c
		}
	case aok:
		return -1
	case bok:
		return 1
	}
	return strings.Compare(a, b)
}

// EnsureSlots makes the slots table match the configured pools: pool p gets
// slots slot1..slot<pools[p]>. Surplus slots (of a shrunk or removed pool)
// are deleted only while empty; a surplus slot that still holds an instance is
// kept so the reconciler can drain it, and is deleted by a later call once it
// is empty again.
func (db *DB) EnsureSlots(ctx context.Context, pools map[string]int, now time.Time) error {
	for p, n := range pools {
		if p == "" || n < 0 {
			return fmt.Errorf("ensure slots: pool %q: invalid (want a name and max_builders >= 0, got %d)", p, n)
		}
	}
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("ensure slots: %w", err)
	}
	defer tx.Rollback()

	for p, n := range pools {
		for i := 1; i <= n; i++ {
			_, err := tx.ExecContext(ctx, `INSERT INTO slots (pool, name, state, weight, state_since, version)
				VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (pool, name) DO NOTHING`,
				p, "slot"+strconv.Itoa(i), string(scaler.Empty), scaler.DefaultWeight, nanos(now))
			if err != nil {
				return fmt.Errorf("ensure slots: insert %s/slot%d: %w", p, i, err)
			}
		}
	}

	rows, err := tx.QueryContext(ctx, "SELECT pool, name FROM slots WHERE state = ?", string(scaler.Empty))
	if err != nil {
		return fmt.Errorf("ensure slots: %w", err)
	}
	var surplus []scaler.SlotKey
	for rows.Next() {
		var k scaler.SlotKey
		if err := rows.Scan(&k.Pool, &k.Slot); err != nil {
			rows.Close()
			return fmt.Errorf("ensure slots: %w", err)
		}
		n, configured := pools[k.Pool]
		i, numbered := slotIndex(k.Slot)
		if !configured || !numbered || i > n {
			surplus = append(surplus, k)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("ensure slots: %w", err)
	}
	for _, k := range surplus {
		if _, err := tx.ExecContext(ctx, "DELETE FROM slots WHERE pool = ? AND name = ? AND state = ?",
			k.Pool, k.Slot, string(scaler.Empty)); err != nil {
			return fmt.Errorf("ensure slots: delete %s: %w", k, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("ensure slots: commit: %w", err)
	}
	db.gen.Add(1)
	return nil
}

// Slots returns every slot, ordered by pool and then slot number.
func (db *DB) Slots(ctx context.Context) ([]scaler.Slot, error) {
	rows, err := db.r.QueryContext(ctx, "SELECT "+slotColumns+" FROM slots")
	if err != nil {
		return nil, fmt.Errorf("list slots: %w", err)
	}
	defer rows.Close()
	var out []scaler.Slot
	for rows.Next() {
		s, err := scanSlot(rows)
		if err != nil {
			return nil, fmt.Errorf("list slots: %w", err)
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list slots: %w", err)
	}
	slices.SortFunc(out, func(a, b scaler.Slot) int {
		if c := strings.Compare(a.Pool, b.Pool); c != 0 {
			return c
		}
		return compareSlotNames(a.Name, b.Name)
	})
	return out, nil
}

// Slot returns one slot, or an error wrapping scaler.ErrNotFound.
func (db *DB) Slot(ctx context.Context, key scaler.SlotKey) (scaler.Slot, error) {
	row := db.r.QueryRowContext(ctx, "SELECT "+slotColumns+" FROM slots WHERE pool = ? AND name = ?", key.Pool, key.Slot)
	s, err := scanSlot(row)
	if errors.Is(err, sql.ErrNoRows) {
		return scaler.Slot{}, fmt.Errorf("get slot %s: %w", key, scaler.ErrNotFound)
	}
	if err != nil {
		return scaler.Slot{}, fmt.Errorf("get slot %s: %w", key, err)
	}
	return s, nil
}

package config

import (
	"fmt"
	"slices"

	"github.com/BurntSushi/toml"
)

// Decoding a config file: the TOML document, keys the schema does not know,
// and where each pool's raw table is.

// document is Config with each pool left undecoded, so that every pool can be
// decoded on top of its own copy of the pool defaults.
type document struct {
	Daemon       Daemon           `toml:"daemon"`
	Reservations Reservations     `toml:"reservations"`
	HAProxy      HAProxy          `toml:"haproxy"`
	Tailscale    Tailscale        `toml:"tailscale"`
	Pools        []toml.Primitive `toml:"pool"`
}

// decode decodes data on top of the defaults and reports the keys it did not
// use. raw is data decoded generically, used to tell which pool an unknown
// key belongs to.
func decode(data []byte, raw map[string]any) (*Config, Problems, error) {
	def := Default()
	doc := document{Daemon: def.Daemon, Reservations: def.Reservations, HAProxy: def.HAProxy, Tailscale: def.Tailscale}
	md, err := toml.Decode(string(data), &doc)
	if err != nil {
		return nil, nil, err
	}
	cfg := &Config{Daemon: doc.Daemon, Reservations: doc.Reservations, HAProxy: doc.HAProxy, Tailscale: doc.Tailscale}
	pools := rawPools(raw)
	for i, prim := range doc.Pools {
		p := DefaultPool()
		if err := md.PrimitiveDecode(prim, &p); err != nil {
			return nil, nil, fmt.Errorf("pool[%d]: %w", i, err)
		}
		if i >= len(pools) || pools[i]["billing_minimum"] == nil {
			p.BillingMinimum = DefaultBillingMinimum(p.Provider)
		}
		cfg.Pools = append(cfg.Pools, p)
	}
	return cfg, unknownKeys(md.Undecoded(), raw), nil
}

const unknownKeyMessage = "unknown key; check the spelling against docs/configuration.md"

// unknownKeys turns the decoder's undecoded keys into problems. The decoder
// names keys of [[pool]] tables without their index ("pool.bogus"), so each
// is looked up in every raw pool to name the pool it was found in. Keys under
// an unknown key are not reported again.
func unknownKeys(undecoded []toml.Key, raw map[string]any) Problems {
	var ps Problems
	seen := map[string]bool{}
	var unknown []toml.Key
	for _, k := range undecoded {
		s := k.String()
		if seen[s] {
			continue
		}
		seen[s] = true
		if slices.ContainsFunc(unknown, func(u toml.Key) bool {
			return len(u) < len(k) && slices.Equal(u, k[:len(u)])
		}) {
			continue
		}
		unknown = append(unknown, k)
		if k[0] != "pool" || len(k) == 1 {
			ps = append(ps, Problem{Key: clip(k.String(), maxMessage), Message: unknownKeyMessage})
			continue
		}
		for i, pool := range rawPools(raw) {
			if hasPath(pool, k[1:]) {
				key := poolKey(i, rawName(pool)) + "." + k[1:].String()
				ps = append(ps, Problem{Key: clip(key, maxMessage), Message: unknownKeyMessage})
			}
		}
	}
	return ps
}

func hasPath(m map[string]any, path []string) bool {
	for i, seg := range path {
		v, ok := m[seg]
		if !ok {
			return false
		}
		if i == len(path)-1 {
			return true
		}
		if m, ok = v.(map[string]any); !ok {
			return false
		}
	}
	return false
}

// rawPools returns the generic tables of the [[pool]] array.
func rawPools(raw map[string]any) []map[string]any {
	switch v := raw["pool"].(type) {
	case []map[string]any:
		return v
	case []any:
		pools := make([]map[string]any, 0, len(v))
		for _, e := range v {
			m, _ := e.(map[string]any)
			pools = append(pools, m)
		}
		return pools
	}
	return nil
}

func rawName(pool map[string]any) string {
	s, _ := pool["name"].(string)
	return s
}

// poolKey names the i'th pool (0-based) in problem keys: pool[1] or, when the
// pool has a name, pool[1] (name "arm").
func poolKey(i int, name string) string {
	if name == "" {
		return fmt.Sprintf("pool[%d]", i)
	}
	return fmt.Sprintf("pool[%d] (name %q)", i, name)
}

// Package haproxy is the daemon's side of HAProxy: the runtime-API client,
// the scaler.Readiness implementation on top of it, and the generator of
// HAProxy's configuration (docs/design.md §3.2–§3.4).
package haproxy

// The names below are shared by the generated configuration and the
// runtime-API readers, so that both always agree.
const (
	// Prefix starts every proxy name this project generates.
	Prefix = "nba_"
	// SPOABackend is the backend holding the SPOE agent.
	SPOABackend = Prefix + "spoa"
	// SPOEEngine prefixes each pool's SPOE engine id.
	SPOEEngine = "nba"
)

// The names of the SPOE contract with the agent (message, arguments,
// variables and their prefix) are package spoa/wire's.

// Backend is the backend (and frontend) name of a pool.
func Backend(pool string) string { return Prefix + pool }

// Engine is the SPOE engine id of a pool's frontend.
func Engine(pool string) string { return SPOEEngine + "-" + pool }

// Package wire is the SPOE contract between HAProxy and the SPOE agent
// (package spoa), docs/design.md §3.3: the message HAProxy sends for every
// new connection to a pool's frontend, its arguments, and the variables the
// agent sets in reply. The agent parses and answers with these names; the
// configuration generator (package haproxy) writes them into haproxy.cfg and
// the SPOE file. Each name is defined here only.
//
// The package has no dependencies, so that both sides (and the tests that
// check them against each other) import it without an import cycle.
package wire

// Message is the SPOE message sent once per new connection to a pool's
// frontend (spoe-message in the SPOE file). The agent ignores any other.
const Message = "nba-conn"

// The arguments of Message, in the order the generated SPOE file sends them
// (its `args` line):
//
//	pool=str(<pool>)            the pool name (string)
//	src=src                     the client address (IPv4 or IPv6)
//	sport=src_port              the client port (integer)
//	be=str(nba_<pool>)          the pool's backend name (string)
//	q=queue(nba_<pool>)         connections queued in the backend (integer)
//	beconn=be_conn(nba_<pool>)  connections in the backend (integer)
//	nbsrv=nbsrv(nba_<pool>)     usable (UP) servers in the backend (integer)
//	id=uuid()                   a fresh UUIDv4 for this connection (string),
//	                            for correlation: with HAProxy ≥ 3.1 each
//	                            NOTIFY may arrive on its own SPOP stream
//
// The agent reads pool, src, sport, q, beconn and nbsrv.
const (
	ArgPool    = "pool"
	ArgSrc     = "src"
	ArgSport   = "sport"
	ArgBackend = "be"
	ArgQueue   = "q"
	ArgBeConn  = "beconn"
	ArgNbSrv   = "nbsrv"
	ArgID      = "id"
)

// Args are the arguments of Message, in the order they are sent.
var Args = []string{ArgPool, ArgSrc, ArgSport, ArgBackend, ArgQueue, ArgBeConn, ArgNbSrv, ArgID}

// The variables the agent sets: one of VarSlot or VarVerdict, in the session
// scope (SPOP's "session", HAProxy's "sess"). HAProxy prefixes them with the
// SPOE agent's var-prefix, VarPrefix, so the frontend reads them as
// sess.nba.slot and sess.nba.verdict (SessionVar).
const (
	// VarScope is HAProxy's name of the scope the agent sets variables in.
	VarScope = "sess"
	// VarPrefix is the SPOE agent's `option var-prefix`.
	VarPrefix = "nba"
	// VarSlot is the slot (server name) the connection goes to.
	VarSlot = "slot"
	// VarVerdict is set to VerdictReject when no builder became ready
	// within the hold.
	VarVerdict = "verdict"
	// VerdictReject, as VarVerdict, makes the frontend close the connection
	// at once.
	VerdictReject = "reject"
)

// Vars are the variables the agent may set (VarScope, without VarPrefix).
var Vars = []string{VarSlot, VarVerdict}

// SessionVar is the name HAProxy reads the agent's variable name by:
// SessionVar(VarSlot) is "sess.nba.slot".
func SessionVar(name string) string { return VarScope + "." + VarPrefix + "." + name }

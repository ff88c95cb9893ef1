#!/bin/sh
# terminate-builder.sh: stop a builder started by launch-builder.sh and
# remove its directory. Exits 0 when nothing of it is left, including when it
# was already gone or never fully started.
#
# Usage:
#   terminate-builder.sh [INSTANCE_ID [STATE_DIR]]
#
#   INSTANCE_ID  default: $NBA_INSTANCE_ID
#   STATE_DIR    default: $NBA_STATE_DIR; the builder is STATE_DIR/nixbuilder/INSTANCE_ID
#
# As the daemon's local provider hook:
#   terminate_command = "/path/terminate-builder.sh {{quote .InstanceID}} {{quote .StateDir}}"
#
# Environment:
#   NBA_BUILDER_KEEP_DIR=1  stop the processes but keep the directory (logs).
#
# What it stops, each process checked before it is signalled (so a reused pid
# is never hit): the sshd listener (its pid file, and its command line naming
# this builder's sshd_config) and everything below it; every process whose
# environment has NBA_BUILDER_DIR=<builder dir> (the namespace holder,
# nix-daemon sessions); and, for a builder in a network namespace, every
# process in that namespace (while the holder still pins the namespace: a
# dead namespace's number can be reused). SIGTERM, then SIGKILL after 5 s. The veth pair
# disappears with the namespace; if its host end is still there (the same
# interface index as recorded), it is deleted. The host's
# `unreachable 100.64.0.0/16` route that launch adds stays, so connections
# to terminated builders keep failing at once (nixbuilder.Setup removes it
# when its test ends and no builder is left). Exit 1 if something survives.
set -eu
PATH=$PATH:/usr/sbin:/sbin # sshd, ip

prog=terminate-builder
say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
	say "$*"
	exit 1
}

id=${1-${NBA_INSTANCE_ID-}}
state=${2-${NBA_STATE_DIR-}}
keep=${NBA_BUILDER_KEEP_DIR:-0}
unset NBA_BUILDER_DIR # this script and its children are not the builder's

case $id in
'' | . | .. | *[!A-Za-z0-9._-]*) die "bad instance id '$id': want [A-Za-z0-9._-]" ;;
esac
case $state in
/*) ;;
*) die "state directory '$state' is not an absolute path" ;;
esac
[ -d "$state/nixbuilder" ] || exit 0
state=$(cd "$state" && pwd -P)
dir="$state/nixbuilder/$id"
[ -d "$dir" ] || exit 0

# get KEY: a value from builder.env (written by launch), or "".
get() { sed -n "s/^$1=//p" "$dir/builder.env" 2>/dev/null | tail -n 1; }

# alive PID: the process exists and is not a zombie.
alive() {
	[ -r "/proc/$1/stat" ] || return 1
	st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	st=${st##*) }
	[ "${st%% *}" != Z ] && [ "${st%% *}" != X ]
}

netns=$(get netns)
selfns=$(readlink /proc/self/ns/net)
[ "$netns" = "$selfns" ] && netns= # never sweep our own namespace
marker="NBA_BUILDER_DIR=$dir"
listener=
[ -s "$dir/sshd.pid" ] && listener=$(cat "$dir/sshd.pid")
holder=
[ -s "$dir/holder.pid" ] && holder=$(cat "$dir/holder.pid")

# ours: print the pids of this builder's live processes.
ours() {
	# The namespace identifies processes only while our holder keeps it
	# alive: once it is gone, the kernel may give its number to a new one.
	ns=
	if [ -n "$netns" ] && [ -n "$holder" ] && alive "$holder" &&
		grep -qzxF -- "$marker" "/proc/$holder/environ" 2>/dev/null &&
		[ "$(readlink "/proc/$holder/ns/net" 2>/dev/null)" = "$netns" ]; then
		ns=$netns
	fi
	lst=
	if [ -n "$listener" ] && alive "$listener" &&
		tr '\0' ' ' <"/proc/$listener/cmdline" 2>/dev/null | grep -qF -- "$dir/sshd_config"; then
		lst=$listener
	fi
	# Marked by environment, and (while pinned) in the namespace.
	marked=$(grep -lzxF -- "$marker" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | tr "\n" " " || true)
	inns=
	if [ -n "$ns" ]; then
		ino=${ns#net:\[}
		ino=${ino%]}
		inns=$(stat -L -c '%i %n' /proc/[0-9]*/ns/net 2>/dev/null | awk -v i="$ino" '$1 == i { split($2, a, "/"); print a[3] }' | tr "\n" " " || true)
	fi
	# Those, the listener, and the listener's descendants (its sessions and
	# their builds), living and not zombies; never this script.
	cat /proc/[0-9]*/stat 2>/dev/null | awk -v root="$lst" -v self="$$" -v mine="$marked $inns" '
		BEGIN { n = split(mine, m, /[ \n]+/); for (j = 1; j <= n; j++) if (m[j] != "") want[m[j]] = 1 }
		{
			pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " ")
			if (f[1] == "Z" || f[1] == "X" || pid == self) next
			ppid[pid] = f[2]
			if (pid in want) keep[pid] = 1
		}
		END {
			if (root in ppid) keep[root] = 1
			do {
				more = 0
				for (p in ppid) if (!(p in keep) && (ppid[p] in keep)) { keep[p] = 1; more = 1 }
			} while (more)
			for (p in keep) if (p in ppid) print p
		}' || true
}

rounds=3
while [ "$rounds" -gt 0 ]; do
	pids=$(ours | tr '\n' ' ')
	[ -n "${pids% }" ] || break
	say "stopping builder $id: pids $pids"
	# shellcheck disable=SC2086 # a list of pids
	kill -TERM $pids 2>/dev/null || true
	n=50
	while [ "$n" -gt 0 ]; do
		left=
		for p in $pids; do alive "$p" && left="$left $p"; done
		[ -z "$left" ] && break
		sleep 0.1
		n=$((n - 1))
	done
	if [ -n "$left" ]; then
		say "still running after SIGTERM:$left; SIGKILL"
		# shellcheck disable=SC2086 # a list of pids
		kill -KILL $left 2>/dev/null || true
		n=20
		while [ "$n" -gt 0 ]; do
			still=
			for p in $left; do alive "$p" && still="$still $p"; done
			[ -z "$still" ] && break
			sleep 0.1
			n=$((n - 1))
		done
	fi
	rounds=$((rounds - 1))
done
pids=$(ours | tr '\n' ' ')
[ -z "${pids% }" ] || die "builder $id: processes survive: $pids"

# The namespace is gone with its last process, and the veth pair with it
# (asynchronously). Delete the host end only if it is still the one launch
# made (same interface index): the name may already serve a newer builder.
veth=$(get veth)
ifindex=$(get veth_ifindex)
if [ -n "$veth" ] && [ -n "$ifindex" ]; then
	n=30
	while [ "$n" -gt 0 ] && [ "$(cat "/sys/class/net/$veth/ifindex" 2>/dev/null)" = "$ifindex" ]; do
		sleep 0.1
		n=$((n - 1))
	done
	if [ "$(cat "/sys/class/net/$veth/ifindex" 2>/dev/null)" = "$ifindex" ]; then
		ip link del "$veth" || die "cannot delete $veth"
	fi
fi

if [ "$keep" = 1 ]; then
	rm -f "$dir/sshd.pid" "$dir/holder.pid"
	exit 0
fi
# Store paths are read-only; make them writable so rm works without root too.
chmod -R u+w "$dir" 2>/dev/null || true
rm -rf "$dir" || die "cannot remove $dir"
exit 0

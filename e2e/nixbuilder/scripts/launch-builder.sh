#!/bin/sh
# launch-builder.sh: start one real Nix remote builder (an sshd serving a
# private Nix store) for the end-to-end tests, and print its address.
#
# Usage:
#   launch-builder.sh [INSTANCE_ID [STATE_DIR [HOST_KEY [AUTHORIZED_KEYS]]]]
#
#   INSTANCE_ID      the builder's name; [A-Za-z0-9._-] only.
#                    Default: $NBA_INSTANCE_ID.
#   STATE_DIR        absolute directory; the builder lives in
#                    STATE_DIR/nixbuilder/INSTANCE_ID. Default: $NBA_STATE_DIR.
#   HOST_KEY         the sshd host private key, shared by every builder (one
#                    logical host behind HAProxy needs one host key).
#                    Default: $NBA_BUILDER_HOST_KEY.
#   AUTHORIZED_KEYS  the client keys allowed to log in.
#                    Default: $NBA_BUILDER_AUTHORIZED_KEYS.
#
# As the daemon's local provider hooks:
#   launch_command    = "/path/launch-builder.sh {{quote .InstanceID}} {{quote .StateDir}} /path/host_key /path/authorized_keys"
#   terminate_command = "/path/terminate-builder.sh {{quote .InstanceID}} {{quote .StateDir}}"
#
# Other environment:
#   NBA_BUILDER_NETNS  auto (default): as root, and when unshare works, run
#                      sshd in its own network namespace (unshare --net
#                      --mount, nothing under /run/netns) joined to the host by
#                      a veth pair nbabN; the builder gets 100.64.x.y port 22,
#                      the host side the address before it (a /30 per
#                      builder). The host also gets the route
#                      `unreachable 100.64.0.0/16` (if it has no route for
#                      exactly that), so connections to a terminated builder
#                      fail at once and never leave the machine; terminate
#                      leaves it (the Go harness removes it at the end of a
#                      test). Otherwise, or if that fails, listen on
#                      127.0.0.x and a free port. "1" demands a namespace
#                      (failure is an error); "0" never uses one.
#   NBA_BUILDER_WAIT   seconds to wait for sshd to answer with the host key
#                      (default 20).
#
# The last line on stdout is the builder's address host:port; messages go to
# stderr. Nothing started in the background keeps stdout or stderr open.
# Everything needed to stop the builder is recorded in the builder directory
# (builder.env, sshd.pid, holder.pid); terminate-builder.sh undoes a complete
# or partial launch.
#
# The builder: sshd runs with UsePAM no, StrictModes no, key-only login, and a
# ForceCommand wrapper, so a client needs no per-builder settings: whatever it
# asks for, the wrapper runs `nix-daemon --stdio` (ssh-ng://) or
# `nix-store --serve --write` (ssh://) on the store local?root=DIR/root, with
# NIX_CONFIG setting an empty `substituters` and extra-sandbox-paths for
# /bin /lib /lib64 /usr (a chroot store always builds in the sandbox, and
# builders use /bin/sh). Needs: sshd, ssh-keygen, ssh-keyscan, nix-daemon;
# for namespaces also unshare, nsenter, ip.
set -eu
PATH=$PATH:/usr/sbin:/sbin # sshd, ip
umask 022

prog=launch-builder
say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
	say "$*"
	exit 1
}

id=${1-${NBA_INSTANCE_ID-}}
state=${2-${NBA_STATE_DIR-}}
hostkey_src=${3-${NBA_BUILDER_HOST_KEY-}}
authkeys_src=${4-${NBA_BUILDER_AUTHORIZED_KEYS-}}
netns_mode=${NBA_BUILDER_NETNS:-auto}
wait_s=${NBA_BUILDER_WAIT:-20}

case $id in
'' | . | .. | *[!A-Za-z0-9._-]*) die "bad instance id '$id': want [A-Za-z0-9._-]" ;;
esac
case $state in
/*) ;;
*) die "state directory '$state' is not an absolute path" ;;
esac
case $state in
*[!A-Za-z0-9._/+-]*) die "state directory '$state' has characters other than [A-Za-z0-9._/+-]" ;;
esac
[ -n "$hostkey_src" ] || die "no host key: pass it as the third argument or set NBA_BUILDER_HOST_KEY"
[ -r "$hostkey_src" ] || die "cannot read host key $hostkey_src"
[ -n "$authkeys_src" ] || die "no authorized keys: pass them as the fourth argument or set NBA_BUILDER_AUTHORIZED_KEYS"
[ -r "$authkeys_src" ] || die "cannot read authorized keys $authkeys_src"
case $netns_mode in
auto | 0 | 1) ;;
*) die "NBA_BUILDER_NETNS='$netns_mode': want auto, 0 or 1" ;;
esac
case $wait_s in
'' | *[!0-9]*) die "NBA_BUILDER_WAIT='$wait_s': want whole seconds" ;;
esac

sshd=/usr/sbin/sshd
[ -x "$sshd" ] || sshd=$(command -v sshd) || die "sshd not found"
nix_daemon=$(command -v nix-daemon) || die "nix-daemon not found"
nix_store=$(command -v nix-store) || die "nix-store not found"
command -v ssh-keyscan >/dev/null || die "ssh-keyscan not found"
here=$(cd "$(dirname "$0")" && pwd -P)
terminate="$here/terminate-builder.sh"

mkdir -p "$state/nixbuilder"
state=$(cd "$state" && pwd -P)
dir="$state/nixbuilder/$id"
# The namespace holder and the nix-daemon sessions carry NBA_BUILDER_DIR=$dir
# in their environment; terminate finds them by it. (sshd's process title
# overwrites its environment; terminate finds it by its pid file and command
# line.) This script does not carry it, so terminate never stops it.
unset NBA_BUILDER_DIR

if [ -e "$dir" ]; then
	if [ -s "$dir/sshd.pid" ] && pid=$(cat "$dir/sshd.pid") &&
		[ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir/sshd_config"; then
		die "builder $id is already running (sshd pid $pid)"
	fi
	say "clearing leftovers of an earlier builder $id"
	"$terminate" "$id" "$state" >&2 || die "cannot clear leftovers of builder $id"
fi
mkdir -p "$dir"
: >"$dir/builder.env"

ok=
cleanup() {
	if [ -z "$ok" ]; then
		say "launch failed; stopping what it started"
		"$terminate" "$id" "$state" >&2 || true
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

record() { printf '%s=%s\n' "$1" "$2" >>"$dir/builder.env"; }

mkdir -p "$dir/root" "$dir/tmp" "$dir/home" "$dir/etc" "$dir/config"
: >"$dir/etc/nix.conf"
cp "$hostkey_src" "$dir/host_key"
chmod 600 "$dir/host_key"
cp "$authkeys_src" "$dir/authorized_keys"
hostpub=$(ssh-keygen -y -f "$dir/host_key") || die "cannot read the public half of $hostkey_src"
hostpub=$(printf '%s\n' "$hostpub" | cut -d' ' -f1,2)
case ${hostpub%% *} in
ssh-ed25519) keytype=ed25519 ;;
ssh-rsa) keytype=rsa ;;
ecdsa-*) keytype=ecdsa ;;
*) keytype= ;;
esac

sandbox_paths=
for p in /bin /lib /lib64 /usr; do
	[ -e "$p" ] && sandbox_paths="$sandbox_paths $p"
done
build_users=
if [ "$(id -u)" = 0 ] && getent group nixbld >/dev/null 2>&1; then
	# Root builds as the nixbld users; /nix/var/nix/userpool hands them out
	# to every builder on this machine, so builds never share a uid.
	build_users=nixbld
fi

cat >"$dir/nix-wrapper" <<EOF
#!/bin/sh
# sshd's ForceCommand for builder $id: serve its private store.
NBA_BUILDER_DIR='$dir'
HOME='$dir/home'
TMPDIR='$dir/tmp'
NIX_CONF_DIR='$dir/etc'
XDG_CONFIG_HOME='$dir/config'
XDG_CACHE_HOME='$dir/home/.cache'
NIX_CONFIG='store = local?root=$dir/root
substituters =
builders =
build-users-group = $build_users
extra-sandbox-paths =$sandbox_paths'
export NBA_BUILDER_DIR HOME TMPDIR NIX_CONF_DIR XDG_CONFIG_HOME XDG_CACHE_HOME NIX_CONFIG
case \${SSH_ORIGINAL_COMMAND-} in
"nix-store --serve"*) exec '$nix_store' --serve --write ;;
nba-init) exec '$nix_store' --init ;;
*) exec '$nix_daemon' --stdio ;;
esac
EOF
chmod 755 "$dir/nix-wrapper"
# Create the store now: Nix 2.8 races when two first connections create it.
SSH_ORIGINAL_COMMAND=nba-init "$dir/nix-wrapper" </dev/null >&2 || die "cannot create the store in $dir/root"

write_sshd_config() { # listen address
	cat >"$dir/sshd_config" <<EOF
# sshd for Nix builder $id
ListenAddress $1
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
StrictModes no
ForceCommand $dir/nix-wrapper
PermitTTY no
AllowTcpForwarding no
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTunnel no
PermitUserEnvironment no
PrintMotd no
UseDNS no
MaxStartups 100
LogLevel VERBOSE
EOF
}

# rand N: a random number in [0, N).
rand() { echo $(($(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % $1)); }

# wait_sshd HOST PORT: until sshd answers with our host key, bounded by
# NBA_BUILDER_WAIT seconds (0: do not even try).
wait_sshd() {
	deadline=$(($(date +%s) + wait_s))
	while [ "$(date +%s)" -lt "$deadline" ]; do
		if ssh-keyscan -T 2 -p "$2" ${keytype:+-t "$keytype"} "$1" 2>/dev/null | cut -d' ' -f2,3 | grep -qxF -- "$hostpub"; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

# start_sshd [nsenter args...]: start sshd (it binds, then daemonizes) and
# wait for its pid file.
start_sshd() {
	rm -f "$dir/sshd.pid"
	"$@" "$sshd" -f "$dir/sshd_config" -E "$dir/sshd.log" </dev/null >>"$dir/sshd.start.log" 2>&1 || return 1
	n=50
	while [ ! -s "$dir/sshd.pid" ] && [ "$n" -gt 0 ]; do
		sleep 0.1
		n=$((n - 1))
	done
	[ -s "$dir/sshd.pid" ] || return 1
	record sshd_pid "$(cat "$dir/sshd.pid")"
}

# try_netns: sets host and port, or fails leaving what it made recorded.
try_netns() {
	[ "$(id -u)" = 0 ] || {
		say "not root: no network namespace"
		return 1
	}
	for c in unshare nsenter ip; do
		command -v "$c" >/dev/null || {
			say "$c not found: no network namespace"
			return 1
		}
	done
	unshare --net --mount true 2>/dev/null || {
		say "unshare --net --mount does not work here: no network namespace"
		return 1
	}
	# The namespace holder writes its own pid before it becomes unshare, so
	# the pid is on record from its first moment.
	# shellcheck disable=SC2016 # expanded by the inner shell
	NBA_BUILDER_DIR=$dir setsid sh -c 'echo $$ >"$NBA_BUILDER_DIR/holder.pid"; exec unshare --net --mount sleep infinity' \
		</dev/null >/dev/null 2>&1 &
	n=50
	hostns=$(readlink /proc/self/ns/net)
	ns=
	while [ "$n" -gt 0 ]; do
		if [ -s "$dir/holder.pid" ]; then
			holder=$(cat "$dir/holder.pid")
			ns=$(readlink "/proc/$holder/ns/net" 2>/dev/null) || ns=
			[ -n "$ns" ] && [ "$ns" != "$hostns" ] && break
			ns=
		fi
		sleep 0.1
		n=$((n - 1))
	done
	[ -n "$ns" ] || {
		say "namespace holder did not start"
		return 1
	}
	record holder_pid "$holder"
	record netns "$ns"
	# The veth name is the reservation: `ip link add` fails if it exists.
	# Under the lock, also make sure 100.64.0.0/16 is unreachable from the
	# host except through a builder's veth: a connection to a terminated
	# builder fails at once instead of leaving by the default route.
	mkdir -p "$(dirname "$netlock")"
	exec 9>"$netlock"
	flock -w 30 9 || say "cannot lock $netlock; going on without"
	if [ -z "$(ip route show exact "$netrange" 2>/dev/null)" ]; then
		ip route add unreachable "$netrange" 2>"$dir/ip.err" ||
			say "cannot add route unreachable $netrange: $(cat "$dir/ip.err")"
	fi
	i=1
	veth=
	err=
	while [ "$i" -le 16383 ]; do
		if [ ! -e "/sys/class/net/nbab$i" ]; then
			if ip link add "nbab$i" type veth peer name eth0 netns "$holder" 2>"$dir/ip.err"; then
				veth=nbab$i
				break
			fi
			if [ ! -e "/sys/class/net/nbab$i" ]; then
				err="ip link add failed: $(cat "$dir/ip.err")"
				break
			fi
		fi
		i=$((i + 1))
	done
	[ -n "$veth" ] && record veth "$veth"
	exec 9>&-
	[ -n "$veth" ] || {
		say "${err:-no free veth name nbab1..nbab16383}"
		return 1
	}
	record veth_ifindex "$(cat "/sys/class/net/$veth/ifindex")"
	# A /30 per builder in 100.64.0.0/16: .1 the host, .2 the builder.
	b=$((i * 4))
	prefix="100.$((64 + b / 65536)).$((b / 256 % 256))"
	hostip="$prefix.$((b % 256 + 1))"
	host="$prefix.$((b % 256 + 2))"
	port=22
	if ! {
		ip addr add "$hostip/30" dev "$veth" &&
			ip link set "$veth" up &&
			nsenter --target "$holder" --net ip link set lo up &&
			nsenter --target "$holder" --net ip addr add "$host/30" dev eth0 &&
			nsenter --target "$holder" --net ip link set eth0 up &&
			nsenter --target "$holder" --net ip route add default via "$hostip"
	}; then
		say "cannot configure $veth"
		return 1
	fi
	write_sshd_config "$host:$port"
	start_sshd nsenter --target "$holder" --net --mount -- || {
		say "sshd did not start: $(tail -n 5 "$dir/sshd.start.log" "$dir/sshd.log" 2>/dev/null)"
		return 1
	}
	record mode netns
}

try_loopback() {
	tries=20
	while [ "$tries" -gt 0 ]; do
		host="127.0.0.$(($(rand 250) + 2))"
		port=$(($(rand 12000) + 20000)) # below the usual ephemeral range
		write_sshd_config "$host:$port"
		if start_sshd; then
			record mode loopback
			return 0
		fi
		tries=$((tries - 1))
	done
	say "sshd did not start on loopback: $(tail -n 5 "$dir/sshd.start.log" "$dir/sshd.log" 2>/dev/null)"
	return 1
}

mkdir -p /run/sshd 2>/dev/null || true # sshd's privilege separation directory
netrange=100.64.0.0/16
netlock=/run/lock/nba-nixbuilder-net.lock
host=
port=
case $netns_mode in
1) try_netns || die "cannot put builder $id in a network namespace" ;;
auto)
	if ! try_netns; then
		NBA_BUILDER_KEEP_DIR=1 "$terminate" "$id" "$state" >&2 || die "cannot undo the namespace attempt"
		: >"$dir/builder.env"
		try_loopback || exit 1
	fi
	;;
0) try_loopback || exit 1 ;;
esac
record address "$host:$port"

wait_sshd "$host" "$port" || die "sshd at $host:$port did not answer with the host key within ${wait_s}s"
ok=1
say "builder $id: sshd pid $(cat "$dir/sshd.pid") on $host:$port ($(sed -n 's/^mode=//p' "$dir/builder.env"))"
echo "$host:$port"

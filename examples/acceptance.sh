#!/bin/sh
# The scheduler's acceptance scenario, against the system `./dev up` starts.
#
#   1. the scheduler has discovered the three nodes;
#   2. `place hello` starts a real process on one of them;
#   3. kill -9 that node's daemon: the container is placed again elsewhere;
#   4. `evacuate fornax-02` moves every container off fornax-02.
#
# Run it from a second terminal while `./dev up` runs in the first:
#
#   examples/acceptance.sh
#
# FORNAX_SCHED_ADDR (default tcp!127.0.0.1!5640) and FORNAX_STATE (default
# ~/.local/state/fornax-sched/up) say where the system is, if not the default.
set -eu

S=${FORNAX_SCHED_ADDR:-tcp!127.0.0.1!5640}
STATE=${FORNAX_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/fornax-sched/up}
HERE=$(cd "$(dirname "$0")" && pwd)
if command -v fornax-sched >/dev/null 2>&1; then F=fornax-sched; else F=$HERE/../.venv/bin/fornax-sched; fi
WAIT=${FORNAX_WAIT:-60}

say() { printf '\n== %s\n' "$*"; }
ctl() { "$F" 9p write -r "$S" /cluster/scheduler/ctl "$@"; }
rd() { "$F" 9p read "$S" "$1"; }
# field CONTAINER KEY: one key of the first line of a placement file
field() { rd "/cluster/scheduler/placements/$1" | head -1 | tr ' ' '\n' | sed -n "s/^$2=//p"; }
# until SECONDS WHAT COMMAND...: retry COMMAND until it succeeds
until_ok() {
	secs=$1 what=$2; shift 2
	i=0
	while ! "$@" >/dev/null 2>&1; do
		i=$((i + 1))
		if [ "$i" -gt $((secs * 5)) ]; then echo "acceptance: gave up waiting for $what" >&2; exit 1; fi
		sleep 0.2
	done
}
three_online() { [ "$(for n in $("$F" 9p ls "$S" /cluster/nodes); do rd "/cluster/nodes/${n%/}/status"; done | grep -c "^online")" = 3 ]; }

say "1. the scheduler at $S has found three nodes"
until_ok "$WAIT" "three online nodes" three_online
for n in $("$F" 9p ls "$S" /cluster/nodes); do
	echo "${n%/} $(rd "/cluster/nodes/${n%/}/status") $(rd "/cluster/nodes/${n%/}/addr")"
done

say "2. place hello"
reply=$(ctl place hello)
echo "$reply"
name=${reply%% *}
node=$(field "$name" node)
[ "$(field "$name" status)" = running ] || { echo "acceptance: $name is not running" >&2; exit 1; }
naddr=$(rd "/cluster/nodes/$node/addr")
cid=$(rd "/cluster/scheduler/placements/$name" | sed -n 's/^cid=//p')
pid=$("$F" 9p read "$naddr" "/cluster/containers/$cid/status" | sed -n 's/^pid //p')
kill -0 "$pid"
echo "$name runs on $node as container $cid, process $pid: $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-60)..."

say "3. kill -9 the daemon of $node"
kill -9 "$(cat "$STATE/$node/pid")"
moved() { n=$(field "$name" node) && [ "$n" != "$node" ] && [ "$n" != - ] && [ "$(field "$name" status)" = running ]; }
until_ok "$WAIT" "$name to be placed again" moved
echo "$name now: $(rd "/cluster/scheduler/placements/$name" | head -1)"
rd /cluster/scheduler/log | grep -E "node $node dead|re-place $name" | tail -2

say "4. evacuate fornax-02"
ctl place hello replicas=3 name=web
ctl evacuate fornax-02
left=$(rd /cluster/nodes/fornax-02/containers)
[ -z "$left" ] || { echo "acceptance: fornax-02 still has: $left" >&2; exit 1; }
echo "fornax-02: $(rd /cluster/nodes/fornax-02/status), no containers"
for c in $("$F" 9p ls "$S" /cluster/scheduler/placements); do
	echo "$c: $(rd "/cluster/scheduler/placements/$c" | head -1)"
done
say "done: the scenario passed ($node comes back when ./dev up restarts it; the scheduler then stops the old copy of $name there)"

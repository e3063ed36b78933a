"""The Linux kernel's v9fs client driving a real scheduler over real node daemons.

Two fornax-node daemons, a `fornax-sched serve` with both as seeds, and one
boot: the guest mounts the scheduler with 9p2000.L (the Linux default) and
with 9p2000 (uname=root), and on each mount does what a user would from a
shell: list the nodes, place a container by writing ctl and watch it run,
find the decision in the log, get an error for a bad command, leave a
container waiting (unschedulable), replace the policy (and fail to with garbage), and
evacuate the node the container runs on.  Afterwards the host asks the node
daemons themselves what runs where.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import need_binary
from ..node.cluster import NodeProc, alive, eventually, free_port, read, status
from ..sched.harness import SchedProc, fields, placement, running_on
from .qemu import GuestRun, default_cache_dir, run_guest

pytestmark = pytest.mark.vm

MOUNTS = ["L", "p9"]

# Each step prints "@@ MOUNT KEY VALUE"; the host parses those lines.  Mount L
# places hello-1, mount p9 hello-2 (the scheduler counts names up).  Each
# iteration puts back what it changed (uncordon, policy spread), so the second
# one starts from a cluster like the first's.
SCRIPT = r"""
set -u
mkdir -p /mnt/L /mnt/p9
mount -t 9p -o trans=tcp,port=564,version=9p2000.L,msize=8192,aname=/ 10.0.2.100 /mnt/L || exit 10
mount -t 9p -o trans=tcp,port=565,version=9p2000,uname=root,aname=/ 10.0.2.100 /mnt/p9 || exit 11

field() {  # field KEY FILE: the value of KEY=... on the first line of FILE
  head -1 "$2" | tr ' ' '\n' | grep "^$1=" | cut -d= -f2
}
wait_first() {  # wait_first FILE PATTERN: poll FILE's first line until it matches, up to ~10 s
  i=0
  while [ $i -lt 33 ]; do
    case "$(head -1 "$1" 2>/dev/null)" in $2) return 0 ;; esac
    sleep 0.3
    i=$((i + 1))
  done
  return 1
}

K=0
for M in L p9; do
  K=$((K + 1))
  C=/mnt/$M/cluster
  S=$C/scheduler
  echo "@@ $M nodes $(ls $C/nodes | tr '\n' ' ')"
  for NODE in $(ls $C/nodes); do echo "@@ $M status.$NODE $(cat $C/nodes/$NODE/status)"; done
  echo "@@ $M policy-before $(cat $S/policy)"

  # place: the write returns once the node has answered
  echo place hello > $S/ctl; echo "@@ $M place-rc $?"
  P=$S/placements/hello-$K
  echo "@@ $M placements $(ls $S/placements | tr '\n' ' ')"
  echo "@@ $M first-all $(cat $S/placements/* | head -1)"
  wait_first $P '*status=running*'; echo "@@ $M running-rc $?"
  echo "@@ $M running $(head -1 $P)"
  echo "@@ $M cid $(grep '^cid=' $P | cut -d= -f2)"
  NODE=$(field node $P)
  OTHER=$(ls $C/nodes | grep -v -x "$NODE")
  echo "@@ $M node $NODE"
  echo "@@ $M other $OTHER"
  echo "@@ $M log-place $(grep "place hello-$K " $S/log | tail -1)"
  echo "@@ $M log-started $(grep "started hello-$K on " $S/log | tail -1)"
  echo "@@ $M node-containers $(grep "^hello-$K " $C/nodes/$NODE/containers)"

  # the container's output through the scheduler; the listings in one read each
  echo "@@ $M container-log $(head -1 $S/logs/hello-$K)"
  echo "@@ $M status-row $(grep "^hello-$K " $S/status | tr -s ' ')"
  echo "@@ $M nodes-head $(head -1 $S/nodes | tr -s ' ')"
  # tail -f follows the log: a line the scheduler writes later reaches it
  tail -f $S/log > /tmp/tail-$M.txt 2>&1 &
  TP=$!
  sleep 1
  echo place hello name=follow-$M > $S/ctl
  i=0
  while [ $i -lt 30 ] && ! grep -q "place follow-$M " /tmp/tail-$M.txt; do sleep 0.2; i=$((i + 1)); done
  kill $TP
  echo "@@ $M tail-follow $(grep "place follow-$M " /tmp/tail-$M.txt | tail -1)"
  echo remove follow-$M > $S/ctl; echo "@@ $M follow-removed $?"

  # a bad command: an error, and the words are in the log
  ERR=$(echo dance 2>&1 >$S/ctl); echo "@@ $M bad-rc $?"
  echo "@@ $M bad-msg $ERR"
  echo "@@ $M log-refused $(grep "refused 'dance'" $S/log | tail -1)"

  # fits no node: unschedulable, with the reason
  echo place hello cpu=64 name=big-$M > $S/ctl; echo "@@ $M big-rc $?"
  echo "@@ $M big $(head -1 $S/placements/big-$M)"
  echo "@@ $M big-detail $(grep '^detail=' $S/placements/big-$M)"

  # policy: a good one replaces it, garbage is refused and changes nothing
  echo pack > $S/policy; echo "@@ $M pack-rc $?"
  echo "@@ $M policy $(cat $S/policy)"
  ERR=$(echo frobnicate 2>&1 >$S/policy); echo "@@ $M badpolicy-rc $?"
  echo "@@ $M badpolicy-msg $ERR"
  ERR=$(echo 'affinity cpu>>' 2>&1 >$S/policy); echo "@@ $M badpolicy2-rc $?"
  echo "@@ $M policy-after $(cat $S/policy)"

  # evacuate the node hello runs on: it moves to the other one
  echo evacuate $NODE > $S/ctl; echo "@@ $M evac-rc $?"
  wait_first $P "node=$OTHER *status=running*"; echo "@@ $M moved-rc $?"
  echo "@@ $M moved $(head -1 $P)"
  echo "@@ $M evac-status $(cat $C/nodes/$NODE/status)"
  echo "@@ $M evac-containers $(cat $C/nodes/$NODE/containers | wc -l)"
  echo "@@ $M log-cordon $(grep "evacuate $NODE: cordoned" $S/log | tail -1)"
  echo "@@ $M log-evac $(grep "evacuate hello-$K: -> " $S/log | tail -1)"

  # put back what this round changed
  echo uncordon $NODE > $S/ctl; echo "@@ $M uncordon-rc $?"
  echo "@@ $M uncordoned $(cat $C/nodes/$NODE/status)"

  # a Lua program larger than one 9P message (msize 8192 on mount L): written
  # in several messages, it takes effect at the last, short, one
  {
    echo '-- the last node by name that the request fits'
    echo 'function decide(ctx)'
    echo '  for i = #ctx.nodes, 1, -1 do'
    echo '    if fits(ctx.nodes[i], ctx.request) then return ctx.nodes[i].name, "last by name" end'
    echo '  end'
    echo '  return nil, "nothing fits"'
    echo 'end'
    i=0
    while [ $i -lt 400 ]; do echo "-- padding line $i, to make the policy larger than one message"; i=$((i + 1)); done
  } > /tmp/last.lua
  echo "@@ $M lua-size $(wc -c < /tmp/last.lua)"
  cat /tmp/last.lua > $S/policy; echo "@@ $M lua-rc $?"
  echo "@@ $M lua-same $(cat $S/policy | md5sum | cut -c1-32) $(md5sum < /tmp/last.lua | cut -c1-32)"
  echo "@@ $M lua-kind $(grep '^kind ' $S/policy.status)"
  echo "@@ $M lua-compiled $(head -1 $S/policy.lua)"
  echo place hello name=lua-$M > $S/ctl; echo "@@ $M lua-place-rc $?"
  echo "@@ $M lua-placed $(head -1 $S/placements/lua-$M)"
  echo "@@ $M lua-reason $(grep '^reason=' $S/placements/lua-$M)"
  printf 'function decide(ctx)\n  return ctx.nodes[1].gpu.count\nend\n' > /tmp/bad.lua
  ERR=$(cat /tmp/bad.lua 2>&1 > $S/policy); echo "@@ $M lua-bad-rc $?"
  echo "@@ $M lua-version $(grep '^version ' $S/policy.status)"
  echo "@@ $M lua-log-refused $(grep 'policy refused: dry run: line 2' $S/log | tail -1)"
  echo "@@ $M history $(ls $S/history | wc -l)"
  echo spread > $S/policy; echo "@@ $M spread-rc $?"
done
exit 0
"""


@dataclass
class Run:
    sched: SchedProc
    nodes: dict[str, NodeProc]
    guest: GuestRun
    seen: dict[str, dict[str, str]]  # mount -> key -> value
    log: str  # the scheduler's log once the guest is done, for failure messages


async def _both_online(sched: SchedProc, names: list[str]) -> None:
    async def check() -> bool:
        got = [(await read(sched.addr, f"cluster/nodes/{n}/status")).strip() for n in names]
        return got == ["online"] * len(names)

    await eventually(check, timeout=20)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    need_binary("qemu-system-x86_64")
    tmp: Path = tmp_path_factory.mktemp("sched")
    gossip = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    # 4 CPUs each whatever the host has, so cpu=64 fits nowhere
    nodes = [NodeProc(f"fornax-0{i + 1}", free_port(), gossip[i], tmp / f"node{i + 1}",
                      peers=[gossip[1 - i]], extra=["--cpus", "4"]) for i in range(2)]
    sched: SchedProc | None = None
    try:
        for n in nodes:
            n.start()
        # The guest is root: uid 0 on 9p2000.L, uname=root on 9p2000.  Name it a
        # writer, so the test also passes when the host user is not root.
        sched = SchedProc(tmp / "sched", [n.addr for n in nodes], extra=["--writers", "root"]).start()
        asyncio.run(_both_online(sched, [n.name for n in nodes]))
        guest = run_guest(SCRIPT, [("10.0.2.100", 564, sched.port), ("10.0.2.100", 565, sched.port)],
                          cache_dir=default_cache_dir(), timeout=120)
        seen: dict[str, dict[str, str]] = {m: {} for m in MOUNTS}
        for line in guest.output.splitlines():
            if line.startswith("@@ "):
                _, mount, key, *rest = line.split(" ", 3) + [""]
                seen.setdefault(mount, {})[key] = " ".join(rest).strip()
        log = asyncio.run(read(sched.addr, "cluster/scheduler/log"))
        yield Run(sched, {n.name: n for n in nodes}, guest, seen, log)
    finally:
        if sched is not None and sched.proc is not None:
            sched.stop()
        for n in nodes:
            if n.proc is not None:
                n.stop()


def test_script_finished(run: Run) -> None:
    g = run.guest
    assert not g.timed_out and g.returncode == 0, g.output[-4000:]
    assert g.duration < 90, g.duration


@pytest.mark.parametrize("mount", MOUNTS)
def test_shell_drives_the_scheduler(run: Run, mount: str) -> None:
    got = run.seen[mount]
    why = run.guest.output[-4000:] + "\nscheduler log:\n" + run.log[-4000:]
    k = MOUNTS.index(mount) + 1
    name = f"hello-{k}"
    # the nodes, as the scheduler sees them
    assert got["nodes"] == "fornax-01 fornax-02", why
    assert got["status.fornax-01"] == got["status.fornax-02"] == "online", why
    assert got["policy-before"] == "spread", why
    # place
    assert got["place-rc"] == "0", why
    assert name in got["placements"].split(), why
    if mount == "L":  # the only placement so far: cat placements/* starts with it
        assert got["placements"] == "hello-1", why
        first = fields(got["first-all"])
        assert first["image"] == "hello" and first["node"] in run.nodes, why
    assert got["running-rc"] == "0", why
    first = fields(got["running"])
    node, other = got["node"], got["other"]
    assert first == {"node": node, "image": "hello", "status": "running"}, why
    assert {node, other} == set(run.nodes), why
    assert got["cid"] not in ("", "-"), why
    assert f"place {name} (place hello): -> {node}: spread" in got["log-place"], why
    assert f"started {name} on {node} as container {got['cid']}" in got["log-started"], why
    assert got["node-containers"] == f"{name} hello running", why
    # its output, the listings, and a log followed with tail -f
    assert got["container-log"] == f"hello from fornax container {got['cid']}", why
    assert got["status-row"].startswith(f"{name} hello {node} running "), why
    assert got["nodes-head"].startswith("NAME KIND STATUS CPUS"), why
    assert f"place follow-{mount} (place hello name=follow-{mount}): -> " in got["tail-follow"], why
    assert got["follow-removed"] == "0", why
    # a bad command
    assert got["bad-rc"] != "0", why
    if mount == "L":  # 9P2000.L carries only an errno: EINVAL
        assert "Invalid argument" in got["bad-msg"], why
    else:  # 9P2000 carries only the text; the kernel cannot map it and says ESERVERFAULT
        assert "Unknown error 526" in got["bad-msg"], why
    assert "refused 'dance': unknown command 'dance'" in got["log-refused"], why
    # pending
    assert got["big-rc"] == "0", why
    assert fields(got["big"]) == {"node": "-", "image": "hello", "status": "unschedulable"}, why
    assert got["big-detail"].startswith("detail=no node fits cpu>=64"), why
    # policy
    assert got["pack-rc"] == "0" and got["policy"] == "pack", why
    assert got["badpolicy-rc"] != "0" and got["badpolicy2-rc"] != "0", why
    assert ("Invalid argument" if mount == "L" else "Unknown error 526") in got["badpolicy-msg"], why
    assert got["policy-after"] == "pack", why
    # evacuate
    assert got["evac-rc"] == "0", why
    assert got["moved-rc"] == "0", why
    assert fields(got["moved"]) == {"node": other, "image": "hello", "status": "running"}, why
    assert got["evac-status"] == "online cordoned", why
    assert got["evac-containers"] == "0", why
    assert f"evacuate {node}: cordoned" in got["log-cordon"], why
    assert f"evacuate {name}: -> {other}:" in got["log-evac"], why
    assert got["uncordon-rc"] == "0" and got["uncordoned"] == "online", why
    assert got["spread-rc"] == "0", why
    # a Lua policy of several messages
    assert int(got["lua-size"]) > 3 * 8192 and got["lua-rc"] == "0", why
    ours, theirs = got["lua-same"].split()
    assert ours == theirs, why
    assert got["lua-kind"] == "kind lua", why
    assert got["lua-compiled"] == "-- the last node by name that the request fits", why
    assert got["lua-place-rc"] == "0", why
    assert fields(got["lua-placed"])["node"] == "fornax-02", why
    assert got["lua-reason"] == "reason=policy: fornax-02 (last by name)", why
    assert got["lua-bad-rc"] != "0", why
    lua_version = 3 * k - 1  # each round writes pack, the Lua program, spread
    assert got["lua-version"] == f"version {lua_version}" and got["history"] == str(lua_version), why
    assert "policy refused: dry run: line 2: attempt to index a nil value (field 'gpu')" in got["lua-log-refused"], why


def test_legacy_errors_reach_the_kernel_log(run: Run) -> None:
    """Over 9P2000 the server's words travel; the kernel logs the ones it cannot map to an errno."""
    dmesg = "\n".join(run.guest.dmesg_9p)
    assert "unknown command 'dance'" in dmesg, dmesg
    # one line for each of the two policies refused over 9P2000 (the words after the line
    # number depend on the policy language, so only the head is checked)
    refused = [line for line in run.guest.dmesg_9p if "policy refused, the old one stays: line " in line]
    assert len(refused) == 2, dmesg
    assert "cpu>>" in refused[1], dmesg


def test_the_nodes_really_run_it(run: Run) -> None:
    """After the guest is gone: both hellos run, as real processes, on the node evacuation moved them to."""
    final = {f"hello-{MOUNTS.index(m) + 1}": run.seen[m].get("other", "") for m in MOUNTS}

    async def go() -> None:
        runs = {name: await running_on(n) for name, n in run.nodes.items()}
        for cname, home in final.items():
            assert home in run.nodes, run.guest.output[-4000:]
            p = await placement(run.sched.addr, cname)
            assert p["node"] == home and p["status"] == "running", p
            assert [n for n, r in runs.items() if cname in r] == [home], runs
            text = await read(run.nodes[home].addr, f"cluster/containers/{runs[home][cname]}/status")
            st = status(text)
            assert st["state"] == "running" and st["name"] == cname, text
            assert alive(int(st["pid"])), text
        # what no node could take still waits; the policy is what the guest left
        for m in MOUNTS:
            assert (await placement(run.sched.addr, f"big-{m}"))["status"] == "unschedulable"
        assert await read(run.sched.addr, "cluster/scheduler/policy") == "spread\n"

    asyncio.run(go())

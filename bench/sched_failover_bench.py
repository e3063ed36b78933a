"""Failover: from a node's death to all of its containers running on the others.

A real `fornax-sched serve` follows three real fornax-node daemons on
loopback.  With fornax-02 and fornax-03 cordoned, `place hello name=fo
replicas=100` puts all 100 on fornax-01; then both are uncordoned and the
daemon of fornax-01 (its pid only) gets kill -9.  Its containers keep
running, as on a machine cut off from the network: each has a monitor in a
session of its own.  The clock starts at the kill.  The bench then polls the
scheduler's tree: /cluster/nodes/fornax-01/status until `dead`, and
/cluster/nodes/fornax-0[23]/containers until all 100 are there (decided) and
all read `running`.  The scheduler's log gives the same three moments from
its side.  At the end the surviving nodes are asked what they really run.

Runs with `--interval 0.2 --dead 2` (the tests' setting) and, unless
`--quick`, with serve's defaults (`--interval 1 --dead 10`).  The target is
the dead timeout + 2 s.  The peer in the same run: the same 100 containers
started directly on one surviving node by writing `run hello name=...` to
its /cluster/ctl (all 100 in flight on one connection, as the scheduler
does, and one at a time) until every status reads running.

    .venv/bin/python bench/sched_failover_bench.py [--containers N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fornax_sched.fs.client import Client  # noqa: E402
from tests.helpers import drain  # noqa: E402
from tests.node.cluster import NodeProc, eventually, free_port  # noqa: E402
from tests.sched.harness import SchedProc  # noqa: E402

CTL = "cluster/scheduler/ctl"
GROUP = "fo"



async def ctl(c: Client, command: str) -> str:
    return (await c.write_file(CTL, command.encode(), read_reply=True)).decode()


async def read(c: Client, path: str) -> str:
    return (await c.read_file(path)).decode()


def ours_on(text: str) -> dict[str, str]:
    """A node's containers file (NAME IMAGE STATUS lines): our group's names -> status."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0].startswith(GROUP + "-"):
            out[words[0]] = words[2]
    return out


async def node_running(addr: str) -> dict[str, int]:
    """What a node itself says it runs: name -> how many running copies."""
    out: dict[str, int] = {}
    async with await Client.connect(addr, timeout=30) as c:
        for e in await c.ls("cluster/containers"):
            try:
                text = (await c.read_file(f"cluster/containers/{e.name}/status")).decode()
            except Exception:  # noqa: BLE001 - destroyed while we listed
                continue
            kv = dict(line.partition(" ")[::2] for line in text.splitlines())
            if kv.get("state") == "running":
                out[kv.get("name", "")] = out.get(kv.get("name", ""), 0) + 1
    return out


def stamp_to_time(stamp: str) -> float:
    """The scheduler log's UTC stamp (2026-11-24T14:47:20.419Z) as a Unix time."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(frac or 0) / 1000


def from_log(log: str, victim: str, t_kill: float, count: int) -> dict[str, Any]:
    """The scheduler's own account: when it declared the node dead, decided and started the moves."""
    dead_at = None
    replaced: list[float] = []
    started: list[float] = []
    for line in log.splitlines():
        stamp, _, text = line.partition(" ")
        try:
            at = stamp_to_time(stamp)
        except ValueError:
            continue
        if at < t_kill - 1:
            continue
        if text.startswith(f"node {victim} dead"):
            dead_at = at
        elif dead_at is not None and text.startswith(f"re-place {GROUP}-"):
            replaced.append(at)
        elif dead_at is not None and text.startswith(f"started {GROUP}-"):
            started.append(at)

    def rel(t: float | None) -> float | None:
        return round(t - t_kill, 3) if t is not None else None

    return {"dead_at_s": rel(dead_at), "re_placed": len(replaced),
            "all_re_placed_at_s": rel(max(replaced, default=None)), "started": len(started),
            "all_started_at_s": rel(max(started, default=None)) if len(started) >= count else None}


async def failover(sched: SchedProc, nodes: list[NodeProc], count: int, dead: float) -> dict[str, Any]:
    victim, others = nodes[0], nodes[1:]
    async with await Client.connect(sched.addr, timeout=60, version="9P2000.u") as c:
        async def online() -> bool:
            names = sorted(e.name for e in await c.ls("cluster/nodes"))
            st = [(await read(c, f"cluster/nodes/{n}/status")).strip() for n in names]
            return len(names) == len(nodes) and all(s == "online" for s in st)

        await eventually(online, timeout=30, interval=0.05)
        for n in others:
            await ctl(c, f"cordon {n.name}")
        t = time.perf_counter()
        await ctl(c, f"place hello name={GROUP} replicas={count}")

        async def all_on_victim() -> bool:
            on = ours_on(await read(c, f"cluster/nodes/{victim.name}/containers"))
            return len(on) == count and all(s == "running" for s in on.values())

        await eventually(all_on_victim, timeout=60, interval=0.05)
        setup_s = time.perf_counter() - t
        before = await node_running(victim.addr)
        for n in others:
            await ctl(c, f"uncordon {n.name}")
        await asyncio.sleep(max(2 * float(sched.extra[1]), 1.0))  # a few quiet rounds: steady state

        t_kill = time.time()
        victim.kill9()
        t_dead = t_decided = t_running = None
        while True:
            now = time.time() - t_kill
            if now > dead + 60:
                raise RuntimeError(f"failover not done after {now:.0f}s")
            if t_dead is None and (await read(c, f"cluster/nodes/{victim.name}/status")).startswith("dead"):
                t_dead = time.time() - t_kill
            moved: dict[str, str] = {}
            for n in others:
                moved.update(ours_on(await read(c, f"cluster/nodes/{n.name}/containers")))
            if t_decided is None and len(moved) == count:
                t_decided = time.time() - t_kill
            if len(moved) == count and all(s == "running" for s in moved.values()):
                t_running = time.time() - t_kill
                break
            await asyncio.sleep(0.02)
        log = await read(c, "cluster/scheduler/log")
    t = time.perf_counter()
    real: dict[str, int] = {}
    for n in others:
        for name, k in (await node_running(n.addr)).items():
            real[name] = real.get(name, 0) + k
    check_s = time.perf_counter() - t
    ours_names = {k: v for k, v in real.items() if k.startswith(GROUP + "-")}
    return {
        "containers": count, "victim": victim.name,
        "setup": {"place_and_run_on_one_node_s": round(setup_s, 3),
                  "names_running_twice_on_victim_before_kill": sum(1 for v in before.values() if v > 1)},
        "polled": {"detected_dead_at_s": round(t_dead, 3) if t_dead is not None else None,
                   "all_re_placed_decided_at_s": round(t_decided, 3) if t_decided is not None else None,
                   "all_running_at_s": round(t_running, 3)},
        "scheduler_log": from_log(log, victim.name, t_kill, count),
        "nodes_confirm": {"running_on_survivors": len(ours_names),
                          "names_running_twice": sum(1 for v in ours_names.values() if v > 1),
                          "checked_in_s": round(check_s, 2)},
        "kill_to_all_running_s": round(t_running, 3),
        "after_dead_timeout_s": round(t_running - dead, 3),
    }


async def direct_restart(node: NodeProc, count: int, concurrent: bool) -> dict[str, Any]:
    """The peer: the same containers run straight on one node's ctl, until all read running."""
    prefix = "peer-c" if concurrent else "peer-s"
    async with await Client.connect(node.addr, timeout=60, version="9P2000.u") as c:
        async def one(i: int) -> str:
            cid = (await c.write_file("cluster/ctl", f"run hello name={prefix}-{i}".encode(),
                                      read_reply=True)).decode().strip()
            while "state running" not in (await read(c, f"cluster/containers/{cid}/status")):
                await asyncio.sleep(0.005)
            return cid

        t = time.perf_counter()
        if concurrent:
            cids = list(await asyncio.gather(*(one(i) for i in range(count))))
        else:
            cids = [await one(i) for i in range(count)]
        took = time.perf_counter() - t
        for cid in cids:  # not timed
            await c.write_file("cluster/ctl", f"destroy {cid}".encode(), read_reply=True)
    return {"all_running_s": round(took, 3), "per_s": round(count / took, 1)}


def start_cluster(tmp: Path, interval: float, dead: float) -> tuple[SchedProc, list[NodeProc]]:
    nodes: list[NodeProc] = []
    gossip = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for i in range(3):
            n = NodeProc(f"fornax-0{i + 1}", free_port(), gossip[i], tmp / f"node{i + 1}", peers=[gossip[(i + 1) % 3]])
            nodes.append(n)
            n.start()
            drain(n.proc)
        sched = SchedProc(tmp / "sched", [n.addr for n in nodes],
                          extra=["--interval", f"{interval:g}", "--dead", f"{dead:g}"]).start()
        drain(sched.proc)
    except BaseException:
        stop_cluster(None, nodes)
        raise
    return sched, nodes


def answers(addr: str) -> None:
    async def ping() -> None:
        async with await Client.connect(addr, timeout=10) as c:
            await c.read_file("cluster/self/name")

    asyncio.run(ping())


def stop_cluster(sched: SchedProc | None, nodes: list[NodeProc]) -> dict[str, Any]:
    """The scheduler first; a node killed with -9 is started again, adopts what it left running,
    and stops it all at its SIGTERM.

    The restarted node must answer once before the SIGTERM: it prints its
    "serving" line before it installs its SIGTERM handler, and a SIGTERM in
    between kills it at once, leaving its containers running (NodeProc.stop,
    which restarts and terminates straight away, loses that race often).
    """
    out: dict[str, Any] = {}
    if sched is not None and sched.proc is not None:
        sched.stop()
    for n in nodes:
        if n.crashed:
            n.start()
            drain(n.proc)
            answers(n.addr)
        if n.proc is not None:
            out[n.name] = n.stop()
    return out


def leftovers(tmp: str) -> int:
    """Safety net: monitors whose command line names our temp dir (and their containers) still alive
    after the nodes stopped are ended here; returns how many there were."""
    mons = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if tmp.encode() in f.read():
                        mons.append(int(d))
            except OSError:
                continue
    for pid in mons:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        for k in kids:
            with contextlib.suppress(OSError):
                os.killpg(k, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(mons)


def scenario(interval: float, dead: float, count: int, with_peer: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fornax-failover-bench-") as tmp:
        sched, nodes = start_cluster(Path(tmp), interval, dead)
        try:
            out = {"interval_s": interval, "dead_s": dead, **asyncio.run(failover(sched, nodes, count, dead))}
            out["target_s"] = dead + 2
            out["met"] = out["kill_to_all_running_s"] <= dead + 2
            if with_peer:
                survivor = nodes[1]
                out["peer_direct_on_one_node"] = {
                    "node": survivor.name,
                    "concurrent": asyncio.run(direct_restart(survivor, count, True)),
                    "sequential": asyncio.run(direct_restart(survivor, count, False)),
                    "what": f"'run hello name=...' x{count} on one node's /cluster/ctl until all read running",
                }
        finally:
            exits = stop_cluster(sched, nodes)
            time.sleep(0.5)
            left = leftovers(tmp)
        out["cleanup"] = {"node_exit_codes": exits, "leftover_processes_killed": left}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="only --interval 0.2 --dead 2")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    settings = [(0.2, 2.0)] + ([] if args.quick else [(1.0, 10.0)])
    runs = []
    for i, (interval, dead) in enumerate(settings):
        r = scenario(interval, dead, args.containers, with_peer=i == 0)
        p = r["polled"]
        print(f"interval {interval:g} dead {dead:g}: dead at {p['detected_dead_at_s']}s, decided at "
              f"{p['all_re_placed_decided_at_s']}s, all running at {p['all_running_at_s']}s "
              f"(target {dead + 2:g}s)", file=sys.stderr)
        runs.append(r)
    peer = runs[0].pop("peer_direct_on_one_node")
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "what": "kill -9 of the daemon of the node running all N containers; time until all run on the other two",
        "runs": runs,
        "peer_direct_on_one_node": peer,
        "failover_beyond_dead_timeout_vs_direct_restart": [
            {"dead_s": r["dead_s"], "after_dead_timeout_s": r["after_dead_timeout_s"],
             "direct_restart_concurrent_s": peer["concurrent"]["all_running_s"]} for r in runs],
        "target": {f"dead_{r['dead_s']:g}s_plus_2s": r["met"] for r in runs},
    }, indent=2))


if __name__ == "__main__":
    main()

"""Places per second through the Persys bridge against the same nodes over 9P, and an agent's failover.

Three real fornax-node daemons on loopback, each serving its 9P tree and,
with ``--persys``, AgentService.  Two real schedulers follow them, one at a
time: ``persys`` reaches them only through ``--agent`` (gRPC: ApplyWorkload,
then GetWorkloadStatus until running), ``9p`` through ``--node`` (the peer, in
the same run, over the same nodes).  Each place is ``place hello`` written to
the scheduler's ctl over 9P; the reply comes once the container started, and
the placement file is read until ``status=running`` (the ctl measurement of
sched_place_bench.py, whose code this reuses).  Apply-to-running of the
backend alone (``PersysAgent.run``: ApplyWorkload, then GetWorkloadStatus
until RUNNING, one at a time) is measured first.  300 places with 1 writer and
with 8, each phase cleaned up (removed through its scheduler) before the next;
both schedulers do so in each round (``--rounds``, default 3), who goes first
alternating by round, and the ratios' median over the rounds is the figure.

Failover: a scheduler over three agents (``--interval 0.2 --dead 2``); 50
containers placed on one (the other two cordoned meanwhile, then uncordoned);
kill -9 of that node's daemon; the time until all 50 run on the other two.
Target: within the unreachable timeout (``--dead``) + 2 s.

    .venv/bin/python bench/persys_place_bench.py [--places N] [--writers W] [--rounds R] [--failover N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sched_place_bench import Phase, clean, median_ratio, ms, node_containers, nodes_online, ours  # noqa: E402

from fornax_sched.fs.client import Client  # noqa: E402
from fornax_sched.fs.errors import P9Error  # noqa: E402
from fornax_sched.sched.backends import Spec  # noqa: E402
from fornax_sched.sched.backends.persys import PersysAgent  # noqa: E402
from tests.node.cluster import NodeProc, eventually  # noqa: E402
from tests.persys.agentproc import agent_node  # noqa: E402
from tests.sched.harness import SchedProc  # noqa: E402


async def phase(sched: SchedProc, nodes: list[NodeProc], places: int, writers: int, what: str) -> dict[str, Any]:
    assert sched.proc is not None
    pids = {"scheduler": sched.proc.pid, **{n.name: n.proc.pid for n in nodes if n.proc is not None}}
    ph = Phase(pids)
    await ours(sched.addr, "hello", places, writers, ph)
    r = ph.report(places, writers, what)
    await clean(sched.addr, ph.done, [])  # removed through the scheduler (for agents: DeleteWorkload)
    left = 0
    for n in nodes:  # what is still there (none, if every remove went through), destroyed on the node
        for kv in await node_containers(n.addr):
            left += 1
            async with await Client.connect(n.addr, timeout=60) as c:
                try:
                    await c.write_file("cluster/ctl", f"destroy {kv['id']}".encode(), read_reply=True)
                except P9Error:
                    pass  # gone meanwhile
    r["left_on_nodes"] = left
    return r


def scheduler(tmp: Path, label: str, nodes: list[NodeProc], endpoints: list[str], how: str,
              extra: list[str] | None = None) -> SchedProc:
    if how == "persys":
        seeds: list[str] = []
        more = [w for n, e in zip(nodes, endpoints, strict=True)
                for w in ("--agent", f"{e},name={n.name},cpus=64,mem=64G")]
    else:
        seeds, more = [n.addr for n in nodes], []
    return SchedProc(tmp / label, seeds, extra=[*more, "--persys-poll", "1", *(extra or [])]).start()


async def backend_apply(endpoint: str, count: int) -> dict[str, Any]:
    """The backend alone: ``PersysAgent.run`` (ApplyWorkload, then status until RUNNING), one at a time."""
    b = PersysAgent(f"persys!{endpoint}!name=bench")
    lat = []
    try:
        for i in range(count):
            t0 = time.perf_counter()
            await b.run(Spec(f"ap-{i}", "hello").with_revision())
            lat.append(time.perf_counter() - t0)
        for i in range(count):
            await b.destroy(f"ap-{i}")
    finally:
        await b.close()
    return {"runs": count, "apply_to_running": ms(lat)}


async def failover(tmp: Path, count: int) -> dict[str, Any]:
    pairs = [agent_node(tmp / "fo", f"fo-{i + 1}") for i in range(3)]
    nodes = [n for n, _ in pairs]
    sched = None
    try:
        sched = scheduler(tmp, "fo-sched", nodes, [e for _, e in pairs], "persys")
        await nodes_online(sched.addr, 3)
        async with await Client.connect(sched.addr, timeout=60, version="9P2000.u") as c:
            async def ctl(cmd: str) -> str:
                return (await c.write_file("cluster/scheduler/ctl", cmd.encode(), read_reply=True)).decode()

            for n in nodes[1:]:
                await ctl(f"cordon {n.name}")
            ph = Phase({})
            await ours(sched.addr, "hello", count, 8, ph)
            for n in nodes[1:]:
                await ctl(f"uncordon {n.name}")
            victim = nodes[0]
            t0 = time.monotonic()
            victim.kill9()

            async def moved() -> float | None:
                rows = json.loads((await c.read_file("cluster/scheduler/status.json")).decode())["placements"]
                ok = [r for r in rows if r["node"] != victim.name and r["status"] == "running"]
                return time.monotonic() - t0 if len(ok) == count else None

            after = await eventually(moved, timeout=60, interval=0.05)
            log = (await c.read_file("cluster/scheduler/log")).decode()
        dead_at = None
        for line in log.splitlines():
            if f"node {victim.name} dead" in line:
                dead_at = line.split(" ", 1)[0]
        return {"containers": count, "placed_first": len(ph.run_lat), "dead_after_s": 2.0,
                "all_running_elsewhere_after_s": round(after, 2), "target_s": 4.0, "met": after <= 4.0,
                "declared_dead_at": dead_at}
    finally:
        if sched is not None:
            sched.stop()
        for n in nodes:
            n.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="persys-bench-"))
    pairs = [agent_node(tmp, f"node-{i + 1}") for i in range(3)]
    nodes = [n for n, _ in pairs]
    endpoints = [e for _, e in pairs]
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "load_at_start": os.getloadavg()[0]}}
    try:
        out["backend_alone"] = await backend_apply(endpoints[0], min(args.places, 100))
        rounds: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            got: dict[str, Any] = {}
            # who goes first alternates by round, so that a machine getting slower or faster hits both
            for how in (("persys", "9p") if rnd % 2 == 0 else ("9p", "persys")):
                sched = scheduler(tmp, f"sched-{how}-{rnd + 1}", nodes, endpoints, how)
                try:
                    await nodes_online(sched.addr, 3)
                    await phase(sched, nodes, 12, 3, "warm-up")
                    for writers in (1, args.writers):
                        what = ("through AgentService (--agent)" if how == "persys" else "over 9P (--node)")
                        r = got[f"{how}_{writers}w"] = await phase(sched, nodes, args.places, writers, what)
                        print(f"round {rnd + 1} {how} {writers} writers: {r['places_per_s']}/s, write-to-running "
                              f"p50 {r['write_to_running'].get('p50_ms')} ms", file=sys.stderr)
                finally:
                    sched.stop()
            rounds.append(got)
    finally:
        for n in nodes:
            n.stop()
    out["rounds"] = rounds
    for w in (1, args.writers):
        out[f"ratios_{w}w_by_round"], out[f"ratio_{w}w"] = median_ratio(rounds, f"persys_{w}w", f"9p_{w}w")
        for how in ("persys", "9p"):
            out[f"{how}_{w}w_places_per_s_median"] = statistics.median(r[f"{how}_{w}w"]["places_per_s"]
                                                                       for r in rounds)
            out[f"{how}_{w}w_write_to_running_p50_ms_median"] = statistics.median(
                r[f"{how}_{w}w"]["write_to_running"].get("p50_ms", 0.0) for r in rounds)
    out["targets"] = {"ratio_at_least": 0.8, "persys_write_to_running_p50_ms_under": 30}
    if args.failover:
        out["failover"] = await failover(tmp, args.failover)
    out["machine"]["load_at_end"] = os.getloadavg()[0]
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--places", type=int, default=300)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--failover", type=int, default=50, metavar="N", help="containers failed over (0: none)")
    p.add_argument("--rounds", type=int, default=3,
                   help="times both schedulers run their phases, who goes first alternating (default 3)")
    p.add_argument("--quick", action="store_true", help="60 places, failover of 20, 1 round")
    a = p.parse_args()
    if a.quick:
        a.places, a.failover, a.rounds = 60, 20, 1
    print(json.dumps(asyncio.run(main(a)), indent=2))

"""Other clients' 9P read latency while a stalling Lua policy decides a `place replicas=200`.

A real `fornax-sched serve` with three simulated nodes (`--sim-nodes 3`,
which start nothing: so what the readers wait for is the scheduler, not
200 processes starting beside it; `--real-nodes` runs three real
fornax-node daemons instead).  Reader connections (4 by default, each its own 9P connection in
this process) read /cluster/scheduler/ctl and list
/cluster/scheduler/placements in a loop; meanwhile one writer places
`hello replicas=200`.  The peer in the same run is the same with the
built-in `spread` policy; then the policy file gets a Lua policy whose
decide() stalls in one long C call (a pattern match that backtracks far
past the 50 ms deadline, so each decision ends in a kill of its sandbox),
and the same place runs again.  Decisions run on the scheduler's decider
thread, never on the thread that serves 9P, and a command's decisions
share one budget (--decide-budget, 1 s), after which the platform policy
decides the rest.

Prints JSON: per phase the readers' latency (p50, p99, max, count) during
the place, how long the place took to answer, and how many placements the
user's policy and the platform decided.  Targets: under the stalling policy
read p99 under 20 ms and max under 100 ms.

    .venv/bin/python bench/sched_stall_bench.py [--replicas N] [--readers R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fornax_sched.fs.client import Client  # noqa: E402
from tests.helpers import drain, eventually, free_port  # noqa: E402
from tests.node.cluster import NodeProc  # noqa: E402
from tests.sched.harness import SchedProc  # noqa: E402

CTL = "cluster/scheduler/ctl"
STALL = """-- For the containers of group b, decide() spends its time in one C call (a pattern that
-- backtracks), where no hook can stop it.  (Others, the load-time dry run's included, go to the platform.)
function decide(ctx)
  if ctx.container:sub(1, 2) == "b-" then
    string.rep("a", 40):find(".-.-.-.-.-.-.-b")
  end
  return platform.decide(ctx)
end
"""



def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0.0


def lat(xs: list[float]) -> dict[str, float]:
    return {"count": len(xs), "p50_ms": round(pct(xs, 50) * 1e3, 2), "p99_ms": round(pct(xs, 99) * 1e3, 2),
            "max_ms": round(max(xs, default=0.0) * 1e3, 2)}


async def phase(addr: str, name: str, replicas: int, readers: int) -> dict[str, Any]:
    conns = [await Client.connect(addr, timeout=60) for _ in range(readers)]
    writer = await Client.connect(addr, timeout=600, version="9P2000.u")
    samples: list[float] = []
    placing = asyncio.Event()
    done = asyncio.Event()

    async def reader(c: Client, k: int) -> None:
        while not done.is_set():
            t = time.perf_counter()
            if k % 2:
                await c.read_file(CTL)
            else:
                await c.ls("cluster/scheduler/placements")
            if placing.is_set():
                samples.append(time.perf_counter() - t)
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(reader(c, k)) for k, c in enumerate(conns)]
    try:
        await asyncio.sleep(0.3)  # readers running before the place starts
        placing.set()
        t0 = time.perf_counter()
        reply = (await writer.write_file(CTL, f"place hello name={name} replicas={replicas}".encode(),
                                         read_reply=True)).decode()
        took = time.perf_counter() - t0
        placing.clear()
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.close()
    lines = reply.splitlines()
    log = (await writer.read_file("cluster/scheduler/log")).decode()
    await writer.close()
    return {"reads_during_place": lat(samples), "place_answered_after_s": round(took, 3),
            "placed": sum(1 for line in lines if "status=" in line and "node=-" not in line),
            "decided_by_the_policy": sum(1 for line in log.splitlines()
                                         if f"place {name}-" in line and "-> " in line and ": policy:" in line),
            "decided_by_the_platform": sum(1 for line in log.splitlines()
                                           if f"place {name}-" in line and "-> " in line and "platform:" in line),
            "budget_lines": [line.split("Z ", 1)[1] for line in log.splitlines() if "budget" in line][-2:]}


async def remove_group(addr: str, name: str) -> None:
    async with await Client.connect(addr, timeout=600, version="9P2000.u") as c:
        await c.write_file(CTL, f"scale {name} 0".encode(), read_reply=True)

        async def gone() -> bool:
            return not [e for e in await c.ls("cluster/scheduler/placements") if e.name.startswith(name)]

        await eventually(gone, 120)


async def run_all(sched: SchedProc, args: argparse.Namespace) -> dict[str, Any]:
    async def online() -> bool:
        async with await Client.connect(sched.addr, timeout=10) as c:
            return (await c.read_file(CTL)).decode().startswith("nodes 3 online 3")

    await eventually(online, 30)
    out: dict[str, Any] = {}
    out["spread"] = await phase(sched.addr, "a", args.replicas, args.readers)
    await remove_group(sched.addr, "a")
    async with await Client.connect(sched.addr, timeout=60, version="9P2000.u") as c:
        await c.write_file("cluster/scheduler/policy", STALL.encode())
    out["stalling_lua"] = await phase(sched.addr, "b", args.replicas, args.readers)
    await remove_group(sched.addr, "b")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=200)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--budget", default="1", help="the scheduler's --decide-budget")
    ap.add_argument("--real-nodes", action="store_true",
                    help="three real fornax-nodes instead of the scheduler's simulated ones (then 200 processes "
                         "start during each place, and their start-up load is in the readers' latency too)")
    args = ap.parse_args()
    nodes: list[NodeProc] = []
    sched: SchedProc | None = None
    with tempfile.TemporaryDirectory(prefix="fornax-stall-bench-") as tmp:
        try:
            if args.real_nodes:
                gossip = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
                for i in range(3):
                    n = NodeProc(f"fornax-0{i + 1}", free_port(), gossip[i], Path(tmp) / f"node{i + 1}",
                                 peers=[gossip[(i + 1) % 3]])
                    nodes.append(n)
                    n.start()
                    drain(n.proc)
            sim = [] if args.real_nodes else ["--sim-nodes", "3"]
            sched = SchedProc(Path(tmp) / "sched", [n.addr for n in nodes],
                              extra=["--interval", "1", "--dead", "10", "--decide-budget", args.budget, *sim]).start()
            drain(sched.proc)
            results = asyncio.run(run_all(sched, args))
        finally:
            if sched is not None:
                sched.stop()
            for n in nodes:
                n.stop()
    stall = results["stalling_lua"]["reads_during_place"]
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "replicas": args.replicas, "readers": args.readers, "decide_budget_s": float(args.budget), **results,
        "target": {"stalling_read_p99_under_20_ms": stall["p99_ms"] < 20,
                   "stalling_read_max_under_100_ms": stall["max_ms"] < 100},
    }, indent=2))


if __name__ == "__main__":
    main()

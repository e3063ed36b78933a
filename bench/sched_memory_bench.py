"""Scheduler memory with 10,000 nodes and 100,000 placements, and the time to load them at restart.

Every measurement runs in a fresh process of its own (this script with
`--worker`), which reports its resident set (VmRSS, after a gc) before and
after it builds its state, and its peak (ru_maxrss).  Nodes are simulated:
the scheduler's `connect=` gives it an in-process backend that answers at
once (info, run, an empty or a consistent container list); no sockets.
The scheduler keeps two copies of its state (the one the files show and
the decider's), both counted.

1. live: an in-process Scheduler over a fresh SQLite store learns the
   nodes (each a --node seed), then carries out `place hello name=gN
   replicas=10 cpu=0.25 mem=64M` (every 4th also `disk=ssd`, which a third
   of the nodes carry) until all placements run: one ctl command each, as
   the ctl file would, without the 9P server.  Gives the memory of a
   scheduler that did the work, and the in-process places per second.
2. restart: a new Scheduler on that store.  `start()` loads every node and
   placement (timed); then every node answers and lists what the store says
   it runs, and the scheduler reconciles each once (timed).
3. peers, from the same store: the rows decoded into plain Python dicts
   (what the data costs as dicts), and the pure core (Cluster) holding the
   same nodes and placements (what the deciding state costs).

Prints JSON.  Target: the scheduler under 500 MB with 10,000 nodes and
100,000 placements.

    .venv/bin/python bench/sched_memory_bench.py [--nodes N] [--placements P] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

G, M = 1 << 30, 1 << 20
REPLICAS = 10  # per place command


def rss_mb() -> float:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_name(i: int) -> str:
    return f"node-{i:05d}"


# ------------------------------------------------------------------ simulated nodes
class LeanSim:
    """A node that answers at once; its container list is read off the scheduler's own state
    (what it placed there, running under the id it was given), so the simulation holds no copy
    and what is measured is the scheduler.  (sched.backends.sim keeps a copy: fine for tests.)"""

    kind = "sim"

    def __init__(self, addr: str, world: dict[str, Any]) -> None:
        self.addr = addr
        self.name = addr.rpartition("!")[2]
        self.world = world
        self.next = 0
        self.listed = 0

    async def info(self) -> Any:
        from fornax_sched.sched.backends import NodeInfo

        i = int(self.name.rpartition("-")[2])
        labels = {"disk": "ssd"} if i % 3 == 0 else {}
        return NodeInfo(f"{i:08x}", self.name, self.addr, 8, 16 * G, 16 * G, labels, ("hello",), "sim")

    async def health(self) -> Any:
        from fornax_sched.sched.backends import Health

        return Health(True)

    async def run(self, spec: Any) -> str:
        self.next += 1
        return str(self.next)

    async def stop(self, cid: str) -> None:
        return None

    async def destroy(self, cid: str) -> None:
        return None

    async def status(self, cid: str) -> Any:
        from fornax_sched.sched.backends import NoSuchContainer

        raise NoSuchContainer(cid)

    async def list(self) -> list[Any]:
        from fornax_sched.sched.backends import CLUSTER_LABEL, ContainerInfo

        self.listed += 1
        self.world["listed"] += 1
        sched = self.world.get("sched")
        if sched is None or self.name not in sched.state.cluster.nodes:
            return []
        mark = {CLUSTER_LABEL: sched.store.cluster}
        return [ContainerInfo(sched.state.records[c].cid or "0", c, "hello", "running", labels=mark)
                for c in sched.state.cluster.nodes[self.name].containers]

    async def close(self) -> None:
        return None


def make_connect(world: dict[str, Any]) -> Any:
    return lambda addr: LeanSim(addr, world)


async def until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done within {timeout:.0f}s")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ workers
async def w_live(db: Path, nodes: int, placements: int) -> dict[str, Any]:
    from fornax_sched.sched.service import Scheduler
    from fornax_sched.sched.store import open_store

    base = rss_mb()
    world: dict[str, Any] = {"listed": 0}
    store = await open_store(str(db))
    # A long interval: each node's reconciler makes its first round, then stays quiet while we place.
    sched = Scheduler(store, seeds=[f"sim!{node_name(i)}" for i in range(nodes)], interval=3600,
                      dead_after=7200, connect=make_connect(world))
    t = time.perf_counter()
    await sched.start()
    world["sched"] = sched
    await until(lambda: sum(n.status == "online" for n in sched.state.cluster.nodes.values()) == nodes,
                "nodes online", 600)
    nodes_s = time.perf_counter() - t
    commands = placements // REPLICAS
    marks = []
    t = time.perf_counter()
    for i in range(commands):
        extra = " disk=ssd" if i % 4 == 0 else ""
        reply = await sched.command(f"place hello name=g{i} replicas={REPLICAS} cpu=0.25 mem=64M{extra}")
        if "status=running" not in reply:
            raise RuntimeError(f"place g{i}: {reply[:200]}")
        if (i + 1) % max(commands // 10, 1) == 0:
            marks.append(time.perf_counter() - t)
    place_s = time.perf_counter() - t
    await sched.decider.barrier()  # the decider's copy holds every placement too
    statuses: dict[str, int] = {}
    for r in sched.state.records.values():
        statuses[r.status] = statuses.get(r.status, 0) + 1
    after = rss_mb()
    sizes = {"records": len(sched.state.records), "placements": len(sched.state.cluster.placements),
             "decider_placements": len(sched.decider.state.cluster.placements),
             "acted": len(sched._acted), "busy": len(sched._busy), "log_lines_in_memory": len(sched.book.tail(10**6)),
             "tasks": len(asyncio.all_tasks())}
    await sched.close()
    await store.close()
    tenth = [round(b - a, 3) for a, b in zip([0.0, *marks[:-1]], marks, strict=True)]
    return {"rss_before_mb": round(base, 1), "rss_after_mb": round(after, 1), "delta_mb": round(after - base, 1),
            "peak_mb": round(peak_mb(), 1), "statuses": statuses, "sizes": sizes,
            "nodes_online_s": round(nodes_s, 2), "place_s": round(place_s, 2),
            "places_per_s": round(placements / place_s), "seconds_per_tenth_of_the_places": tenth}


async def w_restart(db: Path, nodes: int, placements: int) -> dict[str, Any]:
    from fornax_sched.sched.service import Scheduler
    from fornax_sched.sched.store import open_store

    base = rss_mb()
    world: dict[str, Any] = {"listed": 0}
    t = time.perf_counter()
    store = await open_store(str(db))
    sched = Scheduler(store, interval=3600, dead_after=7200, connect=make_connect(world))
    world["sched"] = sched
    await sched.start()  # loads the store; the reconcilers have not run yet
    load_s = time.perf_counter() - t
    loaded = rss_mb()
    if len(sched.state.records) != placements or len(sched.state.cluster.nodes) != nodes:
        raise RuntimeError(f"loaded {len(sched.state.records)} placements, {len(sched.state.cluster.nodes)} nodes")
    t = time.perf_counter()
    await until(lambda: world["listed"] >= nodes
                and sum(n.status == "online" for n in sched.state.cluster.nodes.values()) == nodes,
                "nodes online and reconciled", 600)
    await asyncio.sleep(0.5)  # the last rounds finish their reconcile
    online_s = time.perf_counter() - t
    statuses: dict[str, int] = {}
    for r in sched.state.records.values():
        statuses[r.status] = statuses.get(r.status, 0) + 1
    after = rss_mb()
    await sched.close()
    await store.close()
    return {"rss_before_mb": round(base, 1), "rss_loaded_mb": round(loaded, 1),
            "rss_online_mb": round(after, 1), "delta_mb": round(after - base, 1), "peak_mb": round(peak_mb(), 1),
            "load_s": round(load_s, 2), "all_online_and_reconciled_s": round(online_s, 2), "statuses": statuses}


async def w_dicts(db: Path, nodes: int, placements: int) -> dict[str, Any]:
    from fornax_sched.sched.store import open_store

    base = rss_mb()
    store = await open_store(str(db))
    t = time.perf_counter()
    data = {t_: await store.load(t_) for t_ in ("nodes", "placements", "meta")}
    log = await store.log_tail(10_000)
    load_s = time.perf_counter() - t
    await store.close()
    after = rss_mb()
    assert len(data["placements"]) == placements and len(data["nodes"]) == nodes and log
    return {"rss_before_mb": round(base, 1), "rss_after_mb": round(after, 1), "delta_mb": round(after - base, 1),
            "peak_mb": round(peak_mb(), 1), "load_s": round(load_s, 2),
            "what": "the store's rows decoded (json) into plain dicts, and the last 10,000 log lines"}


async def w_core(db: Path, nodes: int, placements: int) -> dict[str, Any]:
    from fornax_sched.sched.core import Cluster
    from fornax_sched.sched.model import NodeFacts
    from fornax_sched.sched.state import request_from_json
    from fornax_sched.sched.store import open_store

    base = rss_mb()
    store = await open_store(str(db))
    rows_n = await store.load("nodes")
    rows_p = await store.load("placements")
    await store.close()
    rows = rss_mb()
    t = time.perf_counter()
    c = Cluster()
    for name, d in rows_n.items():
        c.add_node(NodeFacts(name, d["cpus"], d["mem"], dict(d.get("labels", {}))))
    for name, d in rows_p.items():
        c.add(name, request_from_json(d["request"]))
        c.assign(name, d["node"], d.get("reason", ""), force=True)
    build_s = time.perf_counter() - t
    built = rss_mb()
    del rows_n, rows_p, d
    after = rss_mb()
    assert len(c.placements) == placements
    return {"rss_before_mb": round(base, 1), "rss_rows_loaded_mb": round(rows, 1), "rss_built_mb": round(built, 1),
            "rss_rows_dropped_mb": round(after, 1), "delta_mb": round(after - base, 1),
            "core_alone_mb": round(built - rows, 1), "peak_mb": round(peak_mb(), 1), "build_s": round(build_s, 2),
            "what": "the pure core (Cluster) built from the store's rows as the scheduler's load does: "
                    "NodeFacts, a Request and a Placement per container, the index; core_alone_mb is "
                    "its growth while the rows were still held, delta_mb after they were dropped"}


class Silent:
    """A node that never answers: the scheduler stays as start() left it."""

    def __init__(self, addr: str) -> None:
        self.addr = self.name = addr

    async def info(self) -> Any:
        await asyncio.Event().wait()

    async def list(self) -> list[Any]:
        await asyncio.Event().wait()
        return []

    async def close(self) -> None:
        return None


async def w_traced(db: Path, nodes: int, placements: int) -> dict[str, Any]:
    """The restart's load under tracemalloc: live Python objects against the peak, and by whom."""
    import tracemalloc

    from fornax_sched.sched.service import Scheduler
    from fornax_sched.sched.store import open_store

    tracemalloc.start()
    store = await open_store(str(db))
    sched = Scheduler(store, interval=3600, dead_after=7200, connect=Silent)
    await sched.start()
    await asyncio.sleep(0.2)
    gc.collect()
    now, peak = tracemalloc.get_traced_memory()
    top = tracemalloc.take_snapshot().statistics("lineno")[:8]
    await sched.close()
    await store.close()
    sites = [{"mb": round(st.size / M, 1), "blocks": st.count,
              "at": f"{Path(st.traceback[0].filename).name}:{st.traceback[0].lineno}"} for st in top]
    return {"python_objects_after_load_mb": round(now / M, 1), "python_peak_during_load_mb": round(peak / M, 1),
            "top_sites": sites,
            "what": "tracemalloc over Scheduler.start() on the same store (its RSS is not comparable: "
                    "tracemalloc's own records inflate it)"}


WORKERS = {"live": w_live, "restart": w_restart, "traced": w_traced, "dicts": w_dicts, "core": w_core}


def worker(mode: str, db: Path, nodes: int, placements: int) -> None:
    # Everything the scheduler imports, before the baseline is taken.
    import fornax_sched.sched.backends  # noqa: F401
    import fornax_sched.sched.core  # noqa: F401
    import fornax_sched.sched.service  # noqa: F401
    import fornax_sched.sched.store  # noqa: F401

    print(json.dumps(asyncio.run(WORKERS[mode](db, nodes, placements))), flush=True)


def run_worker(mode: str, db: Path, nodes: int, placements: int) -> dict[str, Any]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--db", str(db), "--nodes", str(nodes),
                          "--placements", str(placements)], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"worker {mode} failed ({out.returncode}): {out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{mode:<8} {time.perf_counter() - t:6.1f}s  {res}", file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--placements", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="1,000 nodes and 10,000 placements")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.db, args.nodes, args.placements)
        return
    if args.quick:
        args.nodes, args.placements = 1000, 10_000
    with tempfile.TemporaryDirectory(prefix="fornax-memory-bench-") as tmp:
        db = Path(tmp) / "sched.db"
        live = run_worker("live", db, args.nodes, args.placements)
        db_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / M
        restart = run_worker("restart", db, args.nodes, args.placements)
        traced = run_worker("traced", db, args.nodes, args.placements)
        dicts = run_worker("dicts", db, args.nodes, args.placements)
        core = run_worker("core", db, args.nodes, args.placements)
    worst = max(live["rss_after_mb"], live["peak_mb"], restart["rss_online_mb"], restart["peak_mb"])
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "nodes": args.nodes, "placements": args.placements,
        "store_files_mb": round(db_mb, 1),
        "scheduler_live": live,
        "scheduler_restart": restart,
        "scheduler_restart_python_objects": traced,
        "peer_plain_dicts": dicts,
        "peer_pure_core": core,
        "scheduler_over_core_delta": round(restart["delta_mb"] / core["delta_mb"], 2) if core["delta_mb"] else None,
        "target": {"scheduler_under_500_mb": worst < 500, "worst_rss_or_peak_mb": round(worst, 1)},
    }, indent=2))


if __name__ == "__main__":
    main()

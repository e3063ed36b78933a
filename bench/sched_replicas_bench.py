"""The scheduler on etcd, in one run: places per second against SQLite, leader failover, memory.

1. places: `place hello` written to the scheduler's ctl over 9P until the
   placement reads `status=running`, three real fornax-nodes behind it (the
   same three for every store), with 1 writer and with 8 (each its own 9P
   connection): on SQLite (serve's default, every commit fsynced), on one
   etcd member and on a cluster of three (one scheduler on each, leading).
   Target: etcd with 8 writers at least 0.7x SQLite with 8.
2. failover: two `serve` replicas on one etcd member (`--sim-nodes 3`,
   serve's default lease of 5 s); kill -9 of the leader, then `place`
   written to the other every 50 ms until one is acknowledged (by the new
   leader); the killed one started again as a follower; 10 kills.  Target:
   p50 under TTL + 1 s.
3. memory: a leader and a follower on one etcd member, each a process of
   its own (Scheduler and Replica in process, nodes simulated in process as
   in sched_memory_bench.py): the leader learns 10,000 nodes and carries out
   100,000 placements (`place ... replicas=10`), the follower keeps up
   through its watch; VmRSS and peak of each once the follower holds them
   all.  Target: under 250 MB each.

Prints JSON.  Run it on a quiet machine (`uptime` load under 2).

    .venv/bin/python bench/sched_replicas_bench.py [--quick] [--only places|failover|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sched_place_bench import Phase, clean, duplicates, nodes_online, ours  # noqa: E402
from fornax_sched.fs.client import Client  # noqa: E402
from fornax_sched.fs.errors import P9Error  # noqa: E402
from tests.etcd_cluster import EtcdCluster  # noqa: E402
from tests.helpers import drain  # noqa: E402
from tests.node.cluster import NodeProc, free_port, read  # noqa: E402
from tests.sched.harness import SchedProc  # noqa: E402

TTL = 5.0  # serve's default lease


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------ 1. places
async def places_on(sched: SchedProc, nodes: list[NodeProc], places: int) -> dict[str, Any]:
    await nodes_online(sched.addr, len(nodes))
    addrs = [n.addr for n in nodes]
    assert sched.proc is not None
    pids = {"scheduler": sched.proc.pid, **{n.name: n.proc.pid for n in nodes if n.proc is not None}}
    warm = Phase(pids)
    await ours(sched.addr, "hello", 12, 3, warm)
    await clean(sched.addr, warm.done, addrs)
    out: dict[str, Any] = {}
    for writers in (1, 8):
        ph = Phase(pids)
        await ours(sched.addr, "hello", places, writers, ph)
        r = ph.report(places, writers, "ctl 'place' until the placement reads running")
        r["names_running_twice"] = len(await duplicates(addrs))
        r["left_on_nodes_after_remove"] = await clean(sched.addr, ph.done, addrs)
        out[f"writers_{writers}"] = r
        print(f"  {writers} writers: {r['places_per_s']}/s, ctl p50 {r['ctl_write'].get('p50_ms')} ms, "
              f"errors {r['errors']}", file=sys.stderr)
    return out


def bench_places(tmp: Path, places: int) -> dict[str, Any]:
    nodes: list[NodeProc] = []
    clusters: list[EtcdCluster] = []
    out: dict[str, Any] = {}
    try:
        gossip = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
        for i in range(3):
            n = NodeProc(f"fornax-0{i + 1}", free_port(), gossip[i], tmp / f"node{i + 1}", peers=[gossip[(i + 1) % 3]])
            nodes.append(n)
            n.start()
            drain(n.proc)
        for label, members in (("sqlite", 0), ("etcd_1_member", 1), ("etcd_3_members", 3)):
            extra = ["--interval", "1", "--dead", "10"]
            if members:
                c = EtcdCluster(tmp / f"etcd{members}", members=members)
                clusters.append(c)
                c.start()
                extra += ["--store", c.spec("bench", timeout=10)]
            print(f"places on {label}", file=sys.stderr)
            sched = SchedProc(tmp / f"sched-{label}", [n.addr for n in nodes], extra=extra).start()
            try:
                out[label] = asyncio.run(places_on(sched, nodes, places))
            finally:
                sched.stop()
    finally:
        for n in nodes:
            if n.proc is not None:
                n.stop()
        for c in clusters:
            c.close()
    return out


# ------------------------------------------------------------------ 2. failover
async def _leader(procs: list[SchedProc], timeout: float = 30.0) -> SchedProc:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            try:
                if "(this replica)" in await read(p.addr, "cluster/scheduler/ctl"):
                    return p
            except (OSError, P9Error, ConnectionError, TimeoutError):
                pass
        await asyncio.sleep(0.05)
    raise RuntimeError("no replica leads")


async def _place_until_acknowledged(addr: str, name: str, timeout: float = 60.0) -> tuple[float, int]:
    t0 = time.monotonic()
    tries = 0
    while time.monotonic() - t0 < timeout:
        tries += 1
        try:
            async with await Client.connect(addr, timeout=5, version="9P2000.u") as c:
                reply = (await c.write_file("cluster/scheduler/ctl", f"place hello name={name}".encode(),
                                            read_reply=True)).decode()
            if reply.startswith(f"{name} node="):
                return time.monotonic() - t0, tries
        except (OSError, P9Error, ConnectionError, TimeoutError, EOFError):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{name}: not acknowledged within {timeout}s")


def bench_failover(tmp: Path, kills: int) -> dict[str, Any]:
    cluster = EtcdCluster(tmp / "etcd-failover", members=1)
    cluster.start()
    spec = cluster.spec("failover", timeout=5)
    extra = ["--store", spec, "--sim-nodes", "3"]  # serve's default lease (5 s)
    procs = [SchedProc(tmp / f"replica{i}", [], extra=extra).start() for i in range(2)]
    times: list[float] = []
    tries: list[int] = []
    try:
        for k in range(kills):
            lead = asyncio.run(_leader(procs))
            other = next(p for p in procs if p is not lead)
            asyncio.run(_place_until_acknowledged(other.addr, f"warm{k}"))  # the follower forwards
            lead.kill9()
            took, n = asyncio.run(_place_until_acknowledged(other.addr, f"after{k}"))
            times.append(took)
            tries.append(n)
            print(f"  kill {k + 1}: first place acknowledged by the new leader after {took:.2f}s", file=sys.stderr)
            lead.start()  # back, as a follower
    finally:
        for p in procs:
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
        cluster.close()
    return {"kills": kills, "lease_ttl_s": TTL,
            "kill_to_first_ack_s": {"p50": round(pct(times, 50), 2), "p90": round(pct(times, 90), 2),
                                    "max": round(max(times), 2), "mean": round(statistics.fmean(times), 2),
                                    "all": [round(t, 2) for t in times]},
            "writes_tried_per_kill": tries,
            "target_p50_under_ttl_plus_1s": pct(times, 50) < TTL + 1}


# ------------------------------------------------------------------ 3. memory
def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def w_memory(role: str, spec: str, nodes: int, placements: int, advertise: str) -> dict[str, Any]:
    import gc
    import resource

    from bench.sched_memory_bench import REPLICAS, make_connect, node_name
    from fornax_sched.sched.plans import CommandError
    from fornax_sched.sched.replicas import Replica
    from fornax_sched.sched.service import Scheduler
    from fornax_sched.sched.store import open_store

    base = rss_mb()
    world: dict[str, Any] = {"listed": 0}
    store = await open_store(spec)
    seeds = [f"sim!{node_name(i)}" for i in range(nodes)] if role == "leader" else []
    sched = Scheduler(store, seeds=seeds, interval=3600, dead_after=7200, connect=make_connect(world))
    world["sched"] = sched
    await sched.start(lead=False)
    replica = Replica(sched, advertise, ttl=TTL)
    await replica.start()
    t = time.perf_counter()
    if role == "leader":
        while not sched.leading:
            await asyncio.sleep(0.05)
        print("leading", flush=True)
        while sum(n.status == "online" for n in sched.state.cluster.nodes.values()) < nodes:
            await asyncio.sleep(0.05)
        refused = 0
        for i in range(placements // REPLICAS):
            extra = " disk=ssd" if i % 4 == 0 else ""
            while True:  # (this measures memory: a place refused while the store looked away is tried again)
                try:
                    reply = await sched.command(f"place hello name=g{i} replicas={REPLICAS} cpu=0.25 mem=64M{extra}")
                    break
                except CommandError as e:
                    if "changes are refused until the store is back" not in str(e) or refused >= 100:
                        raise
                    refused += 1
                    await asyncio.sleep(0.5)
            if "status=running" not in reply:
                raise RuntimeError(f"place g{i}: {reply[:200]}")
        world["refused_while_degraded"] = refused
        await sched.decider.barrier()
        # Wait for the follower's word that it holds them all (a file beside the store's spec).
        done = Path(os.environ["FORNAX_BENCH_DONE"])
        while not done.exists():
            await asyncio.sleep(0.1)
    else:
        print("following", flush=True)
        while len(sched.state.records) < placements or len(sched.state.cluster.nodes) < nodes:
            await asyncio.sleep(0.1)
        await sched.decider.barrier()
        Path(os.environ["FORNAX_BENCH_DONE"]).write_text("ok")
    took = time.perf_counter() - t
    gc.collect()
    after = rss_mb()
    sizes = {"records": len(sched.state.records), "nodes": len(sched.state.cluster.nodes),
             "decider_placements": len(sched.decider.state.cluster.placements), "leading": sched.leading}
    await replica.close()
    await sched.close()
    await store.close()
    return {"role": role, "rss_before_mb": round(base, 1), "rss_after_mb": round(after, 1),
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(took, 1), "sizes": sizes,
            "places_refused_while_degraded": world.get("refused_while_degraded", 0)}


def bench_memory(tmp: Path, nodes: int, placements: int) -> dict[str, Any]:
    cluster = EtcdCluster(tmp / "etcd-memory", members=1)
    cluster.start()
    spec = cluster.spec("memory", timeout=30)
    env = {**os.environ, "FORNAX_BENCH_DONE": str(tmp / "follower-done")}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for role in ("leader", "follower"):
            p = subprocess.Popen([sys.executable, __file__, "--worker", role, "--spec", spec, "--nodes", str(nodes),
                                  "--placements", str(placements), "--advertise", f"bench-{role}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs[role] = p
            assert p.stdout is not None
            line = p.stdout.readline()  # "leading" / "following"
            if not line.strip():
                raise RuntimeError(f"{role} did not start: {p.stderr.read() if p.stderr else ''}")
        out = {}
        for role, p in procs.items():
            stdout, stderr = p.communicate(timeout=7200)
            if p.returncode != 0:
                raise RuntimeError(f"{role} failed ({p.returncode}): {stderr[-3000:]}")
            out[role] = json.loads(stdout.strip().splitlines()[-1])
            print(f"  {role}: {out[role]}", file=sys.stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        cluster.close()
    worst = max(max(r["rss_after_mb"], r["peak_mb"]) for r in out.values())
    return {"nodes": nodes, "placements": placements, **out,
            "target_under_250_mb_each": worst < 250, "worst_rss_or_peak_mb": round(worst, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--places", type=int, default=300)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--placements", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="60 places, 3 kills, 1,000 nodes and 10,000 placements")
    ap.add_argument("--only", choices=("places", "failover", "memory"), action="append")
    ap.add_argument("--worker", choices=("leader", "follower"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--advertise", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = asyncio.run(w_memory(args.worker, args.spec, args.nodes, args.placements, args.advertise))
        print(json.dumps(res), flush=True)
        return
    if args.quick:
        args.places, args.kills, args.nodes, args.placements = 60, 3, 1000, 10_000
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    only = set(args.only or ("places", "failover", "memory"))
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "load_at_start": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="fornax-replicas-bench-") as tmp:
        if "places" in only:
            p = result["places"] = bench_places(Path(tmp), args.places)
            sq, e1, e3 = (p[k]["writers_8"]["places_per_s"] for k in ("sqlite", "etcd_1_member", "etcd_3_members"))
            p["ratio_etcd_1_over_sqlite_8_writers"] = round(e1 / sq, 2) if sq else None
            p["ratio_etcd_3_over_sqlite_8_writers"] = round(e3 / sq, 2) if sq else None
            p["target_etcd_8_writers_at_least_0.7x_sqlite"] = bool(sq) and min(e1, e3) >= 0.7 * sq
        if "failover" in only:
            print("failover", file=sys.stderr)
            result["failover"] = bench_failover(Path(tmp), args.kills)
        if "memory" in only:
            print("memory", file=sys.stderr)
            result["memory"] = bench_memory(Path(tmp), args.nodes, args.placements)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Places per second end to end: ctl writes to the scheduler, three real nodes behind it.

A real `fornax-sched serve` follows three real fornax-node daemons on
loopback (`--broadcast off`).  Each place is `place IMAGE` written to
/cluster/scheduler/ctl over 9P (the reply read back on the same fid), then
/cluster/scheduler/placements/NAME read until its first line says
`status=running`: the container is a real process on a node by then.  The
peer in the same run skips the scheduler: `run IMAGE` written to the
nodes' own /cluster/ctl (the same three nodes, round robin), then
/cluster/containers/ID/status read until `state running`.

Both run with one writer (sequential) and with several writers, each on
its own 9P connection: ours sequential, peer sequential, ours concurrent,
peer concurrent, then again for each round (``--rounds``, default 5), who
goes first alternating by round so that a machine that gets slower or
faster during the run hits both alike.  After each phase (not timed) every
container is removed again.  The ratios are taken per round; their median
is the figure.  Prints JSON: places/s, p50/p99 of the
ctl write and of write-to-running, the time until all ran, and the CPU the
scheduler and the nodes used.

    .venv/bin/python bench/sched_place_bench.py [--places N] [--writers W] [--rounds R] [--quick]
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
TICKS = os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(xs, 50) * 1e3, 2), "p99_ms": round(pct(xs, 99) * 1e3, 2),
            "mean_ms": round(statistics.fmean(xs) * 1e3, 2), "max_ms": round(max(xs) * 1e3, 2)}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (its reaped children too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / TICKS
    except OSError:
        return 0.0



async def nodes_online(addr: str, count: int) -> list[str]:
    async def check() -> list[str] | None:
        async with await Client.connect(addr, timeout=5) as c:
            names = sorted(e.name for e in await c.ls("cluster/nodes"))
            st = [(await c.read_file(f"cluster/nodes/{n}/status")).decode().strip() for n in names]
        return names if len(names) == count and all(s == "online" for s in st) else None

    return await eventually(check, timeout=30)


class Phase:
    """One measured run: who writes, the latencies, and the CPU the daemons used."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.write_lat: list[float] = []  # the ctl write, reply included
        self.run_lat: list[float] = []  # from the write until the status reads running
        self.done: list[tuple[str, str]] = []  # (where, id) to clean up
        self.errors: list[str] = []
        self.t0 = self.t1 = 0.0
        self.cpu0: dict[str, float] = {}
        self.cpu1: dict[str, float] = {}

    def begin(self) -> None:
        self.cpu0 = {k: cpu_s(p) for k, p in self.pids.items()}
        self.t0 = time.perf_counter()

    def end(self) -> None:
        self.t1 = time.perf_counter()
        self.cpu1 = {k: cpu_s(p) for k, p in self.pids.items()}

    def report(self, places: int, writers: int, what: str) -> dict[str, Any]:
        wall = self.t1 - self.t0
        cpu = {k: round(self.cpu1[k] - self.cpu0[k], 2) for k in self.pids}
        return {"what": what, "places": places, "writers": writers, "ok": len(self.run_lat),
                "errors": len(self.errors), "first_errors": self.errors[:3],
                "places_per_s": round(len(self.run_lat) / wall, 1) if wall else 0.0,
                "all_running_after_s": round(wall, 3),
                "ctl_write": ms(self.write_lat) if self.write_lat else {},
                "write_to_running": ms(self.run_lat) if self.run_lat else {},
                "cpu_s": cpu, "cpu_pct_of_one_core": {k: round(100 * v / wall, 1) for k, v in cpu.items()}}


async def ours(addr: str, image: str, places: int, writers: int, ph: Phase) -> None:
    """`place IMAGE` on the scheduler's ctl, then its placement file until status=running."""
    conns = [await Client.connect(addr, timeout=60, version="9P2000.u") for _ in range(writers)]
    todo = iter(range(places))

    async def writer(c: Client) -> None:
        for _ in todo:
            t0 = time.perf_counter()
            try:
                reply = (await c.write_file(CTL, f"place {image}".encode(), read_reply=True)).decode()
                ph.write_lat.append(time.perf_counter() - t0)
                name = reply.split()[0]
                ph.done.append(("sched", name))
                while True:
                    first = (await c.read_file(f"cluster/scheduler/placements/{name}")).decode().split("\n", 1)[0]
                    if "status=running" in first:
                        break
                    if any(f"status={s}" in first for s in ("failed", "succeeded", "pending", "unschedulable", "lost")):
                        raise RuntimeError(first)
                    await asyncio.sleep(0.002)
                ph.run_lat.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                ph.errors.append(f"{type(e).__name__}: {e}")

    try:
        ph.begin()
        await asyncio.gather(*(writer(c) for c in conns))
        ph.end()
    finally:
        for c in conns:
            await c.close()


async def peer(nodes: list[str], image: str, places: int, writers: int, ph: Phase) -> None:
    """`run IMAGE` on the nodes' own ctl, round robin, then the container's status until running."""
    conns = [[await Client.connect(a, timeout=60, version="9P2000.u") for a in nodes] for _ in range(writers)]
    todo = iter(range(places))

    async def writer(cs: list[Client]) -> None:
        for i in todo:
            k = i % len(nodes)
            c = cs[k]
            t0 = time.perf_counter()
            try:
                cid = (await c.write_file("cluster/ctl", f"run {image}".encode(), read_reply=True)).decode().strip()
                ph.write_lat.append(time.perf_counter() - t0)
                ph.done.append((nodes[k], cid))
                while True:
                    st = (await c.read_file(f"cluster/containers/{cid}/status")).decode()
                    if "state running" in st:
                        break
                    if "state failed" in st or "state exited" in st:
                        raise RuntimeError(st.replace("\n", "; "))
                    await asyncio.sleep(0.002)
                ph.run_lat.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                ph.errors.append(f"{type(e).__name__}: {e}")

    try:
        ph.begin()
        await asyncio.gather(*(writer(cs) for cs in conns))
        ph.end()
    finally:
        for cs in conns:
            for c in cs:
                await c.close()


async def node_containers(addr: str) -> list[dict[str, str]]:
    """Every container a node knows, as the key/value lines of its status file."""
    out = []
    async with await Client.connect(addr, timeout=30) as c:
        for e in await c.ls("cluster/containers"):
            try:
                text = (await c.read_file(f"cluster/containers/{e.name}/status")).decode()
            except Exception:  # noqa: BLE001 - destroyed while we listed
                continue
            out.append(dict(line.partition(" ")[::2] for line in text.splitlines()))
    return out


async def duplicates(nodes: list[str]) -> dict[str, int]:
    """Names the nodes run more than once (every placement should run exactly once)."""
    seen: dict[str, int] = {}
    for addr in nodes:
        for kv in await node_containers(addr):
            if kv.get("state") == "running":
                seen[kv.get("name", "")] = seen.get(kv.get("name", ""), 0) + 1
    return {k: v for k, v in sorted(seen.items()) if v > 1}


async def clean(sched: str, done: list[tuple[str, str]], nodes: list[str], writers: int = 8) -> int:
    """Remove what a phase made: placements through the scheduler, bare containers on their node.

    Then destroy whatever the nodes still hold (copies the scheduler no longer
    knows); returns how many such leftovers there were.
    """
    todo = iter(done)

    async def worker() -> None:
        conns: dict[str, Client] = {}
        try:
            for where, ident in todo:
                addr = sched if where == "sched" else where
                if addr not in conns:
                    conns[addr] = await Client.connect(addr, timeout=60, version="9P2000.u")
                c = conns[addr]
                if where == "sched":
                    await c.write_file(CTL, f"remove {ident}".encode(), read_reply=True)
                else:
                    await c.write_file("cluster/ctl", f"destroy {ident}".encode(), read_reply=True)
        finally:
            for c in conns.values():
                await c.close()

    await asyncio.gather(*(worker() for _ in range(writers)))

    async def empty() -> bool:
        async with await Client.connect(sched, timeout=10) as c:
            return not await c.ls("cluster/scheduler/placements")

    await eventually(empty, timeout=30)
    left = [(a, kv["id"]) for a in nodes for kv in await node_containers(a)]
    for addr, cid in left:
        async with await Client.connect(addr, timeout=60) as c:
            await c.write_file("cluster/ctl", f"destroy {cid}".encode(), read_reply=True)
    return len(left)


async def run_all(sched: SchedProc, nodes: list[NodeProc], args: argparse.Namespace) -> dict[str, Any]:
    names = await nodes_online(sched.addr, len(nodes))
    addrs = [n.addr for n in nodes]
    assert sched.proc is not None
    pids = {"scheduler": sched.proc.pid, **{n.name: n.proc.pid for n in nodes if n.proc is not None}}
    # warm up both paths (imports, fork servers, first connections)
    for fn, target in ((ours, sched.addr), (peer, addrs)):
        ph = Phase(pids)
        await fn(target, args.image, 12, 3, ph)  # type: ignore[operator]
        await clean(sched.addr, ph.done, addrs)
    out: dict[str, Any] = {"nodes": names, "rounds": []}
    paths = [("ours", ours, sched.addr, "ctl 'place' to the scheduler until the placement reads running"),
             ("direct_to_nodes", peer, addrs, "ctl 'run' to the nodes round robin until the status reads running")]
    for rnd in range(args.rounds):
        got: dict[str, Any] = {}
        for label, writers in (("sequential", 1), ("concurrent", args.writers)):
            # who goes first alternates by round, so that a machine getting slower or faster hits both
            for who, fn, target, what in (paths if rnd % 2 == 0 else paths[::-1]):
                ph = Phase(pids)
                await fn(target, args.image, args.places, writers, ph)  # type: ignore[operator]
                r = got[f"{who}_{label}"] = ph.report(args.places, writers, what)
                dups = await duplicates(addrs) if who == "ours" else {}  # bare runs are named by node-local ids
                if who == "ours":
                    r["names_running_twice"] = len(dups)
                    r["names_running_twice_first"] = list(dups)[:5]
                print(f"round {rnd + 1} {who:<16} {label:<10} {r['places_per_s']:>7.1f}/s  ctl p50 "
                      f"{r['ctl_write'].get('p50_ms')} ms  p99 {r['ctl_write'].get('p99_ms')} ms  "
                      f"errors {r['errors']}  cpu {r['cpu_s']}", file=sys.stderr)
                t = time.perf_counter()
                r["left_on_nodes_after_remove"] = await clean(sched.addr, ph.done, addrs)
                print(f"  cleaned up in {time.perf_counter() - t:.1f}s; names running twice {len(dups)}, "
                      f"left on the nodes after remove {r['left_on_nodes_after_remove']}", file=sys.stderr)
        out["rounds"].append(got)
    return out


def median_ratio(rounds: list[dict[str, Any]], ours: str, peer: str) -> tuple[list[float], float]:
    """Ours over the peer's places/s in each round (phases seconds apart), and their median: the figure."""
    xs = [round(r[ours]["places_per_s"] / r[peer]["places_per_s"], 2) if r[peer]["places_per_s"] else 0.0
          for r in rounds]
    return xs, round(statistics.median(xs), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--places", type=int, default=300)
    ap.add_argument("--writers", type=int, default=8, help="9P connections writing at once in the concurrent phase")
    ap.add_argument("--image", default="hello")
    ap.add_argument("--interval", default="1", help="the scheduler's --interval (default: serve's default, 1)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="times the four phases run, interleaved (the ratios' median is the figure; default 5)")
    ap.add_argument("--quick", action="store_true", help="60 places, 1 round")
    ap.add_argument("--sync", choices=("full", "normal"), default="full",
                    help="the scheduler's SQLite sync (full: every commit fsynced, serve's default)")
    args = ap.parse_args()
    if args.quick:
        args.places, args.rounds = 60, 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup below runs
    nodes: list[NodeProc] = []
    sched: SchedProc | None = None
    with tempfile.TemporaryDirectory(prefix="fornax-place-bench-") as tmp:
        try:
            gossip = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
            for i in range(3):
                n = NodeProc(f"fornax-0{i + 1}", free_port(), gossip[i], Path(tmp) / f"node{i + 1}",
                             peers=[gossip[(i + 1) % 3]])
                nodes.append(n)
                n.start()
                drain(n.proc)
            store = ["--store", f"sqlite:{Path(tmp) / 'sched' / 'sched.db'}?sync={args.sync}"] \
                if args.sync != "full" else []
            sched = SchedProc(Path(tmp) / "sched", [n.addr for n in nodes],
                              extra=["--interval", args.interval, "--dead", "10", *store]).start()
            drain(sched.proc)
            results = asyncio.run(run_all(sched, nodes, args))
        finally:
            if sched is not None and sched.proc is not None:
                sched.stop()
            for n in nodes:
                if n.proc is not None:
                    n.stop()
    rounds = results["rounds"]
    ratios, mid = {}, {}
    for label in ("sequential", "concurrent"):
        ratios[label], mid[label] = median_ratio(rounds, f"ours_{label}", f"direct_to_nodes_{label}")
    phases = [v for r in rounds for v in r.values()]
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "image": args.image, "scheduler_interval_s": float(args.interval), "scheduler_store_sync": args.sync,
        **results,
        "ratios_ours_over_direct_by_round": ratios,
        "ratio_ours_over_direct_sequential": mid["sequential"],
        "ratio_ours_over_direct_concurrent": mid["concurrent"],
        "target": {"ratio_sequential_0.8": mid["sequential"] >= 0.8,
                   "ratio_concurrent_0.95": mid["concurrent"] >= 0.95,
                   "100_places_per_s_concurrent": statistics.median(
                       r["ours_concurrent"]["places_per_s"] for r in rounds) >= 100,
                   "no_errors": all(v["errors"] == 0 for v in phases),
                   "each_placement_runs_once": all(v.get("names_running_twice", 0) == 0 for v in phases)},
    }, indent=2))


if __name__ == "__main__":
    main()

"""Decisions per second of the pure scheduling core, at 1,000 and 10,000 nodes.

Each decision is a real place (decide, then assign) of a container that
reserves 0.25 CPU and 64M on nodes of 8 CPUs and 16G, a third of them with
a label the request asks for.  The peer in the same run is the obvious
implementation: check and rank every node for every decision.  Prints JSON.

    .venv/bin/python bench/sched_core_bench.py [--decisions N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fornax_sched.sched.core import Cluster  # noqa: E402
from fornax_sched.sched.lang import parse_policy  # noqa: E402
from fornax_sched.sched.model import NodeFacts, Request  # noqa: E402

G, M = 1 << 30, 1 << 20
PLAIN = Request("hello", cpus=0.25, mem=64 * M)
LABELLED = Request("hello", cpus=0.25, mem=64 * M, labels=(("disk", "ssd"),))


def build(nodes: int, policy: str) -> Cluster:
    c = Cluster(parse_policy(policy))
    for i in range(nodes):
        c.add_node(NodeFacts(f"node-{i:05d}", 8, 16 * G, {"disk": "ssd"} if i % 3 == 0 else {}))
    return c


def ours(c: Cluster, decisions: int) -> float:
    t = time.perf_counter()
    for i in range(decisions):
        c.place(f"c{i}", LABELLED if i % 4 == 0 else PLAIN)
    return decisions / (time.perf_counter() - t)


def naive(c: Cluster, decisions: int) -> float:
    """Score every node each time: the peer."""
    pack = c.policy.base == "pack"
    t = time.perf_counter()
    for i in range(decisions):
        req = LABELLED if i % 4 == 0 else PLAIN
        best, best_key = None, None
        for n in c.nodes.values():
            if not c.feasible(n, req):
                continue
            key = (-len(n.containers) if pack else len(n.containers), n.name)
            if best_key is None or key < best_key:
                best, best_key = n, key
        c.add(f"c{i}", req)
        if best is not None:
            c.assign(f"c{i}", best.name)
    return decisions / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--naive-decisions", type=int, default=500)
    args = ap.parse_args()
    points = []
    for nodes in (1000, 10000):
        for policy in ("spread", "pack"):
            rate = ours(build(nodes, policy), args.decisions)
            peer = naive(build(nodes, policy), args.naive_decisions)
            points.append({"nodes": nodes, "policy": policy, "decisions": args.decisions,
                           "decisions_per_s": round(rate), "naive_scan_decisions_per_s": round(peer),
                           "speedup": round(rate / peer, 1)})
            print(f"{nodes:>6} nodes {policy:<6} {rate:>9.0f}/s  naive {peer:>7.0f}/s", file=sys.stderr)
    at10k = [p for p in points if p["nodes"] == 10000]
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "request": "0.25 cpu, 64M; every 4th needs label disk=ssd (1 node in 3 has it)",
        "points": points,
        "target": {"5000_per_s_at_10000_nodes": all(p["decisions_per_s"] >= 5000 for p in at10k)},
    }, indent=2))


if __name__ == "__main__":
    main()

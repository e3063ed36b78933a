"""Decision latency of Lua policies at 1,000 nodes, against the built-in spread in the same run.

Each decision is a real place (decide, then assign) of a container that
reserves 0.25 CPU and 64M on nodes of 8 CPUs and 16G, a third of them with
a label every fourth request asks for.  The policies:

- builtin: the core's own spread (the peer);
- platform.lua: the platform policy, loaded as a user's policy would be;
- score: a user policy with filter and score, called for every feasible node;
- yaml: examples/policies/web-first.yaml, compiled to Lua.

The policies take turns in blocks of decisions, so that drift on the machine
hits them alike.  Then a stream of places while the active policy is swapped
(loaded and dry-run as the policy file does, then set_program) every few
hundred places: no place may fail.  Prints JSON.

    .venv/bin/python bench/lua_policy_bench.py [--decisions N] [--nodes N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fornax_sched.policy import LuaProgram, load_policy, platform_source  # noqa: E402
from fornax_sched.sched.core import Cluster  # noqa: E402
from fornax_sched.sched.model import NodeFacts, Request  # noqa: E402

G, M = 1 << 30, 1 << 20
PLAIN = Request("hello", cpus=0.25, mem=64 * M)
LABELLED = Request("hello", cpus=0.25, mem=64 * M, labels=(("disk", "ssd"),))
SCORE = """
-- prefer free memory, then few containers; keep nodes marked drain=yes out
function filter(node, req, ctx)
  return node.labels.drain ~= "yes"
end

function score(node, req, ctx)
  return node.free_mem / (1 << 30) - 2 * node.ncontainers
end
"""
POLICIES = {"platform.lua": platform_source(), "score": SCORE,
            "yaml": (ROOT / "examples" / "policies" / "web-first.yaml").read_text()}


def build(nodes: int) -> Cluster:
    c = Cluster()
    for i in range(nodes):
        c.add_node(NodeFacts(f"node-{i:05d}", 8, 16 * G, {"disk": "ssd"} if i % 3 == 0 else {}))
    return c


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def latency(nodes: int, decisions: int, block: int) -> dict[str, dict[str, float | int]]:
    clusters = {"builtin": build(nodes)}
    programs: dict[str, LuaProgram] = {}
    for name, text in POLICIES.items():
        c = build(nodes)
        loaded = load_policy(text, c)
        assert loaded.program is not None
        c.set_program(loaded.program)
        programs[name] = loaded.program
        clusters[name] = c
    times: dict[str, list[float]] = {name: [] for name in clusters}
    done = dict.fromkeys(clusters, 0)
    warm = 200
    while min(done.values()) < decisions + warm:
        for name, c in clusters.items():
            for _ in range(block):
                i = done[name]
                req = LABELLED if i % 4 == 0 else PLAIN
                t = time.perf_counter()
                d = c.place(f"c{i}", req)
                took = time.perf_counter() - t
                assert d.node is not None, (name, d.reason)
                if i >= warm:
                    times[name].append(took)
                done[name] += 1
    out: dict[str, dict[str, float | int]] = {}
    for name, ts in times.items():
        out[name] = {"decisions": len(ts), "p50_ms": round(pct(ts, 0.50) * 1e3, 3),
                     "p99_ms": round(pct(ts, 0.99) * 1e3, 3), "max_ms": round(max(ts) * 1e3, 3),
                     "mean_ms": round(statistics.fmean(ts) * 1e3, 3)}
        if name in programs:
            p = programs[name]
            out[name]["fallbacks"] = p.counters["fallbacks"] + p.counters["builtin"]
            p.close()
        print(f"{name:>13}: p50 {out[name]['p50_ms']:.3f} ms  p99 {out[name]['p99_ms']:.3f} ms", file=sys.stderr)
    return out


def swapping(nodes: int, places: int, every: int) -> dict[str, object]:
    """Places while the policy is swapped as the policy file swaps it: none may fail."""
    c = build(nodes)
    cycle = [*POLICIES.values(), None]  # None: back to the built-in
    current: LuaProgram | None = None
    failed, swaps = 0, 0
    swap_ms: list[float] = []
    after_ms: list[float] = []
    others: list[float] = []
    for i in range(places):
        if i % every == 0:
            t = time.perf_counter()
            text = cycle[swaps % len(cycle)]
            new = load_policy(text, c).program if text is not None else None
            c.set_program(new)
            if current is not None:
                current.close()
            current = new
            swaps += 1
            swap_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        d = c.place(f"s{i}", LABELLED if i % 4 == 0 else PLAIN)
        (after_ms if i % every == 0 else others).append((time.perf_counter() - t) * 1e3)
        if d.node is None:
            failed += 1
    over = [n.name for n in c.nodes.values() if n.used_cpus > n.facts.cpus + 1e-9 or n.used_mem > n.facts.mem]
    if current is not None:
        current.close()
    print(f"swapping: {places} places, {swaps} swaps, {failed} failed", file=sys.stderr)
    return {"places": places, "swaps": swaps, "failed_places": failed, "nodes_over_capacity": len(over),
            "swap_ms_p50": round(statistics.median(swap_ms), 1), "swap_ms_max": round(max(swap_ms), 1),
            "first_decision_after_swap_ms_p50": round(statistics.median(after_ms), 3),
            "first_decision_after_swap_ms_max": round(max(after_ms), 3),
            "other_decisions_ms_p99": round(pct(others, 0.99), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--block", type=int, default=250)
    ap.add_argument("--swap-places", type=int, default=4000)
    ap.add_argument("--swap-every", type=int, default=250)
    args = ap.parse_args()
    points = latency(args.nodes, args.decisions, args.block)
    swap = swapping(args.nodes, args.swap_places, args.swap_every)
    lua = {k: v for k, v in points.items() if k != "builtin"}
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "nodes": args.nodes,
        "request": "0.25 cpu, 64M; every 4th needs label disk=ssd (1 node in 3 has it)",
        "latency": points,
        "swapping": swap,
        "target": {
            "p50_under_1ms": all(float(v["p50_ms"]) < 1 for v in lua.values()),
            "p99_under_5ms": all(float(v["p99_ms"]) < 5 for v in lua.values()),
            "no_place_failed_while_swapping": swap["failed_places"] == 0 and swap["nodes_over_capacity"] == 0,
        },
    }, indent=2))


if __name__ == "__main__":
    main()

"""How long a misbehaving policy can hold the scheduler, against well-behaved peers in the same run.

The unit tests show the bounds' mechanisms (a stop is not a kill, a budget
hands over the rest) without timing anything; this measures the times:

- load: refusing a policy that stalls as it loads (one C call that would run
  for hours; a loop), against loading a good one (the peer).  Target: within
  the load budget and the grace (+ 100 ms of slack), never the 5 s allowance
  for an interpreter to start.
- clock: decisions of a policy that loops forever, with the machine idle and
  with two processes burning CPU beside it: stopped by the hook (no kill) at
  the deadline on the scheduler's clock, so under load as idle.  Target: no
  kills, each decision within deadline + grace + the platform's answer.
- budget: ``place replicas=1000`` (simulate of 1000 names) under a policy that
  stalls on every decision, by loop and by C call, with the command budget of
  1 s, against the same under the platform policy alone and the built-in
  spread.  Target: within the budget + the platform's time for the rest + one
  deadline, grace and restart.

Prints JSON.

    .venv/bin/python bench/policy_bounds_bench.py [--nodes N] [--replicas N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform as pyplatform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fornax_sched.policy import Limits, LuaProgram, Platform, PolicyError, prepare_policy  # noqa: E402
from fornax_sched.sched.core import Cluster  # noqa: E402
from fornax_sched.sched.model import NodeFacts, Request  # noqa: E402

G, M = 1 << 30, 1 << 20
REQ = Request("web", cpus=0.01, mem=M)
FOREVER = "string.rep('a', 5000):find('.-.-.-b')"
LOADS = {
    "good": "function decide(ctx) return nil end\n",
    "stalls in a C call": f"local x = {FOREVER}\nfunction decide(ctx) end\n",
    "loops": "while true do end\nfunction decide(ctx) end\n",
}


def build(nodes: int) -> Cluster:
    c = Cluster()
    for i in range(nodes):
        c.add_node(NodeFacts(f"node-{i:05d}", 64, 256 * G))
    return c


def ms(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(xs) * 1e3, 1), "max_ms": round(max(xs) * 1e3, 1)}


def load(platform: Platform, limits: Limits, repeats: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, text in LOADS.items():
        times, refused = [], 0
        for _ in range(repeats):
            t = time.monotonic()
            try:
                loaded = prepare_policy(text, platform=platform, limits=limits)
            except PolicyError:
                refused += 1
            else:
                assert loaded.program is not None
                loaded.program.close()
            times.append(time.monotonic() - t)
        out[name] = {"refused": refused, **ms(times)}
        print(f"load {name:>20}: {out[name]}", file=sys.stderr)
    return out


def _burn(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    while not stop.is_set():
        sum(range(10000))


def clock(platform: Platform, limits: Limits, nodes: int, decisions: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for load_name, hogs in (("idle", 0), ("2 CPU hogs", 2)):
        stop = multiprocessing.Event()
        procs = [multiprocessing.Process(target=_burn, args=(stop,)) for _ in range(hogs)]
        for p in procs:
            p.start()
        try:
            c = build(nodes)
            with LuaProgram("function decide(ctx) while true do end end", limits=limits, platform=platform) as prog:
                prog.start()
                c.set_program(prog)
                c.decide("warm", REQ)  # the first decision copies the cluster to both sandboxes
                killed0, timeouts0 = prog.counters["restarts"], prog.counters["timeouts"]
                times = []
                for i in range(decisions):
                    t = time.monotonic()
                    c.decide(f"x{i}", REQ)
                    times.append(time.monotonic() - t)
                killed = prog.counters["restarts"] - killed0
                out[load_name] = {"decisions": decisions, "stopped": prog.counters["timeouts"] - timeouts0 - killed,
                                  "killed": killed, **ms(times)}
        finally:
            stop.set()
            for p in procs:
                p.join()
        print(f"clock {load_name:>12}: {out[load_name]}", file=sys.stderr)
    return out


def budget(platform: Platform, limits: Limits, nodes: int, replicas: int) -> dict[str, object]:
    out: dict[str, object] = {}
    policies = {"builtin (peer)": "", "platform policy (peer)": None,
                "stalls by loop": "function decide(ctx) while true do end end",
                "stalls in a C call": f"function decide(ctx) {FOREVER} end"}
    names = [f"web-{i}" for i in range(replicas)]
    for name, text in policies.items():
        c = build(nodes)
        prog = None
        if text != "":
            prog = LuaProgram(text, limits=limits, platform=platform)
            prog.start()
            c.set_program(prog)
        t = time.monotonic()
        if prog is None:
            c.simulate(names, REQ)
            line = ""
            handed = 0
        else:
            with prog.budget(limits.command) as b:
                c.simulate(names, REQ)
            line, handed = b.line(), b.handed_over
            if b.builtin:
                print(f"budget {name}: the platform failed: {list(prog.recent)[-2:]}", file=sys.stderr)
        took = time.monotonic() - t
        out[name] = {"seconds": round(took, 3), "handed_over": handed, "log": line}
        if prog is not None:
            prog.close()
        print(f"budget {name:>22}: {out[name]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decisions", type=int, default=20)
    args = ap.parse_args()
    limits = Limits()
    with Platform(limits=limits) as platform:
        platform.start()
        loads = load(platform, limits, args.repeats)
        clocks = clock(platform, limits, args.nodes, args.decisions)
        budgets = budget(platform, limits, args.nodes, args.replicas)
    bound_load = limits.load_budget + limits.grace + 0.1
    platform_rest = float(budgets["platform policy (peer)"]["seconds"])  # type: ignore[index]
    bound_budget = limits.command + platform_rest + limits.deadline + limits.grace + 0.5
    one = limits.deadline + limits.grace + 0.05
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": pyplatform.python_version()},
        "limits": {"deadline_ms": limits.deadline * 1e3, "grace_ms": limits.grace * 1e3,
                   "load_budget_ms": limits.load_budget * 1e3, "command_budget_s": limits.command},
        "load": loads, "clock": clocks, "budget": budgets,
        "target": {
            "stalling_loads_refused_within_budget": all(
                v["refused"] == args.repeats and v["max_ms"] / 1e3 < bound_load  # type: ignore[index,operator]
                for k, v in loads.items() if k != "good"),
            "loops_stopped_not_killed_under_load": all(v["killed"] == 0 for v in clocks.values()),  # type: ignore
            "each_stopped_decision_within_deadline_grace_platform": all(
                v["max_ms"] / 1e3 < one for v in clocks.values()),  # type: ignore[index,operator]
            "replicas_within_budget_plus_platform_time": all(
                float(budgets[k]["seconds"]) < bound_budget  # type: ignore[index]
                for k in ("stalls by loop", "stalls in a C call")),
        },
    }, indent=2))


if __name__ == "__main__":
    main()

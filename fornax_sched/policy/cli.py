"""``fornax-sched policy``: check a policy, or see what it would decide, before writing it.

    fornax-sched policy check FILE [--scheduler ADDR]
    fornax-sched policy simulate FILE place IMAGE [CONSTRAINT ...] [--scheduler ADDR]
    fornax-sched policy platform [--path]

Without ``--scheduler`` the policy runs against a small sample cluster; with
it, against a copy of that scheduler's nodes and placements, read over 9P
(nothing is written to it).  See policy(5).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from ..sched import lang
from ..sched.core import Cluster
from ..sched.model import NodeFacts, Policy, Request
from ..units import SizeError, parse_size
from .engine import platform_path, platform_source
from .errors import PolicyError, SandboxError
from .loader import load_policy, sample_cluster


def add_parser(sub: Any) -> None:
    p = sub.add_parser("policy", help="check a policy file, or simulate its decisions",
                       description="Check a policy (syntax, then a dry run) or show what it would decide, "
                                   "without changing anything; see policy(5).")
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    check = psub.add_parser("check", help="check syntax, then dry-run the policy")
    check.add_argument("file", type=Path, help="the policy: text rules, Lua or YAML ('-': standard input)")
    simulate = psub.add_parser("simulate", help="show where a place command would go under the policy")
    simulate.add_argument("file", type=Path, help="the policy ('-': standard input)")
    simulate.add_argument("place", nargs=argparse.REMAINDER, metavar="place IMAGE [CONSTRAINT ...]")
    for q in (check, simulate):
        q.add_argument("--scheduler", metavar="ADDR", default=None,
                       help="run against this scheduler's nodes and placements (read over 9P) instead of a sample")
    plat = psub.add_parser("platform", help="print the platform policy (the reference to copy, and the fallback)")
    plat.add_argument("--path", action="store_true", help="print where it is instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.policy_command == "platform":
        print(platform_path() if args.path else platform_source(), end="" if not args.path else "\n")
        return 0
    req = None
    if args.policy_command == "simulate":  # the command line's words first: a bad one is a usage error
        try:
            req = place_words(args.place)
        except lang.LangError as e:
            print(f"fornax-sched policy simulate: {e}", file=sys.stderr)
            return 2
    try:
        text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        print(f"fornax-sched policy: cannot read {args.file}: {e}", file=sys.stderr)
        return 1
    try:
        cluster, where = (asyncio.run(cluster_of(args.scheduler)) if args.scheduler
                          else (sample_cluster(), "the sample cluster"))
        if args.policy_command == "check":
            return check(text, cluster, where, str(args.file))
        assert req is not None
        return simulate(text, cluster, where, req)
    except (PolicyError, lang.LangError) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    except (ConnectionError, TimeoutError) as e:  # no answer from --scheduler: fornax-sched(1)'s status 3
        print(f"fornax-sched policy: {e}", file=sys.stderr)
        return 3
    except (OSError, SandboxError) as e:
        print(f"fornax-sched policy: {e}", file=sys.stderr)
        return 1


def check(text: str, cluster: Cluster, where: str, name: str) -> int:
    loaded = load_policy(text, cluster)
    try:
        print(f"{name}: {loaded.passed(where, len(cluster.nodes), len(cluster.placements))}")
    finally:
        loaded.close()
    return 0


def place_words(words: list[str]) -> Request:
    """The request a `policy simulate FILE place IMAGE ...` command line asks about."""
    if not words or words[0] != "place":
        raise lang.LangError("usage: fornax-sched policy simulate FILE place IMAGE [CONSTRAINT ...]")
    return lang.parse_place(words[1:])


def simulate(text: str, cluster: Cluster, where: str, req: Request) -> int:
    loaded = load_policy(text, cluster)
    try:
        if loaded.program is None:
            assert loaded.rules is not None
            cluster.set_policy(loaded.rules)
        else:
            cluster.set_policy(Policy())
            cluster.set_program(loaded.program)
        names = _names(cluster, req.name or req.image, req.replicas, exact=bool(req.name and req.replicas == 1))
        print(f"simulate {lang.format_place(req)} on {where}:")
        program = loaded.program
        # One command: its decisions share the policy's budget, as they would in the scheduler.
        with program.budget(program.limits.command) if program else contextlib.nullcontext() as b:
            decisions = cluster.simulate(names, req)
        for d in decisions:
            print(d.line())
        if b is not None and b.line():
            print(b.line())
    finally:
        if loaded.program is not None:
            loaded.program.close()
    return 0


async def cluster_of(addr: str) -> tuple[Cluster, str]:
    """A copy of a running scheduler's cluster, from its /cluster/nodes and placements."""
    from ..fs.client import Client

    c = Cluster()
    async with await Client.connect(addr, timeout=10, version=("9P2000.L", "9P2000.u")) as fs:
        for e in await fs.ls("cluster/nodes"):
            res = _pairs((await fs.read_file(f"cluster/nodes/{e.name}/resources")).decode(), " ")
            status = (await fs.read_file(f"cluster/nodes/{e.name}/status")).decode().split()
            labels = {k[6:]: v for k, v in res.items() if k.startswith("label.")}
            try:
                facts = NodeFacts(e.name, float(res.get("cpus", 0)), parse_size(res.get("mem", "0"), allow_zero=True),
                                  labels)
            except (ValueError, SizeError):
                continue
            n = c.add_node(facts, status[0] if status else "unknown")
            n.cordoned = "cordoned" in status
        for e in await fs.ls("cluster/scheduler/placements"):
            text = (await fs.read_file(f"cluster/scheduler/placements/{e.name}")).decode()
            first, _, rest = text.partition("\n")
            head = _pairs(first.replace(" ", "\n"), "=")
            more = _pairs(rest, "=")
            try:
                req = lang.parse_place([head.get("image", "?"), *more.get("constraints", "").split()])
            except lang.LangError:
                continue
            c.add(e.name, req)
            node = head.get("node", "-")
            if node in c.nodes:
                c.assign(e.name, node, force=True)
    return c, f"a copy of {addr}"


def _names(cluster: Cluster, stem: str, count: int, exact: bool) -> list[str]:
    """Names for the simulated containers that the cluster does not hold already."""
    if exact and stem not in cluster.placements:
        return [stem]
    names: list[str] = []
    i = 1
    while len(names) < count:
        if f"{stem}-{i}" not in cluster.placements:
            names.append(f"{stem}-{i}")
        i += 1
    return names


def _pairs(text: str, sep: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(sep)
        if k:
            out[k.strip()] = v.strip()
    return out

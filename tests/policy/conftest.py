"""Fixtures for the policy tests: a small cluster, the platform sandbox they share (as a scheduler's
policies do), and started Lua programs that are closed afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fornax_sched.policy import Limits, LuaProgram, Platform
from fornax_sched.sched.core import Cluster
from fornax_sched.sched.model import NodeFacts, Request

G, M = 1 << 30, 1 << 20
ROOT_DIR = Path(__file__).resolve().parents[2]
PLAIN = Request("hello", name="hello", cpus=0.5, mem=64 * M)


def small_cluster() -> Cluster:
    """Four nodes: node-1 and node-2 run one container each, node-3 (ssd) and node-4 none."""
    c = Cluster()
    c.add_node(NodeFacts("node-1", 4, 8 * G, {"zone": "east"}))
    c.add_node(NodeFacts("node-2", 4, 8 * G, {"zone": "west"}))
    c.add_node(NodeFacts("node-3", 8, 16 * G, {"zone": "east", "disk": "ssd"}))
    c.add_node(NodeFacts("node-4", 2, 4 * G, {"zone": "west"}))
    for name, node in (("web-1", "node-1"), ("web-2", "node-2")):
        c.add(name, Request("web", name="web", cpus=1, mem=G))
        c.assign(name, node)
    return c


@pytest.fixture
def cluster() -> Cluster:
    return small_cluster()


Make = Callable[..., LuaProgram]


@pytest.fixture(scope="session")
def platform() -> Iterator[Platform]:
    """One platform sandbox for the whole run, as a scheduler has one for all its policies."""
    with Platform() as p:
        p.start()
        yield p


@pytest.fixture
def make(platform: Platform) -> Iterator[Make]:
    """make(lua, **limits): a started LuaProgram for the source (None: the platform policy), with the
    shared platform sandbox behind it (own=True: one of its own, with the same limits)."""
    made: list[LuaProgram] = []

    def _make(lua: str | None, own: bool = False, **limits: object) -> LuaProgram:
        p = LuaProgram(lua, limits=Limits(**limits), platform=None if own else platform)  # type: ignore[arg-type]
        made.append(p)
        p.start()
        return p

    yield _make
    for p in made:
        p.close()


def decide_body(body: str) -> str:
    """A policy whose decide runs body, then (if body did not stop it) picks node-1."""
    return f"function decide(ctx)\n  do\n{body}\n  end\n  return 'node-1'\nend\n"

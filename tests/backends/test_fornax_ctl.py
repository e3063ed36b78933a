"""The Fornax backend's ctl commands: a command and its reply in one round trip, and nodes
that answer the read before the command (older ones) still understood."""

from __future__ import annotations

import asyncio

import pytest

from fornax_sched.fs.tree import Ctx, Dir, File
from fornax_sched.sched.backends.base import Spec
from fornax_sched.sched.backends.fornax import FornaxNode

from ..fs.util import reads_answered_at_once, serving
from ..helpers import run


class Node:
    """Just enough of a node's tree: cluster/ctl starts "containers" after a while."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def ctl(self, ctx: Ctx, data: bytes) -> str:
        await asyncio.sleep(0.02)
        self.commands.append(data.decode())
        return f"{len(self.commands)}\n"

    def tree(self) -> Dir:
        ctl = File("ctl", read=lambda ctx: "usage: run IMAGE\n", write=self.ctl, mode=0o666)
        me = Dir("self", [File("name", read=lambda ctx: "node-a\n")])
        return Dir("", [Dir("cluster", [ctl, me])])


def runs() -> tuple[list[str], bool, Node]:
    node = Node()

    async def main() -> tuple[list[str], bool]:
        async with serving(node.tree()) as srv:
            backend = FornaxNode(srv.addr)
            try:
                cids = [await backend.run(Spec(f"web-{i}", "hello")) for i in range(3)]
                return cids, backend._piped
            finally:
                await backend.close()

    cids, piped = run(main())
    return cids, piped, node


def test_a_run_is_one_round_trip_to_a_node_that_holds_the_read_back() -> None:
    cids, piped, node = runs()
    assert cids == ["1", "2", "3"] and piped and len(node.commands) == 3


def test_a_node_that_answers_the_read_first_gets_it_after_the_write(monkeypatch: pytest.MonkeyPatch) -> None:
    reads_answered_at_once(monkeypatch)  # as a server that answers requests in any order
    cids, piped, node = runs()
    # Never the file's usage text taken for an id; after the first, no more pipelining.
    assert cids == ["1", "2", "3"] and not piped and len(node.commands) == 3

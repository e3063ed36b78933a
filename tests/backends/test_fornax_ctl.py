"""The Fornax backend's ctl commands: a command and its reply in one round trip, and nodes
that answer the read before the command (older ones) still understood."""

from __future__ import annotations

import asyncio

import pytest

from fornax_sched.fs.tree import Ctx, Dir, File, Handle
from fornax_sched.sched.backends.base import NodeRefused, Spec
from fornax_sched.sched.backends.fornax import FornaxNode

from ..fs.util import reads_answered_at_once, serving
from ..helpers import run


class Node:
    """Just enough of a node's tree: cluster/ctl starts "containers" after a while."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.now = self.most = 0  # commands being carried out, and the most at once

    async def ctl(self, ctx: Ctx, data: bytes) -> str:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.now -= 1
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


def test_a_node_is_sent_a_few_commands_at_a_time_and_the_rest_wait_their_turn() -> None:
    """200 runs at once to one node (a place of hundreds): at most CTL_AT_ONCE reach it together,
    and every one is carried out, none timed out, though all 200 take longer than the timeout."""
    from fornax_sched.sched.backends.fornax import CTL_AT_ONCE

    node = Node()

    async def main() -> list[str]:
        async with serving(node.tree()) as srv:
            backend = FornaxNode(srv.addr, timeout=0.3)  # 200 x 20 ms / 8 at once: 0.5 s in all
            try:
                return await asyncio.gather(*(backend.run(Spec(f"web-{i}", "hello")) for i in range(200)))
            finally:
                await backend.close()

    cids = run(main(), timeout=60)
    assert sorted(cids, key=int) == [str(i) for i in range(1, 201)]
    assert 1 < node.most <= CTL_AT_ONCE, node.most


class _Endless(File):
    """A file that never ends: every read returns a full message of bytes."""

    def open(self, ctx: Ctx, mode: int) -> Handle:
        return _Forever()


class _Forever(Handle):
    def read(self, offset: int, count: int) -> bytes:
        return b"x" * count


def _refused(tree: Dir, call: str) -> str:
    """What a FornaxNode's ``call`` (list, peers) raised as NodeRefused, against a node serving ``tree``."""

    async def main() -> str:
        async with serving(tree) as srv:
            backend = FornaxNode(srv.addr)
            try:
                with pytest.raises(NodeRefused) as e:
                    await getattr(backend, call)()
                return str(e.value)
            finally:
                await backend.close()

    return run(main(), timeout=30)  # (without a bound an endless file is read on, a few MB a second)


def _node_a(mine: tuple[File, ...] = (), more: tuple[Dir, ...] = ()) -> Dir:
    """A node's tree: cluster/self/name, ``mine`` beside it, ``more`` beside cluster/self."""
    return Dir("", [Dir("cluster", [Dir("self", [File("name", read=lambda ctx: "node-a\n"), *mine]), *more])])


def test_a_node_whose_listing_never_ends_is_refused_not_read_until_memory_runs_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A look reads a node's files to a bound (READ_LIMIT): past it the node's answer is refused,
    saying why, which the scheduler counts as a failed look; the client reads that far, no further."""
    import fornax_sched.sched.backends.fornax as fornax

    monkeypatch.setattr(fornax, "READ_LIMIT", 1 << 20)
    why = _refused(_node_a(mine=(_Endless("containers", read=lambda ctx: b""),)), "list")
    assert "read cluster/self/containers" in why and f"longer than {1 << 20} bytes" in why, why


def test_a_node_that_lists_more_peers_than_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories of a node are read to a bound too (LIST_LIMIT entries): past it, refused."""
    import fornax_sched.sched.backends.fornax as fornax

    monkeypatch.setattr(fornax, "LIST_LIMIT", 50)
    why = _refused(_node_a(more=(Dir("nodes", [Dir(f"peer-{i:03d}") for i in range(120)]),)), "peers")
    assert "list nodes" in why and "cluster/nodes: more than 50 entries" in why, why

"""Bounded memory per connection, through real sockets.

What one connection may hold in memory between requests (read snapshots,
directory entries of a listing, writes gathered for close or in flight)
is bounded, with a clear error, and other connections are not affected.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error
from fornax_sched.fs.server import Server
from fornax_sched.fs.tree import Ctx, Dir, DynamicDir, File

from .util import Raw, eventually, serving


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


LIMIT = 64 << 10


def big_tree(wake: asyncio.Event) -> Dir:
    async def slow(ctx: Ctx, data: bytes) -> str:
        await wake.wait()
        return "done\n"

    gathered: list[bytes] = []
    names = [f"entry-with-a-longish-name-{i:05d}" for i in range(2000)]  # over 64 KiB of stat entries
    return Dir("", [
        File("big", read=lambda ctx: "x" * 40000, uid="glenda"),
        File("gather", close=lambda ctx, data: gathered.append(data), uid="glenda", mode=0o666),
        File("slow", write=slow, uid="glenda", mode=0o666),
        DynamicDir("many", names=lambda ctx: names, make=lambda n: File(n, read="")),
        Dir("few", [File("one", read="1\n")]),
    ], uid="glenda")


def test_what_one_connection_holds_is_bounded() -> None:
    async def main() -> None:
        wake = asyncio.Event()
        async with serving(big_tree(wake), max_held=LIMIT) as srv:
            async with await Client.connect(srv.addr, version=P.VERSION_9P, uname="glenda") as c:
                conn = next(iter(srv._connections))
                session = conn.session
                # Read snapshots: one of 40 KB is kept, a second would pass 64 KiB.
                a, b = await c.walk("big"), await c.walk("big")
                await c.open(a)
                await c.open(b)
                assert len(await c.read(a, 0, 100)) == 100
                with pytest.raises(P9Error, match=r"^too much held open on this connection \(limit 65536\)$") as e:
                    await c.read(b, 0, 100)
                assert session.held <= LIMIT
                async with await Client.connect(srv.addr, uname="glenda") as other:  # the bound is per connection
                    assert len(await other.read_file("big")) == 40000
                await c.clunk(a)
                assert session.held == 0
                assert len(await c.read(b, 0, 100)) == 100  # room again
                await c.clunk(b)

                # Writes gathered for close count too; the write that would pass the bound is refused.
                g = await c.walk("gather")
                await c.open(g, P.OWRITE)
                offset = 0
                with pytest.raises(P9Error, match="too much held open") as e:
                    while True:
                        offset += await c.write(g, offset, b"y" * 8000)
                assert e.value.errno == errno.EIO  # 9P2000: the text alone; .u adds EMFILE
                assert 56000 <= offset <= LIMIT and session.held == offset
                await c.clunk(g)
                assert session.held == 0

                # Directory entries buffered for a 9P2000 listing: too many is the same error.
                with pytest.raises(P9Error, match="too much held open"):
                    await c.ls("many")
                assert [e.name for e in await c.ls("few")] == ["one"]
                assert session.held == 0
    run(main())


def test_writes_in_flight_are_bounded_too() -> None:
    async def main() -> None:
        wake = asyncio.Event()
        async with serving(big_tree(wake), max_held=LIMIT) as srv:
            raw = await Raw.open(srv)
            await raw.handshake(P.VERSION_9PU)
            await raw.rpc(M.Twalk(1, 0, 1, ("slow",)))
            await raw.rpc(M.Topen(1, 1, P.OWRITE))
            for tag in range(10, 20):  # ten writes of 8000 bytes whose callback waits: 80 KB
                await raw.send(M.Twrite(tag, 1, 0, b"z" * 8000))
            refused = []
            session = next(iter(srv._connections)).session
            await eventually(lambda: session.in_flight == 8, what="eight writes in flight")
            for _ in range(2):
                r = await raw.recv()
                assert isinstance(r, M.Rerror) and r.errno == errno.EMFILE, r
                refused.append(r.tag)
            assert refused == [18, 19] and session.writing <= LIMIT
            assert r.ename == "too much held open on this connection (limit 65536)"
            wake.set()
            done = sorted([(await raw.recv()).tag for _ in range(8)])
            assert done == list(range(10, 18)) and session.writing == 0
            raw.close()
    run(main())


def test_server_defaults() -> None:
    assert Server(Dir("")).config.max_held == 32 << 20

"""Bounded connections and memory, through real sockets.

A crowd of idle connections (held by another process) must never lock a
writer out; a connection that never attaches is closed after the handshake
deadline; what one connection may hold in memory is bounded, with a clear
error.  Times come from a fake clock wherever waiting would otherwise be
needed.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.client import Client
from fornax_sched.fs.errors import P9Error
from fornax_sched.fs.ramfs import RamFS
from fornax_sched.fs.server import Server, default_max_connections, evictee
from fornax_sched.fs.tree import Ctx, Dir, DynamicDir, File

from ..conftest import start_ramfs, stop
from ..helpers import run
from .util import FakeClock, Raw, eventually, serving

HOLDER = Path(__file__).with_name("holder.py")



class Holder:
    """The other process, holding connections open (see holder.py)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def say(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode().strip()

    async def closed(self) -> tuple[int, int]:
        words = (await self.say("closed")).split()
        return int(words[1]), int(words[3])


@asynccontextmanager
async def holder(addr: str) -> AsyncIterator[Holder]:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(HOLDER), addr, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        yield Holder(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def room_for(n: int) -> int:
    """``n`` connections, or as many as this process's file limit allows with the server in it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n + 512))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return min(n, want - 512)


def test_idle_connections_at_the_cap_never_lock_a_writer_out() -> None:
    cap = room_for(1024)
    half = cap // 2

    async def main() -> None:
        clock = FakeClock()
        fs = RamFS("glenda")
        async with serving(fs.root, max_connections=cap, idle_minimum=5, clock=clock) as srv:
            async with holder(srv.addr) as crowd:
                # Half the crowd attaches and idles; the rest connects later and never says a word.
                assert await crowd.say(f"attached {half}") == f"ok {half}"
                await eventually(lambda: sum(c.attached for c in srv._connections) == half, what="attached")
                clock.advance(3)
                assert await crowd.say(f"idle {cap - half}") == f"ok {cap - half}"
                await eventually(lambda: len(srv._connections) == cap, what="the cap reached")

                # Nobody has idled for the minimum of 5 s yet: none may be closed, so the newcomer is refused.
                with pytest.raises(ConnectionError):
                    await Client.connect(srv.addr, uname="glenda", timeout=5)
                assert len(srv._connections) == cap

                clock.advance(10)  # now all of them have idled past the minimum
                writers = []
                for i in range(3):  # each newcomer takes one idle connection's place
                    w = await Client.connect(srv.addr, uname="glenda", timeout=5)
                    writers.append(w)
                    await w.write_file(f"note{i}", b"a writer got in\n", create=True)
                    assert await w.read_file(f"note{i}") == b"a writer got in\n"
                    assert len(srv._connections) == cap
                # The room came from connections that never attached, though the attached idled longer.
                assert sum(c.attached for c in srv._connections) == half + 3
                assert await crowd.say("closed") == "attached 0 idle 3"
                for w in writers:
                    await w.close()
                await eventually(lambda: len(srv._connections) == cap - 3, what="the writers gone")
    run(main())


def test_a_busy_connection_is_never_closed_to_make_room() -> None:
    async def main() -> None:
        clock = FakeClock()
        wake = asyncio.Event()

        async def blocking(ctx: Ctx) -> str:
            await wake.wait()
            return "woken\n"

        root = Dir("", [File("blocking", read=blocking), File("f", read="f\n")])
        async with serving(root, max_connections=2, idle_minimum=5, clock=clock) as srv:
            busy = await Client.connect(srv.addr)
            fid = await busy.walk("blocking")
            await busy.open(fid)
            read = asyncio.ensure_future(busy.read(fid, 0, 100))
            idle = await Client.connect(srv.addr)
            await eventually(lambda: sum(c.busy for c in srv._connections) == 1, what="busy")
            clock.advance(60)
            async with await Client.connect(srv.addr) as newcomer:  # takes the idle one's place
                assert await newcomer.read_file("f") == b"f\n"
                with pytest.raises(ConnectionError):
                    await idle.read_file("f")
                with pytest.raises(ConnectionError):  # the busy one is all that is left: refused
                    await Client.connect(srv.addr, timeout=5)
            wake.set()
            assert await read == b"woken\n"
            await busy.close()
            await idle.close()
    run(main())


def test_the_default_cap_stays_below_the_file_limit() -> None:
    """A ramfs whose file limit is 256 keeps serving a flood of 400 connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 256:
        pytest.fail(f"hard file limit {hard} below 256")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    probe = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard})); "
             "from fornax_sched.fs.server import Server, default_max_connections; "
             "from fornax_sched.fs.tree import Dir; print(default_max_connections(), Server(Dir('')).max_connections)")

    async def main() -> None:
        p = await asyncio.create_subprocess_exec(sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE)
        out, _ = await p.communicate()
        assert out.split() == [b"192", b"192"]  # 256 less a reserve of 64
        assert 0 < default_max_connections() < soft

        server = start_ramfs(preexec_fn=limit)
        try:
            async with holder(server.addr) as crowd:
                assert await crowd.say("idle 400") == "ok 400"

                async def refused() -> int:
                    while (idle := (await crowd.closed())[1]) < 400 - 192:
                        await asyncio.sleep(0.05)
                    return idle

                assert await asyncio.wait_for(refused(), 30) == 400 - 192  # the excess, refused at once
                # Once the crowd has idled past the minimum (5 s), a writer gets in.
                async def writer_gets_in() -> bytes:
                    while True:
                        try:
                            async with await Client.connect(server.addr, uname="glenda", timeout=5) as c:
                                await c.write_file("f", b"in\n", create=True)
                                return await c.read_file("f")
                        except ConnectionError:
                            await asyncio.sleep(0.2)

                assert await asyncio.wait_for(writer_gets_in(), 30) == b"in\n"
            assert server.proc.poll() is None
        finally:
            stop(server)
        assert server.proc.returncode in (0, -15)
        assert server.proc.stderr is not None
        assert "Too many open files" not in server.proc.stderr.read()
    run(main())


def test_a_connection_that_never_attaches_is_closed_after_the_deadline() -> None:
    async def main() -> None:
        async with serving(RamFS("glenda").root, handshake_timeout=0.5) as srv:
            attached = await Raw.open(srv)
            await attached.handshake()
            silent = await Raw.open(srv)
            versioned = await Raw.open(srv)
            assert isinstance(await versioned.rpc(M.Tversion(P.NOTAG, 8192, P.VERSION_9P)), M.Rversion)
            assert await silent.closed(timeout=10)
            assert await versioned.closed(timeout=10)
            # The one that attached in time outlives the deadline, and a second Tversion does not rearm it.
            assert isinstance(await attached.rpc(M.Tstat(2, 0)), M.Rstat)
            assert isinstance(await attached.rpc(M.Tversion(P.NOTAG, 8192, P.VERSION_9P)), M.Rversion)
            await eventually(lambda: len(srv._connections) == 1, what="only the attached one left")
            assert not srv._handshaking
            attached.close()
    run(main())


def test_the_handshake_deadline_follows_the_injected_clock() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with serving(RamFS("glenda").root, handshake_timeout=10, clock=clock) as srv:
            silent = await Raw.open(srv)
            await eventually(lambda: len(srv._connections) == 1, what="accepted")
            clock.advance(9.5)
            srv.sweep()
            assert len(srv._connections) == 1
            clock.advance(1)
            srv.sweep()
            assert await silent.closed(timeout=5) and not srv._connections
    run(main())


@dataclass
class Seen:
    busy: bool
    idle_since: float
    name: str = ""


def test_evictee_prefers_the_never_attached_then_the_longest_idle() -> None:
    fresh = [Seen(True, 10, "busy-fresh"), Seen(False, 50, "fresh"), Seen(False, 90, "fresh-recent")]
    settled = [Seen(False, 0, "settled-old"), Seen(False, 80, "settled")]
    pick = evictee((fresh, settled), now=100, idle_minimum=5)
    assert pick is not None and pick.name == "fresh"  # though settled-old has idled longer
    pick = evictee((fresh, settled), now=52, idle_minimum=5)
    assert pick is not None and pick.name == "settled-old"  # no fresh one idle for 5 s yet
    assert evictee((fresh, settled), now=4, idle_minimum=5) is None
    assert evictee(([Seen(True, 0)], [Seen(True, 0)]), now=1e9, idle_minimum=5) is None


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
    srv = Server(Dir(""))
    assert srv.max_connections == default_max_connections()
    assert srv.config.max_held == 32 << 20 and srv.handshake_timeout == 60 and srv.idle_minimum == 5

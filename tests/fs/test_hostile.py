"""Hostile input: the server answers with an error or drops that one
connection; it never crashes, never grows without bound, and keeps serving
everyone else."""

from __future__ import annotations

import asyncio
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.client import Client
from fornax_sched.fs.ramfs import RamFS
from fornax_sched.fs.server import Server, _Connection

from ..helpers import run
from .test_server import Scheduler
from .util import FakeClock, Raw, eventually, serving


async def still_serving(srv: Server) -> None:
    async with await Client.connect(srv.addr, timeout=5) as c:  # type: ignore[attr-defined]
        assert (await c.stat_path("/")).is_dir


def test_truncated_oversized_and_garbage_frames() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree(), msize=8192) as srv:
            # A message cut short, then the peer leaves.
            raw = await Raw.open(srv)
            await raw.send_bytes(struct.pack("<IBH", 100, 100, 0) + b"\x00" * 10)
            raw.close()
            # A size beyond msize: that connection is dropped.
            raw = await Raw.open(srv)
            await raw.handshake()
            await raw.send_bytes(struct.pack("<IBH", 1 << 30, M.Twrite.TYPE, 1))
            assert await raw.closed()
            # A size below the header: dropped too.
            raw = await Raw.open(srv)
            await raw.send_bytes(struct.pack("<I", 3))
            assert await raw.closed()
            # An unknown type and a malformed walk are answered, and the connection lives on.
            raw = await Raw.open(srv)
            await raw.handshake()
            await raw.send_bytes(struct.pack("<IBH", 7, 250, 42))
            r = await raw.recv()
            assert isinstance(r, M.Rerror) and r.tag == 42 and "unknown message type 250" in r.ename
            bad_walk = struct.pack("<IBHIIHH", 19, M.Twalk.TYPE, 43, 0, 1, 1, 500)
            await raw.send_bytes(bad_walk)
            r = await raw.recv()
            assert isinstance(r, M.Rerror) and r.tag == 43 and "Twalk" in r.ename
            r = await raw.rpc(M.Tstat(44, 0))
            assert isinstance(r, M.Rstat)
            # A reply type sent as a request is refused.
            r = await raw.rpc(M.Rread(45, b"x"))
            assert isinstance(r, M.Rerror) and r.tag == 45
            raw.close()
            await still_serving(srv)
    run(main())


def test_fid_reuse_and_exhaustion() -> None:
    async def main() -> None:
        async with serving(Scheduler().tree(), max_fids=16) as srv:
            raw = await Raw.open(srv)
            await raw.handshake()
            r = await raw.rpc(M.Tattach(1, 0, P.NOFID, "glenda", "", P.NONUNAME))
            assert isinstance(r, M.Rerror) and "in use" in r.ename
            for fid in range(1, 16):
                assert isinstance(await raw.rpc(M.Twalk(1, 0, fid, ())), M.Rwalk)
            r = await raw.rpc(M.Twalk(1, 0, 16, ()))
            assert isinstance(r, M.Rerror) and "too many fids" in r.ename
            await raw.rpc(M.Tclunk(1, 15))
            assert isinstance(await raw.rpc(M.Twalk(1, 0, 16, ())), M.Rwalk)
            r = await raw.rpc(M.Twalk(1, 0, P.NOFID, ()))
            assert isinstance(r, M.Rerror)
            raw.close()
            await still_serving(srv)
    run(main())


def test_duplicate_tag_and_inflight_limit() -> None:
    async def main() -> None:
        app = Scheduler()
        async with serving(app.tree(), max_inflight=4) as srv:
            raw = await Raw.open(srv)
            await raw.handshake()
            for fid in range(1, 11):
                await raw.rpc(M.Twalk(1, 0, fid, ("blocking",)))
                await raw.rpc(M.Topen(1, fid, P.OREAD))
            await raw.send(M.Tread(100, 1, 0, 10))
            r = await raw.rpc(M.Tread(100, 2, 0, 10))
            assert isinstance(r, M.Rerror) and r.ename == "duplicate tag"
            for fid in range(2, 11):  # nine more blocked reads: past the limit of 4
                await raw.send(M.Tread(100 + fid, fid, 0, 10))
            conn: _Connection = next(iter(srv._connections))
            await eventually(lambda: conn.session.in_flight == 4 and conn.read_paused, what="4 in flight")
            assert conn.session.framer.buffered() > 0  # the other reads wait unread
            await still_serving(srv)  # others are not held up
            app.wake.set()
            tags = {(await raw.recv()).tag for _ in range(10)}
            assert tags == set(range(100, 111)) - {101}
            raw.close()
    run(main())


def test_client_that_stops_reading_cannot_grow_the_server() -> None:
    async def main() -> None:
        fs = RamFS("glenda")
        async with serving(fs.root, msize=65536) as srv:
            async with await Client.connect(srv.addr, uname="glenda", msize=65536) as c:
                await c.write_file("big", b"x" * 60000, create=True)
            raw = await Raw.open(srv)
            await raw.handshake(msize=65536)
            await raw.rpc(M.Twalk(1, 0, 1, ("big",)))
            await raw.rpc(M.Topen(1, 1, P.OREAD))
            frame = raw.codec.encode(M.Tread(2, 1, 0, 60000))
            # 20,000 reads of 60 KB would be 1.2 GB of replies; never read one.
            raw.writer.write(frame * 20000)
            conn: _Connection = next(c for c in srv._connections if c.attached)
            await eventually(lambda: conn.read_paused, what="reading paused")
            assert conn.transport is not None
            buffered = conn.transport.get_write_buffer_size()
            assert buffered <= _Connection.HIGH_WATER + 65536, buffered
            assert conn.read_paused
            await still_serving(srv)
            raw.writer.transport.abort()
            await eventually(lambda: conn not in srv._connections, what="connection gone")
    run(main())


def test_connection_limit() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with serving(Scheduler().tree(), max_connections=2, clock=clock) as srv:
            a = await Client.connect(srv.addr)
            b = await Client.connect(srv.addr)
            # Both were just used: neither may be closed for the newcomer, which is refused.
            try:
                await Client.connect(srv.addr, timeout=2)
                raise AssertionError("third connection accepted")
            except ConnectionError:
                pass
            await a.close()
            await eventually(lambda: len(srv._connections) == 1, what="a gone")
            await still_serving(srv)
            await b.close()
    run(main())


FRAMES = st.one_of(
    st.binary(max_size=64).map(lambda b: struct.pack("<I", len(b) + 4) + b),  # framed garbage
    st.binary(max_size=64),  # unframed garbage
    st.tuples(st.sampled_from(sorted({c.TYPE for c in M.MESSAGES.values()})), st.integers(0, 0xFFFF),
              st.binary(max_size=40)).map(lambda t: struct.pack("<IBH", 7 + len(t[2]), t[0], t[1]) + t[2]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dialect=st.sampled_from(P.DIALECTS), frames=st.lists(FRAMES, min_size=1, max_size=8))
def test_random_frames_never_break_the_server(dialect: str, frames: list[bytes]) -> None:
    async def main() -> None:
        async with serving(Scheduler().tree(), msize=8192) as srv:
            raw = await Raw.open(srv)
            await raw.handshake(dialect)
            await raw.send_bytes(b"".join(frames))
            try:
                await asyncio.wait_for(raw.reader.read(1 << 16), 0.05)
            except (TimeoutError, ConnectionError):
                pass
            raw.close()
            await still_serving(srv)
    run(main())

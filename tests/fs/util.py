"""Helpers for driving a server in the test's own event loop."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fornax_sched.fs import codec as M
from fornax_sched.fs import proto as P
from fornax_sched.fs.codec import CODECS, Codec, Message
from fornax_sched.fs.server import Server
from fornax_sched.fs.tree import Dir


async def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``check()`` is true, polling; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g}s")
        await asyncio.sleep(0.01)


class FakeClock:
    """A clock that moves only when told: give it to Server(clock=...)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def serving(root: Dir | Any, address: str = "tcp!127.0.0.1!0", **kw: Any) -> AsyncIterator[Server]:
    server = Server(root, **kw)
    listener = await server.listen(address)
    server.addr = str(listener.address)  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        await server.close()


class Raw:
    """A bare connection that sends and receives single frames, for exact protocol tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.codec: Codec = CODECS[P.VERSION_9P]

    @classmethod
    async def open(cls, server: Server) -> Raw:
        _, host, port = server.addr.split("!")  # type: ignore[attr-defined]
        r, w = await asyncio.open_connection(host, int(port))
        return cls(r, w)

    async def send(self, msg: Message) -> None:
        self.writer.write(self.codec.encode(msg))
        await self.writer.drain()

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> Any:
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        (size,) = struct.unpack("<I", head)
        body = await asyncio.wait_for(self.reader.readexactly(size - 4), timeout)
        return self.codec.decode(head + body)

    async def rpc(self, msg: Message) -> Any:
        await self.send(msg)
        return await self.recv()

    async def handshake(self, version: str = P.VERSION_9P, uname: str = "glenda", msize: int = 8192) -> Any:
        reply = await self.rpc(M.Tversion(P.NOTAG, msize, version))
        assert reply.version == version, reply
        self.codec = CODECS[version]
        return await self.rpc(M.Tattach(1, 0, P.NOFID, uname, "", P.NONUNAME))

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has hung up."""
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            return True
        while data:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        return True

    def close(self) -> None:
        self.writer.close()


def reads_answered_at_once(monkeypatch: Any) -> None:
    """Make this package's 9P server answer a read at once even while a write is in flight on its
    fid, as a server that answers requests in any order would (and this one did before it held such
    reads back): the read then gets what the file held before the write."""
    from fornax_sched.fs import session

    def at_once(self: session.Session, fid: session.Fid, msg: Any, size: int) -> None:
        held, fid.writes = fid.writes, 0
        try:
            reply = self._request(msg, size)
        finally:
            fid.writes = held
        if reply is not None:  # answered at once: sent now, before the write's reply
            self._out.send.append(self._frame(reply))

    monkeypatch.setattr(session.Session, "_park", at_once)

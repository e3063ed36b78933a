"""An asyncio 9P client (9P2000, 9P2000.u, 9P2000.L) for mounting remote trees.

Requests are multiplexed by tag, so many can be outstanding on one
connection; each has a timeout after which it is flushed, and a flush that
is not answered within the timeout too means the peer is hung (stopped,
partitioned): the connection is closed.  When the peer goes away every
waiting request fails with ``ConnectionError`` naming it.

    c = await Client.connect("tcp!10.0.0.3!564")
    print((await c.read_file("cluster/self/name")).decode())
    await c.write_file("cluster/ctl", b"run hello")
    await c.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as E
import os
from typing import TYPE_CHECKING, Any, TypeVar

from . import codec as M
from . import proto as P
from .clientcore import ClientCore, FileInfo, check_reply, decode_frame
from .codec import Message, ProtocolError, Qid
from .dial import Address, parse
from .errors import P9Error

__all__ = ["Client", "FileInfo"]

T = TypeVar("T")

if TYPE_CHECKING:
    from .clientcore import Op


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc)


class Client(ClientCore):
    """One 9P connection with an attached root fid, over asyncio; the operations are ClientCore's."""

    def __init__(self, address: Address, timeout: float) -> None:
        super().__init__(address, timeout)
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._free_tags: list[int] = []
        self._next_tag = 0
        self._gone: Exception | None = None
        self._flushing: set[asyncio.Task[bool]] = set()  # flushes still waiting for their Rflush

    # ------------------------------------------------------------ connecting
    @classmethod
    async def connect(
        cls,
        dial: str,
        *,
        version: str | tuple[str, ...] = P.VERSION_9PL,
        msize: int = P.DEFAULT_MSIZE,
        uname: str | None = None,
        aname: str = "",
        timeout: float = 10.0,
    ) -> Client:
        """Dial, negotiate the version and attach; raise ConnectionError or P9Error.

        ``version`` may list dialects in order of preference: each is tried
        on a fresh connection until the server accepts one (diod, for one,
        speaks 9P2000.L alone).
        """
        versions = (version,) if isinstance(version, str) else version
        for i, v in enumerate(versions):
            try:
                return await cls._connect(dial, v, msize, uname, aname, timeout)
            except P9Error as e:
                if e.errno != E.EPROTONOSUPPORT or i == len(versions) - 1:
                    raise
        raise ValueError("no 9P version to try")

    @classmethod
    async def _connect(cls, dial: str, version: str, msize: int, uname: str | None, aname: str,
                       timeout: float) -> Client:
        addr = parse(dial)
        self = cls(addr, timeout)
        loop = asyncio.get_running_loop()
        try:
            if addr.net == "unix":
                coro = loop.create_unix_connection(lambda: _Protocol(self), addr.path)
            else:
                coro = loop.create_connection(lambda: _Protocol(self), addr.host, addr.port)
            transport, _ = await asyncio.wait_for(coro, timeout)
        except (TimeoutError, OSError) as e:
            why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e) or "timed out"
            raise ConnectionError(f"cannot dial 9P server {addr}: {why}") from None
        self._transport = transport
        try:
            await self._drive(self._op_handshake(version, msize, uname, aname))
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._lost(None)
        if self._flushing:  # they end at once: their futures have just failed
            await asyncio.gather(*self._flushing, return_exceptions=True)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ the wire
    def _received(self, data: bytes) -> None:
        self._framer.feed(data)
        try:
            while (frame := self._framer.next_frame()) is not None:
                msg = decode_frame(self.codec, frame)
                fut = self._waiting.pop(msg.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except ProtocolError as e:
            self._lost(ConnectionError(f"9P server {self.address} sent a bad message: {e}"))
            if self._transport is not None:
                self._transport.close()

    def _lost(self, exc: Exception | None) -> None:
        if self._gone is None:
            self._gone = exc if isinstance(exc, ConnectionError) else ConnectionError(
                f"9P connection to {self.address} closed" + (f": {exc}" if exc else ""))
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(self._gone)

    def _die(self, why: str) -> None:
        """Declare the peer dead: close the connection and fail everything waiting on it."""
        if self._gone is None:
            self._gone = ConnectionError(f"9P server {self.address} {why}: connection closed")
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._lost(None)

    def _tag(self) -> int:
        if self._free_tags:
            return self._free_tags.pop()
        if self._next_tag >= P.NOTAG:
            raise P9Error("too many requests in flight", E.EBUSY)
        self._next_tag += 1
        return self._next_tag - 1

    def _free(self, *tags: int) -> None:
        if self._gone is None:
            self._free_tags.extend(t for t in tags if t != P.NOTAG)

    async def rpc(self, msg: Message, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply; errors raise P9Error.

        No call waits longer than its timeout plus, when it times out, the
        client's timeout for the Tflush that follows: a peer that answers
        neither is declared dead (see ``_flush``).
        """
        call = self._issue(msg, timeout)
        self._send(call.data, call)
        return await self._answer(call)

    def _send(self, data: bytes, *calls: _Call) -> None:
        assert self._transport is not None
        try:
            self._transport.write(data)
        except BaseException:  # never sent: nothing to flush
            for call in calls:
                self._waiting.pop(call.msg.tag, None)
                call.timer.cancel()
            raise

    def _issue(self, msg: Message, timeout: float | None) -> _Call:
        """Give a request its tag, its future and its timer (not sent yet)."""
        if self._gone is not None or self._transport is None:
            raise self._gone or ConnectionError(f"9P connection to {self.address} is closed")
        versioning = isinstance(msg, M.Tversion)
        tag = P.NOTAG if versioning else self._tag()
        msg.tag = tag
        try:
            data = self.codec.encode(msg)
        except BaseException:
            self._free(tag)
            raise
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._waiting[tag] = fut
        wait = timeout or self.timeout
        # One timer per request (cheaper than wait_for + shield on the hot path).
        return _Call(msg, data, fut, wait, loop.call_later(wait, _expire, fut))

    async def _answer(self, call: _Call) -> Any:
        """Wait for a sent request's reply (see ``rpc``)."""
        msg, fut, wait, tag = call.msg, call.fut, call.wait, call.msg.tag
        versioning = tag == P.NOTAG
        try:
            reply = await fut
        except TimeoutError:
            late = f"9P {type(msg).__name__} to {self.address} timed out after {wait:g}s"
            self._waiting.pop(tag, None)
            if versioning:  # NOTAG cannot be flushed
                self._die(f"did not answer Tversion within {wait:g}s")
                raise TimeoutError(f"{late}; connection closed") from None
            # The flush runs as its own task, so that cancelling this caller
            # while it waits for Rflush leaves a flush that is still bounded.
            if not await asyncio.shield(self._start_flush(tag)):
                raise TimeoutError(f"{late}; {self._gone}") from None
            raise TimeoutError(late) from None
        except asyncio.CancelledError:
            self._abandon(call)
            raise
        except BaseException:
            self._waiting.pop(tag, None)
            raise
        else:
            self._free(tag)
        finally:
            call.timer.cancel()
        return check_reply(msg, reply)

    def _abandon(self, call: _Call) -> None:
        """Nobody will wait for this request's reply: flush it if the server still has it, in the
        background (its tag is free once the Rflush is back), else free its tag."""
        call.timer.cancel()
        tag, fut = call.msg.tag, call.fut
        if self._waiting.get(tag) is fut:  # still the server's
            del self._waiting[tag]
            if tag != P.NOTAG:
                self._start_flush(tag)
        elif fut.done() and not fut.cancelled() and fut.exception() is None:
            self._free(tag)  # answered just before

    async def write_read(self, fid: int, data: bytes, count: int) -> tuple[bytes, bool]:
        """Write ``data`` at offset 0 of an open fid and read ``count`` bytes back from offset 0,
        both requests sent at once: a ctl command and its reply in one round trip.

        Returns the bytes read and whether they are the write's reply: this package's server
        answers a read on a fid only after the writes in flight on it (fs/session.py), but a
        server that answered the read first has returned what the file held before; then
        (False) the caller reads again.  The write's error, if it failed, is raised.
        """
        w = self._issue(M.Twrite(0, fid, 0, data), None)
        try:
            r = self._issue(M.Tread(0, fid, 0, min(count, self.iounit)), None)
        except BaseException:
            self._abandon(w)
            raise
        order: list[bool] = []  # done callbacks run in the order the replies came: True for the write's
        w.fut.add_done_callback(lambda f: order.append(True))
        r.fut.add_done_callback(lambda f: order.append(False))
        self._send(w.data + r.data, w, r)
        try:
            await self._answer(w)
        except P9Error:  # the write was refused: its read is answered too, then the error
            with contextlib.suppress(Exception):
                await self._answer(r)
            raise
        except BaseException:
            self._abandon(r)
            raise
        reply = await self._answer(r)
        return reply.data, bool(order) and order[0]

    def _start_flush(self, oldtag: int) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self._flush(oldtag))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)
        return task

    async def _flush(self, oldtag: int) -> bool:
        """Ask the server to forget ``oldtag``, waiting at most the client's timeout.

        True once Rflush is back, and only then are ``oldtag`` and the
        flush's own tag free again.  A Tflush is never flushed: without an
        Rflush in time the peer is declared dead (False), so no tag whose
        fate is unknown is ever reused.
        """
        if self._gone is not None or self._transport is None:
            return False
        try:
            tag = self._tag()
        except P9Error:
            self._die("left no tag free for a Tflush")
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._waiting[tag] = fut
        timer = loop.call_later(self.timeout, _expire, fut)
        try:
            self._transport.write(self.codec.encode(M.Tflush(tag, oldtag)))
            reply = await fut
        except TimeoutError:
            self._die(f"did not answer a Tflush within {self.timeout:g}s")
            return False
        except ConnectionError:
            return False
        finally:
            timer.cancel()
        if not isinstance(reply, M.Rflush):  # flush(5): a Tflush is answered by Rflush alone
            self._die(f"answered Tflush with {type(reply).__name__}")
            return False
        self._free(tag, oldtag)
        return True

    async def _drive(self, op: Op[T]) -> T:
        """Run one of ClientCore's operations: each request it yields goes out, its reply goes back in."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                msg = op.throw(error) if error is not None else op.send(reply)
            except StopIteration as done:
                return done.value
            try:
                reply, error = await self.rpc(msg), None
            except BaseException as e:  # the operation's finally clauses (clunks) still run
                reply, error = None, e

    # ------------------------------------------------------------ operations (see ClientCore)
    async def walk(self, path: str | list[str] | tuple[str, ...], fid: int | None = None) -> int:
        """Walk from ``fid`` (the root by default) to ``path``; return a new fid."""
        return await self._drive(self._op_walk(path, fid))

    async def open(self, fid: int, mode: int = P.OREAD) -> tuple[Qid, int]:
        """Open with a Plan 9 mode (OREAD, OWRITE, ORDWR, | OTRUNC); return (qid, iounit)."""
        return await self._drive(self._op_open(fid, mode))

    async def create(self, fid: int, name: str, perm: int, mode: int = P.OREAD) -> Qid:
        """Create ``name`` in directory ``fid``; the fid then stands for the new file, open."""
        return await self._drive(self._op_create(fid, name, perm, mode))

    async def read(self, fid: int, offset: int, count: int) -> bytes:
        reply = await self.rpc(M.Tread(0, fid, offset, min(count, self.iounit)))
        return reply.data

    async def write(self, fid: int, offset: int, data: bytes) -> int:
        reply = await self.rpc(M.Twrite(0, fid, offset, data))
        return reply.count

    async def clunk(self, fid: int) -> None:
        await self._drive(self._op_clunk(fid))

    async def remove(self, path: str) -> None:
        await self._drive(self._op_remove(path))

    async def stat(self, fid: int) -> FileInfo:
        return await self._drive(self._op_stat(fid))

    async def readdir(self, fid: int) -> list[FileInfo]:
        """List an opened directory."""
        return await self._drive(self._op_readdir(fid))

    async def read_file(self, path: str, limit: int | None = None) -> bytes:
        """The whole file; with ``limit``, P9Error (EFBIG) once it is longer than that many bytes."""
        return await self._drive(self._op_read_file(path, limit))

    async def write_file(self, path: str, data: bytes, *, create: bool = False, read_reply: bool = False) -> bytes:
        """Write ``data`` to ``path`` (truncating); with ``read_reply`` read the fid back.

        Reading back on the same fid is how a ctl file answers a command.
        """
        return await self._drive(self._op_write_file(path, data, create, read_reply))

    async def ls(self, path: str, limit: int | None = None) -> list[FileInfo]:
        """A directory's entries; with ``limit``, P9Error (EFBIG) once there are more than that."""
        return await self._drive(self._op_ls(path, limit))

    async def stat_path(self, path: str) -> FileInfo:
        return await self._drive(self._op_stat_path(path))

    async def mkdir(self, path: str, perm: int = 0o755) -> None:
        await self._drive(self._op_mkdir(path, perm))


class _Call:
    """A request with its tag given, its reply's future and its timer."""

    __slots__ = ("msg", "data", "fut", "wait", "timer")

    def __init__(self, msg: Message, data: bytes, fut: asyncio.Future[Message], wait: float,
                 timer: asyncio.TimerHandle) -> None:
        self.msg, self.data, self.fut, self.wait, self.timer = msg, data, fut, wait, timer


def _expire(fut: asyncio.Future[Message]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())

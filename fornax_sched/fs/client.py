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
import errno as E
import os
from dataclasses import dataclass
from typing import Any

from . import codec as M
from . import proto as P
from .codec import CODECS, Codec, Framer, Message, ProtocolError, Qid, decode_dirents, decode_stats
from .dial import Address, parse
from .errors import P9Error


@dataclass
class FileInfo:
    """What stat (9P2000) or getattr (9P2000.L) says of a file, in one shape."""

    name: str
    qid: Qid
    mode: int  # Plan 9 mode: DMDIR | permission bits
    length: int
    uid: str
    gid: str
    mtime: int

    @property
    def is_dir(self) -> bool:
        return bool(self.mode & P.DMDIR)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc)


class Client:
    """One 9P connection with an attached root fid."""

    def __init__(self, address: Address, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.codec: Codec = CODECS[P.VERSION_9P]
        self.msize = P.DEFAULT_MSIZE
        self.root = 0
        self.root_qid = Qid(0, 0, 0)
        self._framer = Framer(P.DEFAULT_MSIZE)
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._free_tags: list[int] = []
        self._next_tag = 0
        self._free_fids: list[int] = []
        self._next_fid = 1
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
            await self._negotiate(version, msize)
            user = uname if uname is not None else _local_user()
            nuname = os.getuid() if uname is None else P.NONUNAME
            reply = await self.rpc(M.Tattach(0, self.root, P.NOFID, user, aname, nuname))
            self.root_qid = reply.qid
        except BaseException:
            await self.close()
            raise
        return self

    async def _negotiate(self, version: str, msize: int) -> None:
        try:
            reply = await self.rpc(M.Tversion(P.NOTAG, msize, version))
        except P9Error as e:  # some servers refuse a version with an error instead of "unknown"
            raise P9Error(f"server {self.address} does not speak {version} ({e})", E.EPROTONOSUPPORT) from None
        if reply.version == "unknown" or reply.version not in P.DIALECTS:
            raise P9Error(f"server {self.address} does not speak {version} (answered {reply.version!r})",
                          E.EPROTONOSUPPORT)
        if reply.msize > msize or reply.msize < P.MIN_MSIZE:
            raise P9Error(f"server {self.address} answered a bad msize {reply.msize}", E.EPROTO)
        self.codec = CODECS[reply.version]
        self.msize = reply.msize
        self._framer.msize = reply.msize

    @property
    def dialect(self) -> str:
        return self.codec.dialect

    @property
    def iounit(self) -> int:
        return self.msize - P.IOHDRSZ

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
                codec = self.codec
                if frame[4] == M.Rlerror.TYPE and not codec.knows(M.Rlerror.TYPE):
                    codec = CODECS[P.VERSION_9PL]  # a 9P2000.L server refusing our Tversion
                msg = codec.decode(frame)
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
        timer = loop.call_later(wait, _expire, fut)
        try:
            self._transport.write(data)
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
            if self._waiting.get(tag) is fut:  # still the server's: flush it, in the background
                del self._waiting[tag]
                if not versioning:
                    self._start_flush(tag)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self._free(tag)  # answered just before the cancel
            raise
        except BaseException:
            self._waiting.pop(tag, None)
            raise
        else:
            self._free(tag)
        finally:
            timer.cancel()
        if isinstance(reply, M.Rerror):
            raise P9Error(reply.ename, reply.errno or P.ERRNO_OF_MESSAGE.get(reply.ename, E.EIO))
        if isinstance(reply, M.Rlerror):
            raise P9Error(os.strerror(reply.ecode), reply.ecode)
        if reply.TYPE != msg.TYPE + 1:
            raise P9Error(f"server answered {type(msg).__name__} with {type(reply).__name__}", E.EPROTO)
        return reply

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

    # ------------------------------------------------------------ fids
    def _fid(self) -> int:
        if self._free_fids:
            return self._free_fids.pop()
        self._next_fid += 1
        return self._next_fid - 1

    async def walk(self, path: str | list[str] | tuple[str, ...], fid: int | None = None) -> int:
        """Walk from ``fid`` (the root by default) to ``path``; return a new fid."""
        names = [n for n in path.split("/") if n] if isinstance(path, str) else list(path)
        start = self.root if fid is None else fid
        newfid = self._fid()
        try:
            # 9P walks at most 16 names a message; longer paths walk in steps.
            first = True
            while first or names:
                step, names = names[: P.MAXWELEM], names[P.MAXWELEM :]
                reply = await self.rpc(M.Twalk(0, start if first else newfid, newfid, tuple(step)))
                if len(reply.qids) != len(step):
                    if not first:
                        await self.clunk(newfid)
                    await self._walk_error(start if first else None, step, len(reply.qids))
                first = False
        except BaseException:
            self._free_fids.append(newfid)
            raise
        return newfid

    async def _walk_error(self, start: int | None, names: list[str], reached: int) -> None:
        """A walk stopped part way; ask again for the failing name alone to learn why."""
        where = "/".join(names[: reached + 1])
        if start is None:
            raise P9Error(f"{where}: {P.ENOENT_MSG}", E.ENOENT)
        tmp = self._fid()
        try:
            await self.rpc(M.Twalk(0, start, tmp, tuple(names[:reached])))
            try:
                await self.rpc(M.Twalk(0, tmp, tmp, (names[reached],)))
            finally:
                await self.rpc(M.Tclunk(0, tmp))
        except P9Error as e:
            raise P9Error(f"{where}: {e}", e.errno) from None
        finally:
            self._free_fids.append(tmp)
        raise P9Error(f"{where}: {P.ENOENT_MSG}", E.ENOENT)

    async def open(self, fid: int, mode: int = P.OREAD) -> tuple[Qid, int]:
        """Open with a Plan 9 mode (OREAD, OWRITE, ORDWR, | OTRUNC); return (qid, iounit)."""
        if self.codec.dotl:
            flags = (mode & 3) | (P.L_O_TRUNC if mode & P.OTRUNC else 0)
            reply = await self.rpc(M.Tlopen(0, fid, flags))
        else:
            reply = await self.rpc(M.Topen(0, fid, mode))
        return reply.qid, reply.iounit or self.iounit

    async def create(self, fid: int, name: str, perm: int, mode: int = P.OREAD) -> Qid:
        """Create ``name`` in directory ``fid``; the fid then stands for the new file, open."""
        if self.codec.dotl:
            if perm & P.DMDIR:
                dfid = await self.walk([], fid)
                try:
                    return (await self.rpc(M.Tmkdir(0, dfid, name, perm & 0o777, os.getgid()))).qid
                finally:
                    await self.clunk(dfid)
            flags = (mode & 3) | P.L_O_CREAT | (P.L_O_TRUNC if mode & P.OTRUNC else 0)
            reply = await self.rpc(M.Tlcreate(0, fid, name, flags, perm & 0o777, os.getgid()))
        else:
            reply = await self.rpc(M.Tcreate(0, fid, name, perm, mode))
        return reply.qid

    async def read(self, fid: int, offset: int, count: int) -> bytes:
        reply = await self.rpc(M.Tread(0, fid, offset, min(count, self.iounit)))
        return reply.data

    async def write(self, fid: int, offset: int, data: bytes) -> int:
        reply = await self.rpc(M.Twrite(0, fid, offset, data))
        return reply.count

    async def clunk(self, fid: int) -> None:
        try:
            await self.rpc(M.Tclunk(0, fid))
        finally:
            if fid != self.root:
                self._free_fids.append(fid)

    async def remove(self, path: str) -> None:
        fid = await self.walk(path)
        try:
            await self.rpc(M.Tremove(0, fid))
        finally:
            self._free_fids.append(fid)

    async def stat(self, fid: int) -> FileInfo:
        if not self.codec.dotl:
            st = (await self.rpc(M.Tstat(0, fid))).stat
            return FileInfo(st.name, st.qid, st.mode, st.length, st.uid, st.gid, st.mtime)
        a = await self.rpc(M.Tgetattr(0, fid, P.GETATTR_BASIC))
        mode = (a.mode & 0o777) | (P.DMDIR if a.mode & P.S_IFDIR == P.S_IFDIR else 0)
        return FileInfo("", a.qid, mode, a.size, str(a.uid), str(a.gid), a.mtime_sec)

    async def readdir(self, fid: int) -> list[FileInfo]:
        """List an opened directory."""
        out: list[FileInfo] = []
        offset = 0
        if not self.codec.dotl:
            while data := await self.read(fid, offset, self.iounit):
                offset += len(data)
                for st in decode_stats(data, self.codec.dotu):
                    out.append(FileInfo(st.name, st.qid, st.mode, st.length, st.uid, st.gid, st.mtime))
            return out
        while True:
            reply = await self.rpc(M.Treaddir(0, fid, offset, self.iounit))
            entries = decode_dirents(reply.data)
            if not entries:
                return out
            for qid, off, _dtype, name in entries:
                offset = off
                mode = P.DMDIR if qid.type & P.QTDIR else 0
                out.append(FileInfo(name, qid, mode, 0, "", "", 0))

    # ------------------------------------------------------------ whole-path helpers
    async def read_file(self, path: str) -> bytes:
        fid = await self.walk(path)
        try:
            await self.open(fid, P.OREAD)
            chunks, offset = [], 0
            while data := await self.read(fid, offset, self.iounit):
                chunks.append(data)
                offset += len(data)
            return b"".join(chunks)
        finally:
            await self.clunk(fid)

    async def write_file(self, path: str, data: bytes, *, create: bool = False, read_reply: bool = False) -> bytes:
        """Write ``data`` to ``path`` (truncating); with ``read_reply`` read the fid back.

        Reading back on the same fid is how a ctl file answers a command.
        """
        try:
            fid = await self.walk(path)
            await self.open(fid, (P.ORDWR if read_reply else P.OWRITE) | P.OTRUNC)
        except P9Error as e:
            if not create or e.errno != E.ENOENT:
                raise
            parent, _, name = path.rstrip("/").rpartition("/")
            fid = await self.walk(parent)
            try:
                await self.create(fid, name, 0o666, P.ORDWR if read_reply else P.OWRITE)
            except BaseException:
                await self.clunk(fid)
                raise
        try:
            offset = 0
            while True:  # one write even for empty data
                n = await self.write(fid, offset, data[offset : offset + self.iounit])
                offset += n
                if offset >= len(data):
                    break
                if n == 0:
                    raise P9Error("short write", E.EIO)
            if not read_reply:
                return b""
            chunks, roff = [], 0
            while chunk := await self.read(fid, roff, self.iounit):
                chunks.append(chunk)
                roff += len(chunk)
            return b"".join(chunks)
        finally:
            await self.clunk(fid)

    async def ls(self, path: str) -> list[FileInfo]:
        fid = await self.walk(path)
        try:
            await self.open(fid, P.OREAD)
            return await self.readdir(fid)
        finally:
            await self.clunk(fid)

    async def stat_path(self, path: str) -> FileInfo:
        fid = await self.walk(path)
        try:
            info = await self.stat(fid)
            if not info.name:
                info.name = path.rstrip("/").rpartition("/")[2] or "/"
            return info
        finally:
            await self.clunk(fid)

    async def mkdir(self, path: str, perm: int = 0o755) -> None:
        parent, _, name = path.rstrip("/").rpartition("/")
        fid = await self.walk(parent)
        try:
            await self.create(fid, name, P.DMDIR | perm, P.OREAD)
        finally:
            await self.clunk(fid)


def _expire(fut: asyncio.Future[Message]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _local_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return "none"

"""What a 9P client does, without any I/O: the operations as generators of requests.

Each operation (walk, read a whole file, write and read back, list, ...)
is a generator that yields the request it needs answered and is sent the
reply, or has the transport's error thrown into it, and returns its result.
Two thin shells drive the same generators: the asyncio ``Client``
(fornax_sched.fs.client) for daemons, and ``BlockingClient``
(fornax_sched.fs.blocking) for one-shot commands, which must start without
asyncio's import (a third of a shell command's time).  So what a walk error
says, how a ctl reply is read back, and when fids are clunked are written
once.

This module imports no asyncio, no sockets and no clocks.
"""

from __future__ import annotations

import errno as E
import os
from collections.abc import Generator

from . import codec as M
from . import proto as P
from .codec import CODECS, Codec, Framer, Message, Qid, decode_dirents, decode_stats
from .dial import Address
from .errors import P9Error

TYPE_CHECKING = False  # (not typing's: importing typing is a tenth of a shell command's start-up)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")
    Op = Generator[Message, Any, T]  # yields requests, is sent replies, returns a result


class FileInfo:
    """What stat (9P2000) or getattr (9P2000.L) says of a file, in one shape."""

    __slots__ = ("name", "qid", "mode", "length", "uid", "gid", "mtime")

    def __init__(self, name: str, qid: Qid, mode: int, length: int, uid: str, gid: str, mtime: int) -> None:
        self.name, self.qid, self.mode, self.length = name, qid, mode, length
        self.uid, self.gid, self.mtime = uid, gid, mtime

    @property
    def is_dir(self) -> bool:
        return bool(self.mode & P.DMDIR)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileInfo):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "FileInfo(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__) + ")"


def check_reply(msg: Message, reply: Message) -> Any:
    """The reply to ``msg`` if it is its R-message; a refusal raises P9Error with the server's words."""
    if isinstance(reply, M.Rerror):
        raise P9Error(reply.ename, reply.errno or P.ERRNO_OF_MESSAGE.get(reply.ename, E.EIO))
    if isinstance(reply, M.Rlerror):
        raise P9Error(os.strerror(reply.ecode), reply.ecode)
    if reply.TYPE != msg.TYPE + 1:
        raise P9Error(f"server answered {type(msg).__name__} with {type(reply).__name__}", E.EPROTO)
    return reply


def decode_frame(codec: Codec, frame: bytes) -> Message:
    """Decode a reply; a 9P2000.L server refusing our Tversion answers Rlerror, which other dialects lack."""
    if frame[4] == M.Rlerror.TYPE and not codec.knows(M.Rlerror.TYPE):
        codec = CODECS[P.VERSION_9PL]
    return codec.decode(frame)


class ClientCore:
    """The state of one 9P connection that does not depend on how bytes move: dialect, fids, root."""

    def __init__(self, address: Address, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.codec: Codec = CODECS[P.VERSION_9P]
        self.msize = P.DEFAULT_MSIZE
        self.root = 0
        self.root_qid = Qid(0, 0, 0)
        self._framer = Framer(P.DEFAULT_MSIZE)
        self._free_fids: list[int] = []
        self._next_fid = 1

    @property
    def dialect(self) -> str:
        return self.codec.dialect

    @property
    def iounit(self) -> int:
        return self.msize - P.IOHDRSZ

    # ------------------------------------------------------------ the handshake
    def _op_negotiate(self, version: str, msize: int) -> Op[None]:
        try:
            reply = yield M.Tversion(P.NOTAG, msize, version)
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

    def _op_handshake(self, version: str, msize: int, uname: str | None, aname: str) -> Op[None]:
        yield from self._op_negotiate(version, msize)
        user = uname if uname is not None else local_user()
        nuname = os.getuid() if uname is None else P.NONUNAME
        reply = yield M.Tattach(0, self.root, P.NOFID, user, aname, nuname)
        self.root_qid = reply.qid

    # ------------------------------------------------------------ fids
    def _fid(self) -> int:
        if self._free_fids:
            return self._free_fids.pop()
        self._next_fid += 1
        return self._next_fid - 1

    def _op_walk(self, path: str | list[str] | tuple[str, ...], fid: int | None = None) -> Op[int]:
        """Walk from ``fid`` (the root by default) to ``path``; a new fid.  An error names the path walked."""
        names = [n for n in path.split("/") if n] if isinstance(path, str) else list(path)
        start = self.root if fid is None else fid
        newfid = self._fid()
        done: list[str] = []
        holds = False  # whether the server knows newfid (after the first step)
        try:
            while True:  # 9P walks at most 16 names a message; longer paths walk in steps
                step, names = names[: P.MAXWELEM], names[P.MAXWELEM :]
                src = newfid if holds else start
                try:
                    reply = yield M.Twalk(0, src, newfid, tuple(step))
                except P9Error as e:  # refused at its first name: the server's words, and the name
                    raise P9Error(f"{'/'.join(done + step[:1]) or '/'}: {e}", e.errno) from None
                if len(reply.qids) != len(step):
                    yield from self._op_walk_error(src, done, step, len(reply.qids))
                holds = True
                done += step
                if not names:
                    return newfid
        except BaseException:
            if holds:
                yield from self._op_clunk(newfid)  # (which frees it)
            else:
                self._free_fids.append(newfid)
            raise

    def _op_walk_error(self, src: int, done: list[str], step: list[str], reached: int) -> Op[None]:
        """A walk stopped part way; ask again for the failing name alone to learn why."""
        where = "/".join(done + step[: reached + 1])
        tmp = self._fid()
        try:
            yield M.Twalk(0, src, tmp, tuple(step[:reached]))
            try:
                yield M.Twalk(0, tmp, tmp, (step[reached],))
            finally:
                yield M.Tclunk(0, tmp)
        except P9Error as e:
            raise P9Error(f"{where}: {e}", e.errno) from None
        finally:
            self._free_fids.append(tmp)
        raise P9Error(f"{where}: {P.ENOENT_MSG}", E.ENOENT)

    def _op_open(self, fid: int, mode: int = P.OREAD) -> Op[tuple[Qid, int]]:
        if self.codec.dotl:
            flags = (mode & 3) | (P.L_O_TRUNC if mode & P.OTRUNC else 0)
            reply = yield M.Tlopen(0, fid, flags)
        else:
            reply = yield M.Topen(0, fid, mode)
        return reply.qid, reply.iounit or self.iounit

    def _op_create(self, fid: int, name: str, perm: int, mode: int = P.OREAD) -> Op[Qid]:
        if self.codec.dotl:
            if perm & P.DMDIR:
                dfid = yield from self._op_walk([], fid)
                try:
                    return (yield M.Tmkdir(0, dfid, name, perm & 0o777, os.getgid())).qid
                finally:
                    yield from self._op_clunk(dfid)
            flags = (mode & 3) | P.L_O_CREAT | (P.L_O_TRUNC if mode & P.OTRUNC else 0)
            reply = yield M.Tlcreate(0, fid, name, flags, perm & 0o777, os.getgid())
        else:
            reply = yield M.Tcreate(0, fid, name, perm, mode)
        return reply.qid

    def _op_read(self, fid: int, offset: int, count: int) -> Op[bytes]:
        return (yield M.Tread(0, fid, offset, min(count, self.iounit))).data

    def _op_write(self, fid: int, offset: int, data: bytes) -> Op[int]:
        return (yield M.Twrite(0, fid, offset, data)).count

    def _op_clunk(self, fid: int) -> Op[None]:
        """Clunk ``fid``.  On a connection that is gone there is nothing to clunk (the server forgot
        its fids with it): then nothing is raised, so that the error an operation's own request met
        (a Twrite that timed out, say) is the one its caller sees, not the clunk's after it."""
        try:
            yield M.Tclunk(0, fid)
        except ConnectionError:
            pass
        finally:
            if fid != self.root:
                self._free_fids.append(fid)

    def _op_remove(self, path: str) -> Op[None]:
        fid = yield from self._op_walk(path)
        try:
            yield M.Tremove(0, fid)
        finally:
            self._free_fids.append(fid)

    def _op_stat(self, fid: int) -> Op[FileInfo]:
        if not self.codec.dotl:
            st = (yield M.Tstat(0, fid)).stat
            return FileInfo(st.name, st.qid, st.mode, st.length, st.uid, st.gid, st.mtime)
        a = yield M.Tgetattr(0, fid, P.GETATTR_BASIC)
        mode = (a.mode & 0o777) | (P.DMDIR if a.mode & P.S_IFDIR == P.S_IFDIR else 0)
        return FileInfo("", a.qid, mode, a.size, str(a.uid), str(a.gid), a.mtime_sec)

    def _op_readdir(self, fid: int, limit: int | None = None) -> Op[list[FileInfo]]:
        out: list[FileInfo] = []
        offset = 0
        if not self.codec.dotl:
            while data := (yield from self._op_read(fid, offset, self.iounit)):
                offset += len(data)
                for st in decode_stats(data, self.codec.dotu):
                    out.append(FileInfo(st.name, st.qid, st.mode, st.length, st.uid, st.gid, st.mtime))
                _check_entries(out, limit)
            return out
        while True:
            reply = yield M.Treaddir(0, fid, offset, self.iounit)
            entries = decode_dirents(reply.data)
            if not entries:
                return out
            for qid, off, _dtype, name in entries:
                offset = off
                mode = P.DMDIR if qid.type & P.QTDIR else 0
                out.append(FileInfo(name, qid, mode, 0, "", "", 0))
            _check_entries(out, limit)

    # ------------------------------------------------------------ whole-path operations
    def _op_read_file(self, path: str, limit: int | None = None) -> Op[bytes]:
        fid = yield from self._op_walk(path)
        try:
            yield from self._op_open(fid, P.OREAD)
            chunks, offset = [], 0
            while data := (yield from self._op_read(fid, offset, self.iounit)):
                chunks.append(data)
                offset += len(data)
                if limit is not None and offset > limit:  # (a server whose file never ends)
                    raise P9Error(f"{path}: longer than {limit} bytes", E.EFBIG)
            return b"".join(chunks)
        finally:
            yield from self._op_clunk(fid)

    def _op_write_file(self, path: str, data: bytes, create: bool, read_reply: bool) -> Op[bytes]:
        try:
            fid = yield from self._op_walk(path)
            try:
                yield from self._op_open(fid, (P.ORDWR if read_reply else P.OWRITE) | P.OTRUNC)
            except BaseException:
                yield from self._op_clunk(fid)
                raise
        except P9Error as e:
            if not create or e.errno != E.ENOENT:
                raise
            parent, _, name = path.rstrip("/").rpartition("/")
            fid = yield from self._op_walk(parent)
            try:
                yield from self._op_create(fid, name, 0o666, P.ORDWR if read_reply else P.OWRITE)
            except BaseException:
                yield from self._op_clunk(fid)
                raise
        try:
            offset = 0
            while True:  # one write even for empty data
                n = yield from self._op_write(fid, offset, data[offset : offset + self.iounit])
                offset += n
                if offset >= len(data):
                    break
                if n == 0:
                    raise P9Error("short write", E.EIO)
            if not read_reply:
                return b""
            chunks, roff = [], 0
            while chunk := (yield from self._op_read(fid, roff, self.iounit)):
                chunks.append(chunk)
                roff += len(chunk)
            return b"".join(chunks)
        finally:
            yield from self._op_clunk(fid)

    def _op_ls(self, path: str, limit: int | None = None) -> Op[list[FileInfo]]:
        fid = yield from self._op_walk(path)
        try:
            yield from self._op_open(fid, P.OREAD)
            try:
                return (yield from self._op_readdir(fid, limit))
            except P9Error as e:
                if e.errno == E.EFBIG:
                    raise P9Error(f"{path}: {e.message}", E.EFBIG) from None
                raise
        finally:
            yield from self._op_clunk(fid)

    def _op_stat_path(self, path: str) -> Op[FileInfo]:
        fid = yield from self._op_walk(path)
        try:
            info = yield from self._op_stat(fid)
            if not info.name:
                info.name = path.rstrip("/").rpartition("/")[2] or "/"
            return info
        finally:
            yield from self._op_clunk(fid)

    def _op_mkdir(self, path: str, perm: int = 0o755) -> Op[None]:
        parent, _, name = path.rstrip("/").rpartition("/")
        fid = yield from self._op_walk(parent)
        try:
            yield from self._op_create(fid, name, P.DMDIR | perm, P.OREAD)
        finally:
            yield from self._op_clunk(fid)


def local_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return "none"


def _check_entries(out: list[FileInfo], limit: int | None) -> None:
    if limit is not None and len(out) > limit:  # (a server whose directory never ends)
        raise P9Error(f"more than {limit} entries", E.EFBIG)

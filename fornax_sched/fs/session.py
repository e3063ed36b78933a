"""The 9P protocol state of one connection, sans-IO (after h11).

Bytes in, work and bytes out: ``Session.receive_data`` takes what the peer
sent, ``process`` answers the whole frames buffered so far and says what
the I/O layer must do (``Output``): frames to send, coroutines to run (a
file callback that waits), work to cancel (a flushed request), or that the
connection must be dropped.  When a coroutine ends, ``finished`` turns its
outcome into the reply, unless the request was flushed in the meantime.

The session holds tags, Tflush and Tversion semantics, fids and the
per-connection limits; it has no socket, no clock (the time Tsetattr sets
is passed in) and no password file (name and id lookups come in
``Config.users``).  ``fornax_sched.fs.server`` is the asyncio shell.
"""

from __future__ import annotations

import errno as E
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from . import codec as M
from . import proto as P
from .codec import CODECS, Codec, Framer, Message, ProtocolError, Stat, encode_dirent, encode_stat
from .errors import P9Error, eacces, ebadf, einval, enoent, eopnotsupp, eperm
from .tree import Ctx, Dir, Handle, Node

log = logging.getLogger("fornax_sched.fs.session")

Reply = Message | Coroutine[Any, Any, Message]
Attach = Callable[[Ctx, str], Dir]
# Told of every request answered (or flushed): the operation ("read", "walk": the T-message's name
# without its T, in lower case), the result ("ok", "error", "flushed") and the seconds it took.
Observe = Callable[[str, str, float], None]
Work = Coroutine[Any, Any, Message | None]

BATCH = 1 << 16  # bytes of replies ``process`` makes before it returns, so the shell can write them


def _numeric_id(name: str) -> int:
    return int(name) if name.isdigit() else 65534  # nobody


@dataclass(frozen=True)
class Users:
    """How user and group names map to the numbers 9P2000.u and 9P2000.L carry.

    The defaults need no password file (a numeric name is its own id, any
    other is nobody); the asyncio server installs the system's (pwd, grp).
    """

    uid: Callable[[str], int] = _numeric_id
    gid: Callable[[str], int] = _numeric_id
    name: Callable[[int], str] = str


class Output:
    """What the I/O layer must do after the session has had its say."""

    __slots__ = ("send", "start", "cancel", "hangup", "more")

    def __init__(self, send: list[bytes] | None = None, start: list[tuple[int, Work]] | None = None,
                 cancel: list[int] | None = None, hangup: str | None = None, more: bool = False) -> None:
        self.send = send if send is not None else []  # frames to write, in this order
        self.start = start if start is not None else []  # (token, coroutine) to run
        self.cancel = cancel if cancel is not None else []  # tokens of work no longer wanted
        self.hangup = hangup  # drop the connection, for this reason
        self.more = more  # stopped at the batch size with whole frames still buffered

    def __bool__(self) -> bool:
        return bool(self.send or self.start or self.cancel or self.hangup)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Output):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Output(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__) + ")"


_NOT_OPEN = -1
_NEED = {P.OREAD: 4, P.OWRITE: 2, P.ORDWR: 6, P.OEXEC: 1}


class Fid:
    __slots__ = ("node", "ctx", "handle", "omode", "dirents", "dirents_size", "dir_index", "dir_offset", "held",
                 "writes", "after")

    def __init__(self, node: Node, ctx: Ctx) -> None:
        self.node = node
        self.ctx = ctx
        self.handle: Handle | None = None
        self.omode = _NOT_OPEN
        self.dirents: list[bytes] | None = None  # a directory's entries, encoded at the first read
        self.dirents_size = 0
        self.dir_index = 0
        self.dir_offset = 0
        self.held = 0  # bytes counted against the session's bound for this fid
        self.writes = 0  # writes through it whose callbacks are still running
        self.after: list[tuple[int, Message, int]] | None = None  # reads waiting for them: (token, Tread, size)


class Config:
    """What every session of one server shares."""

    def __init__(
        self,
        attach: Attach,
        *,
        msize: int = P.DEFAULT_MSIZE,
        dialects: tuple[str, ...] = P.DIALECTS,
        groups: dict[str, frozenset[str]] | None = None,
        max_fids: int = 16384,
        max_inflight: int = 256,
        max_held: int = 32 << 20,
        users: Users | None = None,
        observe: Observe | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if msize < P.MIN_MSIZE:
            raise ValueError(f"msize {msize} below {P.MIN_MSIZE}")
        self.attach = attach
        self.msize = msize
        self.dialects = dialects
        self.groups = groups or {}
        self.max_fids = max_fids
        self.max_inflight = max_inflight
        self.max_held = max_held  # bytes one connection may keep: snapshots, entries, writes in flight
        self.users = users or Users()
        self.observe = observe  # None: nobody counts requests (and no clock is read)
        self.clock = clock or time.perf_counter  # the seconds ``observe`` is told (any monotonic clock)


def _op(kind: type[Message]) -> str:
    """A request's operation as ``Observe`` names it: Tread is "read"."""
    return kind.__name__[1:].lower()


class Session:
    """The protocol state of one connection, with no I/O."""

    def __init__(self, config: Config, conn_id: int = 0) -> None:
        self.config = config
        self.conn_id = conn_id
        self.users = config.users
        self.codec: Codec = CODECS[P.VERSION_9P]
        self.msize = config.msize
        self.negotiated = False
        self.attached = False  # some Tattach succeeded since the last Tversion
        self.fids: dict[int, Fid] = {}
        self.framer = Framer(config.msize)
        self._tags: dict[int, int] = {}  # tag of a request in flight -> its token
        self._work: dict[int, int | None] = {}  # token -> tag (None: work that answers nothing)
        self._began: dict[int, tuple[str, float]] = {}  # token -> (operation, clock) while observed
        self._next_token = 0
        self.held = 0  # bytes the fids keep between requests (snapshots, directory entries, gathered writes)
        self._writing: dict[int, int] = {}  # token of a write in flight -> bytes it carries
        self.writing = 0  # their sum
        self._written: dict[int, Fid] = {}  # token of a write in flight -> its fid (see _park)
        self._out = Output()  # what the entry point now running collects
        self._now = 0.0  # seconds since the epoch, as the shell last said
        h = M.MESSAGES
        self._handlers: dict[type[Message], Callable[[Any], Reply]] = {
            h["Tversion"]: self._version,
            h["Tauth"]: self._auth,
            h["Tattach"]: self._attach,
            h["Twalk"]: self._walk,
            h["Topen"]: self._open,
            h["Tlopen"]: self._lopen,
            h["Tcreate"]: self._create,
            h["Tlcreate"]: self._lcreate,
            h["Tmkdir"]: self._mkdir,
            h["Tread"]: self._read,
            h["Treaddir"]: self._readdir,
            h["Twrite"]: self._write,
            h["Tclunk"]: self._clunk,
            h["Tremove"]: self._remove,
            h["Tunlinkat"]: self._unlinkat,
            h["Tstat"]: self._stat,
            h["Twstat"]: self._wstat,
            h["Tgetattr"]: self._getattr,
            h["Tsetattr"]: self._setattr,
            h["Tstatfs"]: self._statfs,
            h["Tfsync"]: lambda m: M.Rfsync(m.tag),
            h["Trename"]: self._rename,
            h["Trenameat"]: self._renameat,
            h["Txattrwalk"]: self._unsupported("extended attributes"),
            h["Txattrcreate"]: self._unsupported("extended attributes"),
            h["Tlock"]: self._unsupported("locks"),
            h["Tgetlock"]: self._unsupported("locks"),
            h["Tlink"]: self._unsupported("hard links"),
            h["Tsymlink"]: self._unsupported("symbolic links"),
            h["Tmknod"]: self._unsupported("device files"),
            h["Treadlink"]: self._readlink,
        }

    # ------------------------------------------------------------ the I/O layer's entry points
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``process`` answers them."""
        self.framer.feed(data)

    @property
    def in_flight(self) -> int:
        """Requests whose replies wait on a coroutine."""
        return len(self._tags)

    @property
    def saturated(self) -> bool:
        """True while no more requests may start: the shell stops reading until some finish."""
        return len(self._tags) >= self.config.max_inflight

    def process(self, now: float, budget: int = BATCH) -> Output:
        """Answer the whole frames buffered so far, up to ``budget`` bytes of replies.

        ``now`` (seconds since the epoch) is the time Tsetattr records.
        Stops early while saturated; ``more`` says the budget ran out first.
        """
        out = self._out = Output()
        self._now = now
        size = 0
        tags, cap, framer = self._tags, self.config.max_inflight, self.framer
        try:
            while len(tags) < cap:
                if size >= budget:
                    out.more = framer.buffered() > 0
                    break
                frame = framer.next_frame()
                if frame is None:
                    break
                try:
                    reply = self._request(self.codec.decode(frame), len(frame))
                except ProtocolError as e:
                    reply = self.protocol_error(e)
                    if reply is None:
                        raise
                if reply is not None:
                    try:
                        data = self.codec.encode(reply)
                    except ProtocolError:
                        data = self._frame(reply)
                    out.send.append(data)
                    size += len(data)
        except ProtocolError as e:  # the stream cannot be resynchronised
            out.hangup = str(e)
        return out

    def finished(self, token: int, outcome: Message | BaseException | None) -> Output:
        """Work ``token`` ended with a reply (or an exception): the frame to send, if still wanted."""
        out = Output()
        if token not in self._work:
            return out  # flushed, or cancelled by Tversion or the hang-up
        tag = self._work.pop(token)
        self._unwrite(token)
        self._out = out  # (reads that waited for this write are answered into it, after its reply)
        if tag is None:  # close work: nothing to answer
            if isinstance(outcome, BaseException):
                log.error("9P close failed: %r", outcome)
            return out
        del self._tags[tag]
        if isinstance(outcome, BaseException):
            log.error("9P request failed: %r", outcome)
            outcome = self.error(tag, P9Error(P.EIO_MSG, E.EIO))
        elif outcome is None:
            outcome = self.error(tag, P9Error(P.EIO_MSG, E.EIO))
        began = self._began.pop(token, None)
        if began is not None:
            self._told(began[0], outcome, began[1])
        out.send.append(self._frame(outcome))
        self._wrote(token)
        return out

    def _told(self, op: str, reply: Message | None, began: float, result: str | None = None) -> None:
        """Tell ``config.observe`` of one request; a hook that fails is logged, never the client's problem."""
        observe = self.config.observe
        if observe is None:
            return
        if result is None:
            result = "error" if isinstance(reply, (M.Rerror, M.Rlerror)) else "ok"
        try:
            observe(op, result, self.config.clock() - began)
        except Exception:
            log.exception("9P observe hook failed")

    def lost(self) -> Output:
        """The connection is gone: cancel the requests in flight and drop every fid.

        Close work already started (at a Tversion) runs to its end.
        """
        out = Output(cancel=list(self._tags.values()))
        self._forget_in_flight()
        self._reset(orderly=False)
        return out

    # ------------------------------------------------------------ requests, tags, flushes
    def _request(self, msg: Message, size: int) -> Message | None:
        """One decoded request (of ``size`` bytes): its reply now, or None when work was started for it."""
        tag = msg.tag
        if tag in self._tags:
            return self.error(tag, P9Error("duplicate tag", E.EINVAL))  # as lib9p answers
        kind = type(msg)
        if kind is M.Tflush:
            # flush(5): forget oldtag if it is in flight (its reply is never
            # sent) and answer Rflush in any case, never Rerror.
            token = self._tags.pop(msg.oldtag, None)
            if token is not None:
                del self._work[token]
                self._unwrite(token)
                self._out.cancel.append(token)
                flushed = self._began.pop(token, None)
                if flushed is not None:
                    self._told(flushed[0], None, flushed[1], "flushed")
                self._wrote(token)
            return M.Rflush(tag)
        if kind is M.Tversion:
            # version(5): all outstanding I/O is aborted, and no reply to it goes out.
            self._out.cancel.extend(self._tags.values())
            self._forget_in_flight()
        if kind is M.Tread and (fid := self.fids.get(msg.fid)) is not None and fid.writes:
            self._park(fid, msg, size)
            return None
        observed = self.config.observe is not None
        began = self.config.clock() if observed else 0.0
        reply = self.dispatch(msg)
        if isinstance(reply, Message):
            if observed:
                self._told(_op(kind), reply, began)
            return reply
        token = self._tags[tag] = self._start(reply, tag)
        if observed:
            self._began[token] = (_op(kind), began)
        if kind is M.Twrite:  # its data is held until the write's callback is done
            self._writing[token] = size
            self.writing += size
            if (fid := self.fids.get(msg.fid)) is not None:
                fid.writes += 1
                self._written[token] = fid
        return None

    def _park(self, fid: Fid, msg: Message, size: int) -> None:
        """A read on a fid with a write still in flight waits for it (for every write in flight on
        that fid) and then reads what it left: a ctl file's reply.  So a client may send a command
        and the read of its reply together, one round trip, as it could to a server that answers
        in order.  The read is in flight meanwhile (a Tflush forgets it)."""
        self._next_token += 1
        token = self._next_token
        self._work[token] = msg.tag
        self._tags[msg.tag] = token
        if fid.after is None:
            fid.after = []
        fid.after.append((token, msg, size))

    def _wrote(self, token: int) -> None:
        """Write ``token`` is done (answered or flushed): once its fid has none in flight, the reads
        that waited are answered (into ``_out``), in the order they came."""
        fid = self._written.pop(token, None)
        if fid is None:
            return
        fid.writes -= 1
        if fid.writes or not fid.after:
            return
        waiting, fid.after = fid.after, None
        for tok, msg, size in waiting:
            if self._work.pop(tok, None) is None:
                continue  # flushed while it waited
            del self._tags[msg.tag]
            if self.fids.get(msg.fid) is not fid:  # clunked meanwhile (its number maybe reused)
                self._out.send.append(self._frame(self.error(msg.tag, ebadf())))
                continue
            reply = self._request(msg, size)
            if reply is not None:
                self._out.send.append(self._frame(reply))

    def _forget_in_flight(self) -> None:
        for token in self._tags.values():
            del self._work[token]
            self._began.pop(token, None)
        self._tags.clear()
        self._writing.clear()
        self.writing = 0
        for fid in self._written.values():
            fid.writes, fid.after = 0, None
        self._written.clear()

    def _unwrite(self, token: int) -> None:
        self.writing -= self._writing.pop(token, 0)

    def _start(self, work: Work, tag: int | None) -> int:
        self._next_token += 1
        token = self._next_token
        self._work[token] = tag
        self._out.start.append((token, work))
        return token

    def _frame(self, reply: Message) -> bytes:
        try:
            return self.codec.encode(reply)
        except ProtocolError as e:  # a reply the tree made unencodable (a name over 64 KiB, say)
            log.error("9P reply %s cannot be encoded: %s", type(reply).__name__, e)
            return self.codec.encode(self.error(reply.tag, P9Error(P.EIO_MSG, E.EIO)))

    # ------------------------------------------------------------ lower level
    def decode(self, frame: bytes) -> Message:
        """Decode a frame; ProtocolError carries the tag when there is one."""
        return self.codec.decode(frame)

    def encode(self, msg: Message) -> bytes:
        return self.codec.encode(msg)

    def dispatch(self, msg: Message) -> Reply:
        """Answer one request: a reply now, or a coroutine that makes it later.

        Tags are not looked at here (``process`` does that).
        """
        if not self.negotiated and not isinstance(msg, M.Tversion):
            return self.error(msg.tag, P9Error("version not negotiated: send Tversion first", E.EPROTO))
        handler = self._handlers.get(type(msg))
        if handler is None:
            return self.error(msg.tag, einval(f"unexpected message {type(msg).__name__}"))
        try:
            return handler(msg)
        except P9Error as e:
            return self.error(msg.tag, e)
        except Exception:  # a bug in a tree callback must not take the connection down
            log.exception("9P %s failed", type(msg).__name__)
            return self.error(msg.tag, P9Error(P.EIO_MSG, E.EIO))

    def error(self, tag: int, err: P9Error) -> Message:
        if self.codec.dotl:
            return M.Rlerror(tag, err.errno)
        return M.Rerror(tag, err.message[:1024], err.errno)

    def protocol_error(self, err: ProtocolError) -> Message | None:
        """The reply to an undecodable message, if it had a readable tag."""
        if err.tag is None:
            return None
        code = E.EOPNOTSUPP if str(err).startswith("unknown message type") else E.EPROTO
        return self.error(err.tag, P9Error(f"bad message: {err}", code))

    def _reset(self, orderly: bool) -> None:
        """Drop every fid (at Tversion or hang-up); an orderly reset starts their close work."""
        for fid in self.fids.values():
            aw = self._release(fid, orderly)
            if aw is not None:
                self._start(_background(aw), None)
        self.fids.clear()
        self.held = 0
        self.attached = False

    # ------------------------------------------------------------ helpers
    def _fid(self, n: int) -> Fid:
        fid = self.fids.get(n)
        if fid is None:
            raise ebadf()
        return fid

    def _new_fid(self, n: int) -> None:
        if n in self.fids:
            raise ebadf("fid already in use")
        if n == P.NOFID:
            raise ebadf("NOFID is not a usable fid")
        if len(self.fids) >= self.config.max_fids:
            raise P9Error(f"too many fids (limit {self.config.max_fids})", E.EMFILE)

    def _iounit(self) -> int:
        return self.msize - P.IOHDRSZ

    def _later(self, tag: int, pending: Awaitable[Any], make: Callable[[Any], Message]) -> Reply:
        async def finish() -> Message:
            try:
                return make(await pending)
            except P9Error as e:
                return self.error(tag, e)
            except Exception:
                log.exception("9P callback failed")
                return self.error(tag, P9Error(P.EIO_MSG, E.EIO))

        return finish()

    def _unsupported(self, what: str) -> Callable[[Any], Reply]:
        def refuse(m: Message) -> Reply:
            raise eopnotsupp(what)

        return refuse

    def _release(self, fid: Fid, orderly: bool) -> Awaitable[None] | None:
        """Close what a fid holds; with ORCLOSE remove its file."""
        aw = None
        self.held -= fid.held
        fid.held = fid.dirents_size = 0
        fid.dirents = None
        if fid.handle is not None:
            handle, fid.handle = fid.handle, None
            if orderly:
                aw = handle.close()
        if fid.omode != _NOT_OPEN and fid.omode & P.ORCLOSE:
            parent = fid.node.parent
            if parent is not None:
                try:
                    parent.remove(fid.ctx, fid.node)
                except P9Error as e:
                    log.info("remove-on-close of %s refused: %s", fid.node.name, e)
        fid.omode = _NOT_OPEN
        return aw

    def _stat_of(self, node: Node, ctx: Ctx) -> Stat:
        st = node.stat(ctx)
        if self.codec.dotu:
            st.n_uid, st.n_gid, st.n_muid = self.users.uid(st.uid), self.users.gid(st.gid), self.users.uid(st.muid)
        return st

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise P9Error("illegal name", E.EINVAL)

    # ------------------------------------------------------------ session
    def _version(self, m: Any) -> Reply:
        self._reset(orderly=True)
        self.negotiated = False
        if m.tag != P.NOTAG:
            log.debug("Tversion with tag %d instead of NOTAG", m.tag)
        msize = min(m.msize, self.config.msize)
        version = m.version
        for d in (P.VERSION_9PL, P.VERSION_9PU):
            if version == d and d in self.config.dialects:
                break
        else:
            version = P.VERSION_9P if version.startswith("9P2000") else "unknown"
            if version not in self.config.dialects:
                version = "unknown"
        if version == "unknown" or msize < P.MIN_MSIZE:
            return M.Rversion(m.tag, msize, "unknown")
        self.msize = msize
        self.framer.msize = msize
        reply = M.Rversion(m.tag, msize, version)
        self.codec = CODECS[version]
        self.negotiated = True
        return reply

    def _auth(self, m: Any) -> Reply:
        # ENOENT is how 9P2000.L servers (diod) say "no auth needed"; its
        # clients go on to attach only on that errno.
        raise P9Error("authentication not required", E.ENOENT)

    def _attach(self, m: Any) -> Reply:
        if m.afid != P.NOFID:
            raise P9Error("authentication not required: attach with afid NOFID", E.EINVAL)
        self._new_fid(m.fid)
        if m.n_uname != P.NONUNAME and self.codec.dialect != P.VERSION_9P:
            user = self.users.name(m.n_uname)
        else:
            user = m.uname or "none"
        ctx = Ctx(user, self.config.groups, self.conn_id, self._iounit())
        root = self.config.attach(ctx, m.aname)
        self.fids[m.fid] = Fid(root, ctx)
        self.attached = True
        return M.Rattach(m.tag, root.qid())

    # ------------------------------------------------------------ walking
    def _walk(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        # 9P2000 forbids walking an open fid; 9P2000.L peers (diodls -l) walk
        # from an open directory to a new fid, as diod allows.
        if fid.omode != _NOT_OPEN and (m.newfid == m.fid or not self.codec.dotl):
            raise ebadf("cannot walk an open fid")
        if m.newfid != m.fid:
            self._new_fid(m.newfid)
        if len(m.wnames) > P.MAXWELEM:
            raise einval(f"walk of more than {P.MAXWELEM} names")
        node = fid.node
        ctx = fid.ctx
        qids = []
        for i, name in enumerate(m.wnames):
            nxt: Node | None
            try:
                if not isinstance(node, Dir):
                    raise P9Error(P.ENOTDIR_MSG, E.ENOTDIR)
                if not node.allows(ctx, 1):
                    raise eacces()
                if name == "..":
                    nxt = node.parent or node
                elif name == ".":
                    nxt = node
                elif not name or "/" in name:
                    raise enoent()
                else:
                    nxt = node.lookup(ctx, name)
                    if nxt is None:
                        raise enoent()
            except P9Error:
                if i == 0:
                    raise
                break
            qids.append(nxt.qid())
            node = nxt
        if len(qids) == len(m.wnames):
            if m.newfid == m.fid:
                fid.node = node
            else:
                self.fids[m.newfid] = Fid(node, ctx)
        return M.Rwalk(m.tag, tuple(qids))

    # ------------------------------------------------------------ opening
    def _open_fid(self, fid: Fid, mode: int) -> None:
        if fid.omode != _NOT_OPEN:
            raise ebadf("fid already open")
        node = fid.node
        ctx = fid.ctx
        acc = mode & 3
        need = _NEED[acc] | (2 if mode & P.OTRUNC else 0)
        if node.is_dir and (acc not in (P.OREAD, P.OEXEC) or mode & P.OTRUNC):
            raise P9Error(P.EISDIR_MSG, E.EISDIR)
        if not node.allows(ctx, need):
            raise node.refusal(ctx, need)
        if mode & P.ORCLOSE and (node.parent is None or not node.parent.allows(ctx, 2)):
            raise eacces()
        if not node.is_dir:
            if mode & P.OTRUNC:
                node.truncate(ctx, 0)
            fid.handle = node.open(ctx, mode)
        self._set_dirents(fid, None)
        fid.omode = mode

    def _open(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        self._open_fid(fid, m.mode & (3 | P.OTRUNC | P.ORCLOSE))
        return M.Ropen(m.tag, fid.node.qid(), self._iounit())

    @staticmethod
    def _plan9_mode(flags: int) -> int:
        mode = flags & P.L_O_ACCMODE
        if mode == 3:
            raise einval("bad open mode")
        if flags & P.L_O_TRUNC:
            mode |= P.OTRUNC
        return mode

    def _lopen(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        self._open_fid(fid, self._plan9_mode(m.flags))
        return M.Rlopen(m.tag, fid.node.qid(), self._iounit())

    def _dir_for_create(self, fid: Fid, name: str) -> Dir:
        node = fid.node
        if not isinstance(node, Dir):
            raise P9Error("create in non-directory", E.ENOTDIR)
        if fid.omode != _NOT_OPEN:
            raise ebadf("fid already open")
        self._check_name(name)
        if not node.allows(fid.ctx, 2):
            raise eacces()
        return node

    def _create(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        parent = self._dir_for_create(fid, m.name)
        if m.perm & P.DMSPECIAL:
            raise eopnotsupp("special files")
        if m.perm & P.DMDIR:
            if m.mode & 3 != P.OREAD or m.mode & P.OTRUNC:
                raise einval("directories are created for reading only")
            perm = P.DMDIR | (m.perm & (~0o777 | (parent.mode & 0o777)) & 0o777)
        else:
            perm = m.perm & (~0o666 | (parent.mode & 0o666)) & 0o777
        node = parent.create(fid.ctx, m.name, perm)
        fid.node = node
        self._open_fid_created(fid, m.mode & (3 | P.OTRUNC | P.ORCLOSE))
        return M.Rcreate(m.tag, node.qid(), self._iounit())

    def _open_fid_created(self, fid: Fid, mode: int) -> None:
        # The creator may open what it made whatever the new file's mode says.
        node = fid.node
        if not node.is_dir:
            fid.handle = node.open(fid.ctx, mode)
        fid.omode = mode

    def _lcreate(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        parent = self._dir_for_create(fid, m.name)
        mode = self._plan9_mode(m.flags)
        node = parent.create(fid.ctx, m.name, m.mode & 0o777)
        fid.node = node
        self._open_fid_created(fid, mode)
        return M.Rlcreate(m.tag, node.qid(), self._iounit())

    def _mkdir(self, m: Any) -> Reply:
        dfid = self._fid(m.dfid)
        parent = self._dir_for_create(dfid, m.name)
        node = parent.create(dfid.ctx, m.name, P.DMDIR | (m.mode & 0o777))
        return M.Rmkdir(m.tag, node.qid())

    # ------------------------------------------------------------ reading and writing
    def _readable(self, m: Any) -> Fid:
        fid = self._fid(m.fid)
        if fid.omode == _NOT_OPEN or fid.omode & 3 == P.OWRITE:
            raise ebadf("fid not open for reading")
        return fid

    def _read(self, m: Any) -> Reply:
        fid = self._readable(m)
        count = min(m.count, self._iounit())
        if fid.node.is_dir:
            if self.codec.dotl:
                raise P9Error(P.EISDIR_MSG, E.EISDIR)
            return M.Rread(m.tag, self._dirread(fid, m.offset, count))
        assert fid.handle is not None
        data = fid.handle.read(m.offset, count)
        if isinstance(data, (bytes, bytearray)):
            self._kept(fid)
            return M.Rread(m.tag, bytes(data[:count]))

        def done(d: bytes) -> Message:
            self._kept(fid)
            return M.Rread(m.tag, bytes(d[:count]))

        return self._later(m.tag, data, done)

    # ------------------------------------------------------------ what a connection holds
    def too_much(self) -> P9Error:
        return P9Error(f"too much held open on this connection (limit {self.config.max_held})", E.EMFILE)

    def _recount(self, fid: Fid) -> int:
        """Count again what ``fid`` holds; returns how much that grew.

        A fid clunked while its callback ran was released already and
        counts 0: its handle is gone from it.
        """
        now = (fid.handle.held() if fid.handle is not None else 0) + fid.dirents_size
        grew = now - fid.held
        fid.held = now
        self.held += grew
        return grew

    def _kept(self, fid: Fid) -> None:
        """After a read or a write: past the bound, refuse it and shed what a read can compute again."""
        if fid.held == 0 and fid.handle is not None and fid.handle.held() == 0:
            return  # the common case (ramfs, a snapshot already counted) in one test
        if self._recount(fid) > 0 and self.held > self.config.max_held:
            if fid.handle is not None:
                fid.handle.shed()
            self._recount(fid)
            raise self.too_much()

    def _set_dirents(self, fid: Fid, entries: list[bytes] | None) -> None:
        fid.dirents = entries
        fid.dirents_size = sum(map(len, entries)) if entries else 0
        if self._recount(fid) > 0 and self.held > self.config.max_held:
            fid.dirents, fid.dirents_size = None, 0
            self._recount(fid)
            raise self.too_much()

    def _entries(self, fid: Fid) -> list[Node]:
        node = fid.node
        assert isinstance(node, Dir)
        return node.list(fid.ctx)

    def _dirread(self, fid: Fid, offset: int, count: int) -> bytes:
        if offset == 0 or fid.dirents is None:
            if offset != 0:
                raise P9Error("bad offset in directory read", E.ESPIPE)
            dotu = self.codec.dotu
            self._set_dirents(fid, [encode_stat(self._stat_of(n, fid.ctx), dotu) for n in self._entries(fid)])
            fid.dir_index = fid.dir_offset = 0
        elif offset != fid.dir_offset:
            raise P9Error("bad offset in directory read", E.ESPIPE)
        out, size, i = [], 0, fid.dir_index
        ents = fid.dirents
        assert ents is not None
        while i < len(ents) and size + len(ents[i]) <= count:
            out.append(ents[i])
            size += len(ents[i])
            i += 1
        # A count too small for the next entry gets an empty read (as lib9p
        # answers); Linux asks for what is left of its buffer, then reads on.
        fid.dir_index = i
        fid.dir_offset += size
        return b"".join(out)

    def _readdir(self, m: Any) -> Reply:
        fid = self._readable(m)
        if not fid.node.is_dir:
            raise P9Error(P.ENOTDIR_MSG, E.ENOTDIR)
        if m.offset == 0 or fid.dirents is None:
            self._set_dirents(fid, [
                encode_dirent(n.qid(), i + 1, P.DT_DIR if n.is_dir else P.DT_REG, n.name)
                for i, n in enumerate(self._entries(fid))
            ])
        ents = fid.dirents
        assert ents is not None
        count = min(m.count, self._iounit())
        out, size, i = [], 0, m.offset
        while i < len(ents) and size + len(ents[i]) <= count:
            out.append(ents[i])
            size += len(ents[i])
            i += 1
        if not out and i < len(ents):
            raise einval("readdir count too small for an entry")
        return M.Rreaddir(m.tag, b"".join(out))

    def _write(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        if fid.omode == _NOT_OPEN or fid.omode & 3 in (P.OREAD, P.OEXEC):
            raise ebadf("fid not open for writing")
        assert fid.handle is not None
        if self.held + self.writing + len(m.data) > self.config.max_held:
            raise self.too_much()
        n = fid.handle.write(m.offset, m.data)
        if isinstance(n, int):
            self._recount(fid)
            return M.Rwrite(m.tag, n)

        def done(k: int) -> Message:
            self._recount(fid)  # a write's reply is kept for reads on its fid, and counted
            return M.Rwrite(m.tag, k)

        return self._later(m.tag, n, done)

    # ------------------------------------------------------------ letting go
    def _clunk(self, m: Any) -> Reply:
        fid = self.fids.pop(m.fid, None)
        if fid is None:
            raise ebadf()
        aw = self._release(fid, orderly=True)
        if aw is None:
            return M.Rclunk(m.tag)
        return self._later(m.tag, aw, lambda _: M.Rclunk(m.tag))

    def _remove_node(self, ctx: Ctx, node: Node) -> None:
        parent = node.parent
        if parent is None or parent is node:
            raise eperm("cannot remove root")  # a table string
        if not parent.allows(ctx, 2):
            raise eacces()
        parent.remove(ctx, node)

    def _remove(self, m: Any) -> Reply:
        fid = self.fids.pop(m.fid, None)
        if fid is None:
            raise ebadf()
        if fid.omode != _NOT_OPEN:
            fid.omode &= ~P.ORCLOSE  # removed below, once, with its error reported
        self._release(fid, orderly=False)
        self._remove_node(fid.ctx, fid.node)
        return M.Rremove(m.tag)

    def _unlinkat(self, m: Any) -> Reply:
        dfid = self._fid(m.dirfid)
        parent = dfid.node
        if not isinstance(parent, Dir):
            raise P9Error(P.ENOTDIR_MSG, E.ENOTDIR)
        node = parent.lookup(dfid.ctx, m.name)
        if node is None:
            raise enoent()
        if m.flags & P.AT_REMOVEDIR and not node.is_dir:
            raise P9Error(P.ENOTDIR_MSG, E.ENOTDIR)
        if not m.flags & P.AT_REMOVEDIR and node.is_dir:
            raise P9Error(P.EISDIR_MSG, E.EISDIR)
        self._remove_node(dfid.ctx, node)
        return M.Runlinkat(m.tag)

    # ------------------------------------------------------------ metadata
    def _stat(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        return M.Rstat(m.tag, self._stat_of(fid.node, fid.ctx))

    def _owner(self, ctx: Ctx, node: Node) -> bool:
        return ctx.user == node.uid

    def _wstat(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        node, ctx, st = fid.node, fid.ctx, m.stat
        changes: list[Callable[[], None]] = []
        if (st.uid and st.uid != node.uid) or st.n_uid not in (P.NONUNAME, self.users.uid(node.uid)):
            raise eperm("wstat prohibited")  # owners do not change
        if st.n_gid not in (P.NONUNAME, self.users.gid(node.gid)):
            raise eperm("wstat prohibited")
        if st.gid and st.gid != node.gid:
            if not self._owner(ctx, node) or not ctx.member(st.gid):
                raise eperm("not a member of proposed group")
            changes.append(lambda: setattr(node, "gid", st.gid))
        if st.mode != P.NOCHANGE_32:
            if bool(st.mode & P.DMDIR) != node.is_dir:
                raise eperm("wstat can't convert between files and directories")
            if not self._owner(ctx, node):
                raise eperm()  # chmod(2) by a non-owner: EPERM
            changes.append(lambda: node.chmod(ctx, st.mode))
        if st.mtime != P.NOCHANGE_32:
            if not (self._owner(ctx, node) or node.allows(ctx, 2)):
                raise eacces()
            changes.append(lambda: setattr(node, "mtime", st.mtime))
        if st.length != P.NOCHANGE_64:
            if node.is_dir:
                raise P9Error(P.EISDIR_MSG, E.EISDIR)
            if not node.allows(ctx, 2):
                raise eacces()
            changes.append(lambda: node.truncate(ctx, st.length))
        if st.name and st.name != node.name:
            self._check_name(st.name)
            parent = node.parent
            if parent is None or not parent.allows(ctx, 2):
                raise eacces()
            changes.append(lambda: parent.rename(ctx, node, st.name))
        for change in changes:
            change()
        return M.Rwstat(m.tag)

    def _getattr(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        node = fid.node
        size = node.length(fid.ctx)
        kind = P.S_IFDIR if node.is_dir else P.S_IFREG
        return M.Rgetattr(
            m.tag, P.GETATTR_BASIC, node.qid(), kind | (node.mode & 0o777),
            self.users.uid(node.uid), self.users.gid(node.gid), 2 if node.is_dir else 1, 0, size, 4096,
            (size + 511) // 512, node.atime, 0, node.mtime, 0, node.mtime, 0, 0, 0, 0, 0,
        )

    def _setattr(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        node, ctx, valid = fid.node, fid.ctx, m.valid
        if valid & P.SETATTR_UID and m.uid != self.users.uid(node.uid):
            raise eperm()  # owners do not change
        if valid & P.SETATTR_GID and m.gid != self.users.gid(node.gid):
            raise eperm()
        if valid & P.SETATTR_MODE and not self._owner(ctx, node):
            raise eperm()
        if valid & (P.SETATTR_ATIME | P.SETATTR_MTIME) and not (
            self._owner(ctx, node) or node.allows(ctx, 2)
        ):
            raise eacces()
        if valid & P.SETATTR_SIZE:
            if node.is_dir:
                raise P9Error(P.EISDIR_MSG, E.EISDIR)
            if not node.allows(ctx, 2):
                raise eacces()
            node.truncate(ctx, m.size)
        if valid & P.SETATTR_MODE:
            node.chmod(ctx, m.mode)
        now = int(self._now)
        if valid & P.SETATTR_MTIME:
            node.mtime = m.mtime_sec if valid & P.SETATTR_MTIME_SET else now
        if valid & P.SETATTR_ATIME:
            node.atime = m.atime_sec if valid & P.SETATTR_ATIME_SET else now
        return M.Rsetattr(m.tag)

    def _statfs(self, m: Any) -> Reply:
        self._fid(m.fid)
        return M.Rstatfs(m.tag, P.STATFS_MAGIC_V9FS, 4096, 0, 0, 0, 0, 0, 0, 255)

    def _rename_in(self, ctx: Ctx, olddir: Node, newdir: Node, node: Node, name: str) -> None:
        """9P2000.L renames (rename, renameat) follow rename(2): the target is replaced."""
        if olddir is not newdir:
            raise P9Error("cross-directory rename not supported", E.EXDEV)
        if not isinstance(olddir, Dir):
            raise P9Error(P.ENOTDIR_MSG, E.ENOTDIR)
        self._check_name(name)
        if not olddir.allows(ctx, 2):
            raise eacces()
        olddir.rename(ctx, node, name, replace=True)

    def _rename(self, m: Any) -> Reply:
        fid = self._fid(m.fid)
        dfid = self._fid(m.dfid)
        parent = fid.node.parent
        if parent is None:
            raise eperm()
        self._rename_in(fid.ctx, parent, dfid.node, fid.node, m.name)
        return M.Rrename(m.tag)

    def _renameat(self, m: Any) -> Reply:
        old = self._fid(m.olddirfid)
        new = self._fid(m.newdirfid)
        if not isinstance(old.node, Dir):
            raise P9Error(P.ENOTDIR_MSG, E.ENOTDIR)
        node = old.node.lookup(old.ctx, m.oldname)
        if node is None:
            raise enoent()
        self._rename_in(old.ctx, old.node, new.node, node, m.newname)
        return M.Rrenameat(m.tag)

    def _readlink(self, m: Any) -> Reply:
        self._fid(m.fid)
        raise einval("not a symbolic link")


async def _background(pending: Awaitable[Any]) -> None:
    await pending

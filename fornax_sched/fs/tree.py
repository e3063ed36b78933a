"""Synthetic file trees in the manner of Plan 9's lib9p.

A tree is made of ``Dir`` and ``File`` nodes.  A file is served by a few
callbacks: ``read(ctx)`` gives the content an open sees (computed once per
open, so a reader gets a stable snapshot across its reads) and
``write(ctx, data)`` receives each whole write; what ``write`` returns is
what a read on the same fid gives back, so a ctl file can answer::

    def ctl(ctx, data):
        return f"placed {scheduler.place(data.decode().strip())}\\n"

    root = Dir("", [File("ctl", write=ctl, read=lambda ctx: "usage: place IMAGE\\n")])

Directories list and look up their children on demand (``DynamicDir``), or
hold them (``Dir``).  Every node has a qid whose path never changes and
whose version moves when the content does, and Plan 9 permission bits that
the server checks against the attaching user.

Callbacks may be plain functions or coroutines: a file whose read waits
(a log being followed, say) simply returns an awaitable, and the server
answers other requests meanwhile.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from . import proto
from .codec import Qid, Stat
from .errors import P9Error, eperm

_next_path = itertools.count(1).__next__

Content = str | bytes


@dataclass
class Ctx:
    """Who is asking: the attached user and the groups the server knows of."""

    user: str
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    conn: int = 0
    iounit: int = 0  # the most one read or write message carries on this connection (0: unknown)

    def member(self, group: str) -> bool:
        return group == self.user or self.user in self.groups.get(group, ())


def _as_bytes(c: Content | None) -> bytes:
    if c is None:
        return b""
    return c.encode() if isinstance(c, str) else bytes(c)


class Handle:
    """Per-open state of a file: what a fid holds between open and clunk."""

    def read(self, offset: int, count: int) -> bytes | Awaitable[bytes]:
        raise P9Error("file not open for reading", 9)

    def write(self, offset: int, data: bytes) -> int | Awaitable[int]:
        raise P9Error("file not open for writing", 9)

    def close(self) -> None | Awaitable[None]:
        return None

    def held(self) -> int:
        """Bytes this open keeps between requests (a read snapshot, writes gathered for close).

        The server counts them against its bound on what one connection holds.
        """
        return 0

    def shed(self) -> None:
        """Let go of what a read can compute again; the server calls it when keeping that would pass its bound."""


class Node:
    """What files and directories share: name, owner, mode, qid."""

    is_dir = False

    def __init__(self, name: str, mode: int, uid: str = "none", gid: str | None = None) -> None:
        self.name = name
        self.mode = mode
        self.uid = uid
        self.gid = gid if gid is not None else uid
        self.muid = uid
        self.path = _next_path()
        self.version = 0
        self.mtime = self.atime = int(time.time())
        self.parent: Dir | None = None

    # ---- identity
    def qid(self) -> Qid:
        return Qid(proto.QTDIR if self.is_dir else proto.QTFILE, self.version & 0xFFFFFFFF, self.path)

    def touch(self, who: str | None = None) -> None:
        """Record a change of content: new version and mtime."""
        self.version += 1
        self.mtime = int(time.time())
        if who:
            self.muid = who

    def length(self, ctx: Ctx) -> int:
        """The length stat and getattr report: cheap, never the content rendered (0 if unknown)."""
        return 0

    def stat(self, ctx: Ctx) -> Stat:
        length = self.length(ctx)
        mode = (self.mode & 0o777) | (proto.DMDIR if self.is_dir else 0)
        return Stat(0, 0, self.qid(), mode, self.atime, self.mtime, length,
                    self.name or "/", self.uid, self.gid, self.muid)

    # ---- permissions
    def allows(self, ctx: Ctx, need: int) -> bool:
        """Plan 9 check: owner bits, else group bits, else other bits; ``need`` is 4, 2 or 1."""
        if ctx.user == self.uid:
            bits = self.mode >> 6
        elif ctx.member(self.gid):
            bits = self.mode >> 3
        else:
            bits = self.mode
        return bits & need == need

    def refusal(self, ctx: Ctx, need: int) -> P9Error:
        """The error for an open that ``allows`` refused; a file may say why (who may write it)."""
        return P9Error(proto.EACCES_MSG, 13)

    # ---- changes through wstat / setattr; the default is what synthetic files allow
    def truncate(self, ctx: Ctx, size: int) -> None:
        """Truncation to zero is accepted (so ``echo x > ctl`` works); other sizes are not."""
        if size != 0:
            raise eperm("only support truncation to zero length")

    def chmod(self, ctx: Ctx, mode: int) -> None:
        self.mode = (self.mode & ~0o777) | (mode & 0o777)

    def open(self, ctx: Ctx, mode: int) -> Handle:
        raise P9Error("cannot open", 5)


class File(Node):
    """A synthetic file served by callbacks.

    ``read(ctx)`` returns the content an open sees (or ``read`` is the
    content itself, for a file that never changes); ``write(ctx, data)``
    handles one whole write and may return the reply that reads on the same
    fid return; ``close(ctx, written)`` runs at clunk with everything written
    through that fid (for files that act on close).  Any of them may be a
    coroutine function.

    Stat and getattr never call ``read``: a listing of thousands of computed
    files must not render each one.  Their length is 0, as in Plan 9's
    synthetic servers and Linux's procfs (readers read to the end whatever
    the length says), unless ``size(ctx)`` gives it cheaply or the content
    is static.  The qid version moves when a read sees content that
    differs from what the previous read saw.
    """

    def __init__(
        self,
        name: str,
        read: Callable[[Ctx], Content | Awaitable[Content]] | Content | None = None,
        write: Callable[[Ctx, bytes], Content | None | Awaitable[Content | None]] | None = None,
        close: Callable[[Ctx, bytes], None | Awaitable[None]] | None = None,
        mode: int | None = None,
        uid: str = "none",
        gid: str | None = None,
        *,
        size: Callable[[Ctx], int] | None = None,
    ) -> None:
        if mode is None:
            mode = (0o444 if read is not None else 0) | (0o220 if write or close else 0)
        super().__init__(name, mode, uid, gid)
        self.static: bytes | None = None
        if isinstance(read, (str, bytes)):
            self.static = _as_bytes(read)
            read = None
        self.on_read: Callable[[Ctx], Content | Awaitable[Content]] | None = read
        self.on_write = write
        self.on_close = close
        self.on_size = size
        self._crc: int | None = None  # checksum of the content last seen

    def length(self, ctx: Ctx) -> int:
        if self.static is not None:
            return len(self.static)
        if self.on_size is not None:
            return self.on_size(ctx)
        return 0

    def _note(self, data: bytes) -> None:
        crc = zlib.crc32(data)
        if crc != self._crc:
            if self._crc is not None:
                self.version += 1
            self._crc = crc

    def open(self, ctx: Ctx, mode: int) -> Handle:
        return _FileHandle(self, ctx)


class _FileHandle(Handle):
    __slots__ = ("node", "ctx", "snapshot", "written", "gathered")

    def __init__(self, node: File, ctx: Ctx) -> None:
        self.node = node
        self.ctx = ctx
        self.snapshot: bytes | None = None
        self.written: list[bytes] | None = None
        self.gathered = 0  # bytes in ``written``

    def held(self) -> int:
        return (len(self.snapshot) if self.snapshot is not None else 0) + self.gathered

    def shed(self) -> None:
        self.snapshot = None

    def read(self, offset: int, count: int) -> bytes | Awaitable[bytes]:
        if self.snapshot is None:
            if self.node.on_read is None:
                return (self.node.static or b"")[offset : offset + count]
            content = self.node.on_read(self.ctx)
            if not isinstance(content, (str, bytes)):
                return self._read_later(content, offset, count)
            self.snapshot = _as_bytes(content)
            self.node._note(self.snapshot)
        return self.snapshot[offset : offset + count]

    async def _read_later(self, pending: Awaitable[Content], offset: int, count: int) -> bytes:
        self.snapshot = _as_bytes(await pending)
        self.node._note(self.snapshot)
        return self.snapshot[offset : offset + count]

    def write(self, offset: int, data: bytes) -> int | Awaitable[int]:
        node = self.node
        if node.on_close is not None:
            if self.written is None:
                self.written = []
            self.written.append(bytes(data))
            self.gathered += len(data)
            return len(data)
        if node.on_write is None:
            raise P9Error("file not open for writing", 9)
        reply = node.on_write(self.ctx, bytes(data))
        if reply is None or isinstance(reply, (str, bytes)):
            self._replied(reply)
            return len(data)
        return self._write_later(reply, len(data))

    async def _write_later(self, pending: Awaitable[Content | None], n: int) -> int:
        self._replied(await pending)
        return n

    def _replied(self, reply: Content | None) -> None:
        node = self.node
        node.touch(self.ctx.user)
        if reply is not None:
            self.snapshot = _as_bytes(reply)

    def close(self) -> None | Awaitable[None]:
        if self.node.on_close is not None and self.written is not None:
            data = b"".join(self.written)
            self.written = None
            self.gathered = 0
            self.node.touch(self.ctx.user)
            return self.node.on_close(self.ctx, data)
        return None


class DocumentFile(File):
    """A file written as one document (a policy, say) through any number of writes.

    Writes through a fid are gathered from offset 0.  A write shorter than
    the connection's iounit ends the document: ``submit(ctx, data)`` runs
    then, so its error is that write's error, which every client shows
    (Linux's v9fs ignores errors at close).  A document whose last write
    filled the message is submitted when the fid is clunked.  Writing at
    offset 0 again starts a new document; a write anywhere but the end of
    what was written is refused.
    """

    def __init__(self, name: str, read: Callable[[Ctx], Content | Awaitable[Content]] | None,
                 submit: Callable[[Ctx, bytes], Content | None | Awaitable[Content | None]], *,
                 limit: int = 1 << 20, mode: int | None = None, uid: str = "none", gid: str | None = None) -> None:
        super().__init__(name, read=read, write=submit, mode=mode, uid=uid, gid=gid)
        self.limit = limit

    def open(self, ctx: Ctx, mode: int) -> Handle:
        return _DocumentHandle(self, ctx)


class _DocumentHandle(_FileHandle):
    __slots__ = ("doc", "size", "due")

    def __init__(self, node: DocumentFile, ctx: Ctx) -> None:
        super().__init__(node, ctx)
        self.doc: list[bytes] = []
        self.size = 0
        self.due = False  # written and not yet submitted

    def held(self) -> int:
        return super().held() + self.size

    def write(self, offset: int, data: bytes) -> int | Awaitable[int]:
        node = self.node
        assert isinstance(node, DocumentFile)
        if offset == 0:
            self.doc, self.size = [], 0
        elif offset != self.size:
            raise P9Error(f"{node.name}: write the whole text in order from offset 0 (got offset {offset}, "
                          f"expected {self.size})", 22)
        if self.size + len(data) > node.limit:
            self.doc, self.size, self.due = [], 0, False
            raise P9Error(f"{node.name}: more than {node.limit} bytes", 27)
        self.doc.append(bytes(data))
        self.size += len(data)
        if self.ctx.iounit and len(data) >= self.ctx.iounit:
            self.due = True  # a full message: more may follow
            return len(data)
        return self._submit(len(data))

    def _submit(self, n: int) -> int | Awaitable[int]:
        self.due = False
        assert self.node.on_write is not None
        reply = self.node.on_write(self.ctx, b"".join(self.doc))
        if reply is None or isinstance(reply, (str, bytes)):
            self._replied(reply)
            return n
        return self._write_later(reply, n)

    def close(self) -> None | Awaitable[None]:
        if not self.due:
            return None
        done = self._submit(0)
        if isinstance(done, int):
            return None
        return self._closed(done)

    @staticmethod
    async def _closed(done: Awaitable[int]) -> None:
        await done


class Dir(Node):
    """A directory that holds its children.

    Creation and removal are refused unless ``create`` / ``remove`` callbacks
    are given (ramfs gives them); ``create(ctx, name, perm)`` returns the new
    node, ``remove(ctx, node)`` may refuse by raising P9Error.
    """

    is_dir = True

    def __init__(
        self,
        name: str,
        children: Iterable[Node] = (),
        mode: int = 0o555,
        uid: str = "none",
        gid: str | None = None,
        create: Callable[[Ctx, Dir, str, int], Node] | None = None,
        remove: Callable[[Ctx, Node], None] | None = None,
    ) -> None:
        super().__init__(name, mode, uid, gid)
        self._children: dict[str, Node] = {}
        self.on_create = create
        self.on_remove = remove
        for c in children:
            self.add(c)

    # ---- what the server asks of any directory
    def lookup(self, ctx: Ctx, name: str) -> Node | None:
        return self._children.get(name)

    def list(self, ctx: Ctx) -> list[Node]:
        return list(self._children.values())

    def create(self, ctx: Ctx, name: str, perm: int) -> Node:
        if self.on_create is None:
            raise eperm()  # create prohibited
        if self.lookup(ctx, name) is not None:
            raise P9Error(proto.EEXIST_MSG, 17)
        node = self.on_create(ctx, self, name, perm)
        self.add(node)
        return node

    def remove(self, ctx: Ctx, node: Node) -> None:
        if self.on_remove is None:
            raise eperm()  # remove prohibited
        if isinstance(node, Dir) and node.list(ctx):
            raise P9Error(proto.ENOTEMPTY_MSG, 39)
        self.on_remove(ctx, node)
        self.detach(node.name)

    def rename(self, ctx: Ctx, node: Node, new: str, replace: bool = False) -> None:
        """Rename a child; with ``replace`` (POSIX rename) an existing target goes first."""
        if self.on_create is None or self._children.get(node.name) is not node:
            raise eperm()  # rename prohibited
        target = self._children.get(new)
        if target is node:
            return
        if target is not None:
            if not replace:
                raise P9Error(proto.EEXIST_MSG, 17)
            if target.is_dir != node.is_dir:
                raise P9Error(proto.EISDIR_MSG if target.is_dir else proto.ENOTDIR_MSG,
                              21 if target.is_dir else 20)
            self.remove(ctx, target)
        del self._children[node.name]
        node.name = new
        self._children[new] = node
        self.touch(ctx.user)

    # ---- building trees
    def add(self, node: Node) -> Node:
        node.parent = self
        self._children[node.name] = node
        self.touch()
        return node

    def detach(self, name: str) -> Node | None:
        node = self._children.pop(name, None)
        if node is not None:
            node.parent = None
            self.touch()
        return node


class DynamicDir(Dir):
    """A directory whose entries are computed when asked for.

    ``names(ctx)`` lists the current entries; ``make(name)`` builds the node
    for one; ``exists(name)`` answers a walk without listing everything (by
    default it looks in ``names``).  Nodes are kept while their name exists,
    so their qids stay stable across walks and reads.
    """

    def __init__(
        self,
        name: str,
        names: Callable[[Ctx], Iterable[str]],
        make: Callable[[str], Node | None],
        exists: Callable[[str], bool] | None = None,
        mode: int = 0o555,
        uid: str = "none",
        gid: str | None = None,
    ) -> None:
        super().__init__(name, (), mode, uid, gid)
        self._names = names
        self._make = make
        self._exists = exists

    def _node(self, name: str) -> Node | None:
        node = self._children.get(name)
        if node is None:
            node = self._make(name)
            if node is not None:
                node.parent = self
                self._children[name] = node
        return node

    def lookup(self, ctx: Ctx, name: str) -> Node | None:
        present = self._exists(name) if self._exists else name in set(self._names(ctx))
        if not present:
            self._children.pop(name, None)
            return None
        return self._node(name)

    def list(self, ctx: Ctx) -> list[Node]:
        current = list(self._names(ctx))
        keep = set(current)
        for stale in [n for n in self._children if n not in keep]:
            del self._children[stale]
        out = []
        for n in current:
            node = self._node(n)
            if node is not None:
                out.append(node)
        return out

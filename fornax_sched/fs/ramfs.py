"""An in-memory, writable file tree, like Plan 9's ramfs(4), on the tree API."""

from __future__ import annotations

import errno

from .errors import P9Error
from .proto import DMDIR
from .tree import Ctx, Dir, Handle, Node


class RamFile(Node):
    """A file whose content is a byte array held in memory."""

    def __init__(self, fs: RamFS, name: str, mode: int, uid: str, gid: str) -> None:
        super().__init__(name, mode, uid, gid)
        self.fs = fs
        self.data = bytearray()

    def length(self, ctx: Ctx) -> int:
        return len(self.data)

    def truncate(self, ctx: Ctx, size: int) -> None:
        self.resize(size)
        self.touch(ctx.user)

    def resize(self, size: int) -> None:
        grow = size - len(self.data)
        if grow > 0:
            self.fs.charge(grow)
            self.data.extend(bytes(grow))
        else:
            self.fs.used += grow
            del self.data[size:]

    def open(self, ctx: Ctx, mode: int) -> Handle:
        return _RamHandle(self, ctx)


class _RamHandle(Handle):
    __slots__ = ("file", "ctx")

    def __init__(self, file: RamFile, ctx: Ctx) -> None:
        self.file = file
        self.ctx = ctx

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.file.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> int:
        f = self.file
        end = offset + len(data)
        if end > len(f.data):
            f.resize(end)
        f.data[offset:end] = data
        f.touch(self.ctx.user)
        return len(data)


class RamFS:
    """The tree and its byte budget; ``root`` is what a server serves."""

    def __init__(self, owner: str = "none", limit: int = 256 << 20) -> None:
        self.limit = limit
        self.used = 0
        self.root = self._dir("", 0o777, owner, owner)

    def charge(self, n: int) -> None:
        if self.used + n > self.limit:
            raise P9Error("file system is full", errno.ENOSPC)
        self.used += n

    def _dir(self, name: str, mode: int, uid: str, gid: str) -> Dir:
        return Dir(name, (), mode, uid, gid, create=self._create, remove=self._remove)

    def _create(self, ctx: Ctx, parent: Dir, name: str, perm: int) -> Node:
        if perm & DMDIR:
            return self._dir(name, perm & 0o777, ctx.user, parent.gid)
        return RamFile(self, name, perm & 0o777, ctx.user, parent.gid)

    def _remove(self, ctx: Ctx, node: Node) -> None:
        if isinstance(node, RamFile):
            self.used -= len(node.data)
            node.data = bytearray()

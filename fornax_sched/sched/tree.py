"""The scheduler's file tree (see docs/scheduler.4.md): a thin map from files to the service.

    /cluster/scheduler/ctl            commands, one per write; read: state and usage
    /cluster/scheduler/policy         the active policy as written; write a new one (text rules, Lua, YAML)
    /cluster/scheduler/policy.lua     the Lua that runs (YAML compiled)
    /cluster/scheduler/policy.status  version, health and failure counts of the active policy
    /cluster/scheduler/mode           the operating mode (normal, degraded, recovery), since when and why
    /cluster/scheduler/history/N      the policy versions kept (ctl: policy restore N)
    /cluster/scheduler/placements/C   one file per container
    /cluster/scheduler/log            decisions and actions, one timestamped line each (tail -f follows it)
    /cluster/scheduler/logs/C         the output of container C, read through its node
    /cluster/scheduler/status         every placement and group as a table (status.json: the same as JSON)
    /cluster/scheduler/nodes          every node as a table: offered, reserved, in use (nodes.json)
    /cluster/scheduler/drift          what nodes run unlike what was placed (drift.py), open then resolved
    /cluster/nodes/N/{status,kind,addr,resources,containers,health}
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Awaitable, Callable

from ..fs.errors import P9Error
from ..fs.tree import Ctx, Dir, DocumentFile, DynamicDir, File, Handle, Node
from ..policy.loader import MAX_POLICY
from .logbook import LogBook
from .service import CommandError, Scheduler

WRITERS = "writers"  # the group whose members may write ctl and policy


def _refusal(name: str, writers: frozenset[str], ctx: Ctx) -> P9Error:
    who = ", ".join(sorted(writers))
    return P9Error(f"permission denied: {ctx.user} may not write {name}; the writers are {who} "
                   f"(start the scheduler with --writers to add users)", errno.EACCES)


class ControlFile(File):
    """A file only the writers may write, one command per write; a refused open says who may."""

    def __init__(self, name: str, read: Callable[[Ctx], str], write: Callable[[Ctx, bytes], Awaitable[str]],
                 owner: str, writers: frozenset[str]) -> None:
        super().__init__(name, read=read, write=write, uid=owner, gid=WRITERS, mode=0o664)
        self.writers = writers

    def refusal(self, ctx: Ctx, need: int) -> P9Error:
        return _refusal(self.name, self.writers, ctx) if need & 2 else super().refusal(ctx, need)


class PolicyFile(DocumentFile):
    """The policy: only the writers may write it; one policy per open, however many writes it takes."""

    def __init__(self, read: Callable[[Ctx], str], submit: Callable[[Ctx, bytes], Awaitable[str]],
                 owner: str, writers: frozenset[str]) -> None:
        super().__init__("policy", read, submit, limit=MAX_POLICY, uid=owner, gid=WRITERS, mode=0o664)
        self.writers = writers

    def refusal(self, ctx: Ctx, need: int) -> P9Error:
        return _refusal(self.name, self.writers, ctx) if need & 2 else super().refusal(ctx, need)


FOLLOW_POLL = 0.25  # seconds: a read at the end of logs/NAME asks the node again if its last look is older
LOG_HELD = 1 << 20  # bytes of a container's output one open keeps (the newest; older ones are skipped)


class LogFile(File):
    """The log, read straight from the LogBook at byte offsets: an open holds no copy of it.

    Its length is where the log ends (bytes since the scheduler started, so it only grows) and
    its mtime when the last line came: what ``tail -f`` looks at to follow a file.  A read at
    the end answers end of file at once, so cat, grep and the kernel's client never wait;
    a follower reads again (``tail -f``, ``fornax-sched 9p read -f``, ``fornax-sched logs -f``).
    """

    def __init__(self, name: str, book: LogBook, uid: str) -> None:
        super().__init__(name, read=lambda ctx: "", uid=uid, mode=0o444)
        self.book = book

    @property
    def mtime(self) -> int:
        return self.book.changed

    @mtime.setter
    def mtime(self, value: int) -> None:
        pass  # the log's own: when its last line came

    def length(self, ctx: Ctx) -> int:
        return self.book.end

    def open(self, ctx: Ctx, mode: int) -> Handle:
        return _LogHandle(self.book)


class _LogHandle(Handle):
    __slots__ = ("book", "shift")

    def __init__(self, book: LogBook) -> None:
        self.book = book
        self.shift: int | None = None  # added to a reader's offsets (set at its first read)

    def read(self, offset: int, count: int) -> bytes:
        if self.shift is None:
            # A reader from the top (cat) starts at the first line kept; one that asks for a place
            # in the log (tail, which knows the length) gets that place.
            self.shift = max(0, self.book.start - offset)
        return self.book.read(offset + self.shift, count)


class ContainerLogFile(File):
    """logs/NAME: a placement's container output, read through its node."""

    def __init__(self, name: str, sched: Scheduler, uid: str) -> None:
        super().__init__(name, read=lambda ctx: "", uid=uid, mode=0o444)
        self.sched = sched

    def open(self, ctx: Ctx, mode: int) -> Handle:
        return _ContainerLogHandle(self.sched, self.name)


class _ContainerLogHandle(Handle):
    """What one open has seen of a container's output: fetched at the first read, and again
    by a read at the end once the last look is FOLLOW_POLL seconds old (a follower's)."""

    __slots__ = ("sched", "name", "data", "base", "where", "looked", "seen")

    def __init__(self, sched: Scheduler, name: str) -> None:
        self.sched = sched
        self.name = name
        self.data = b""  # output from offset ``base`` on
        self.base = 0
        self.where = ""  # NODE/CID the output came from ("": not fetched yet)
        self.looked = 0.0  # when the node was last asked (the loop's clock)
        self.seen = (0, b"")  # the node's log as last fetched: its length and its last bytes

    def held(self) -> int:
        return len(self.data)

    async def _fetch(self) -> None:
        self.looked = asyncio.get_running_loop().time()
        try:
            where, data = await self.sched.container_log(self.name)
        except CommandError as e:
            if not self.where:
                raise P9Error(str(e), errno.EIO) from None
            return  # while following: gone for now (restarting, its node away); look again later
        if not self.where:
            self.data = data
        elif where != self.where:  # started again elsewhere, or anew: its output starts over
            node, _, cid = where.partition("/")
            self.data += f"--- {self.name} is now container {cid} on {node}\n".encode() + data
        else:
            self.data += _new_part(self.seen, data)
        self.where, self.seen = where, (len(data), data[-256:])
        if len(self.data) > LOG_HELD:
            cut = len(self.data) - LOG_HELD // 2
            self.data, self.base = self.data[cut:], self.base + cut

    async def read(self, offset: int, count: int) -> bytes:
        at = max(offset, self.base) - self.base
        if not self.where or (at >= len(self.data)
                              and asyncio.get_running_loop().time() - self.looked >= FOLLOW_POLL):
            await self._fetch()
            at = max(offset, self.base) - self.base
        return self.data[at:at + count]


def _new_part(seen: tuple[int, bytes], now: bytes) -> bytes:
    """What ``now`` (a node's log, which keeps its newest part) holds after the log that was
    ``seen`` (its length and last bytes): past the same length if it only grew, else past
    where its last bytes are now (the node cut the front), else all of it."""
    length, tail = seen
    if not tail:
        return now
    if now[length - len(tail):length] == tail:
        return now[length:]
    i = now.rfind(tail)
    return now[i + len(tail):] if i >= 0 else now


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":")) + "\n"


def build(sched: Scheduler, owner: str, writers: frozenset[str]) -> Dir:
    def ro(name: str, text: Callable[[Ctx], str]) -> File:
        return File(name, read=text, uid=owner)

    async def ctl(ctx: Ctx, data: bytes) -> str:
        # A command runs to its end even if its writer goes away (a flushed write, a dropped
        # connection): what it committed is acted on, and the claims it holds are released.
        task = asyncio.ensure_future(sched.command(data.decode("utf-8", "replace"), ctx.user))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its writer may be gone
        try:
            return await asyncio.shield(task)
        except CommandError as e:
            raise P9Error(str(e), errno.EINVAL) from None

    async def policy(ctx: Ctx, data: bytes) -> str:
        try:
            return await sched.set_policy(data.decode("utf-8", "replace"), ctx.user)
        except CommandError as e:
            raise P9Error(str(e), errno.EINVAL) from None

    def placement(name: str) -> Node | None:
        return ro(name, lambda ctx: sched.placement_text(name))

    def version(name: str) -> Node | None:
        return ro(name, lambda ctx: sched.policies.source_of(int(name)))

    def node_dir(name: str) -> Node | None:
        return Dir(name, [ro(what, lambda ctx, what=what: sched.node_field(name, what))  # type: ignore[misc]
                          for what in ("status", "kind", "addr", "resources", "containers", "health")], uid=owner)

    scheduler = Dir("scheduler", [
        ControlFile("ctl", lambda ctx: sched.summary(), ctl, owner, writers),
        PolicyFile(lambda ctx: sched.policy_text(), policy, owner, writers),
        ro("policy.lua", lambda ctx: sched.policies.lua_text()),
        ro("mode", lambda ctx: sched.mode_text()),
        ro("policy.status", lambda ctx: sched.policies.status_text()),
        DynamicDir("history", names=lambda ctx: [str(n) for n in sorted(sched.policies.versions)], make=version,
                   exists=lambda n: n.isdigit() and int(n) in sched.policies.versions, uid=owner),
        DynamicDir("placements", names=lambda ctx: list(sched.state.records), make=placement,
                   exists=lambda n: n in sched.state.records, uid=owner),
        LogFile("log", sched.book, owner),
        DynamicDir("logs", names=lambda ctx: list(sched.state.records),
                   make=lambda name: ContainerLogFile(name, sched, owner),
                   exists=lambda n: n in sched.state.records, uid=owner),
        ro("status", lambda ctx: sched.status_table()),
        ro("status.json", lambda ctx: _json(dict(zip(("placements", "groups"), sched.status_rows(), strict=True)))),
        ro("nodes", lambda ctx: sched.nodes_table()),
        ro("nodes.json", lambda ctx: _json({"nodes": sched.node_rows()})),
        ro("drift", lambda ctx: sched.drift.text()),
    ], uid=owner)
    nodes = DynamicDir("nodes", names=lambda ctx: list(sched.state.cluster.nodes), make=node_dir,
                       exists=lambda n: n in sched.state.cluster.nodes, uid=owner)
    return Dir("", [Dir("cluster", [scheduler, nodes], uid=owner)], uid=owner)

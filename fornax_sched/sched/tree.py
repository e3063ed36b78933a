"""The scheduler's file tree (see docs/scheduler.4.md): a thin map from files to the service.

    /cluster/scheduler/ctl            commands, one per write; read: state and usage
    /cluster/scheduler/policy         the active policy as written; write a new one (text rules, Lua, YAML)
    /cluster/scheduler/policy.lua     the Lua that runs (YAML compiled)
    /cluster/scheduler/policy.status  version, health and failure counts of the active policy
    /cluster/scheduler/history/N      the policy versions kept (ctl: policy restore N)
    /cluster/scheduler/placements/C   one file per container
    /cluster/scheduler/log            decisions and actions, one timestamped line each
    /cluster/scheduler/status         every placement and group as a table (status.json: the same as JSON)
    /cluster/scheduler/nodes          every node as a table: offered, reserved, in use (nodes.json)
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


class LogFile(File):
    """The log, read straight from the LogBook at byte offsets: an open holds no copy of it."""

    def __init__(self, name: str, book: LogBook, uid: str) -> None:
        super().__init__(name, read=lambda ctx: "", uid=uid, mode=0o444)
        self.book = book

    def length(self, ctx: Ctx) -> int:
        return 0  # a stream: its length is what reads return (as for Plan 9's synthetic files)

    def open(self, ctx: Ctx, mode: int) -> Handle:
        return _LogHandle(self.book)


class _LogHandle(Handle):
    __slots__ = ("book", "base")

    def __init__(self, book: LogBook) -> None:
        self.book = book
        self.base = book.start  # offsets count from where the log began at open

    def read(self, offset: int, count: int) -> bytes:
        return self.book.read(self.base + offset, count)


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
        ro("policy.status", lambda ctx: sched.policies.status_text()),
        DynamicDir("history", names=lambda ctx: [str(n) for n in sorted(sched.policies.versions)], make=version,
                   exists=lambda n: n.isdigit() and int(n) in sched.policies.versions, uid=owner),
        DynamicDir("placements", names=lambda ctx: list(sched.state.records), make=placement,
                   exists=lambda n: n in sched.state.records, uid=owner),
        LogFile("log", sched.book, owner),
        ro("status", lambda ctx: sched.status_table()),
        ro("status.json", lambda ctx: _json(dict(zip(("placements", "groups"), sched.status_rows(), strict=True)))),
        ro("nodes", lambda ctx: sched.nodes_table()),
        ro("nodes.json", lambda ctx: _json({"nodes": sched.node_rows()})),
    ], uid=owner)
    nodes = DynamicDir("nodes", names=lambda ctx: list(sched.state.cluster.nodes), make=node_dir,
                       exists=lambda n: n in sched.state.cluster.nodes, uid=owner)
    return Dir("", [Dir("cluster", [scheduler, nodes], uid=owner)], uid=owner)

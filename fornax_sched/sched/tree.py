"""The scheduler's file tree (see docs/scheduler.4.md): a thin map from files to the service.

    /cluster/scheduler/ctl            commands, one per write; read: state and usage
    /cluster/scheduler/policy         the active policy; write a new one
    /cluster/scheduler/placements/C   one file per container
    /cluster/scheduler/log            decisions and actions, one timestamped line each
    /cluster/nodes/N/{status,addr,resources,containers,health}
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

from ..fs.errors import P9Error
from ..fs.tree import Ctx, Dir, DynamicDir, File, Node
from .service import CommandError, Scheduler

WRITERS = "writers"  # the group whose members may write ctl and policy


class ControlFile(File):
    """A file only the writers may write; a refused open says who may."""

    def __init__(self, name: str, read: Callable[[Ctx], str], write: Callable[[Ctx, bytes], Awaitable[str]],
                 owner: str, writers: frozenset[str]) -> None:
        super().__init__(name, read=read, write=write, uid=owner, gid=WRITERS, mode=0o664)
        self.writers = writers

    def refusal(self, ctx: Ctx, need: int) -> P9Error:
        if need & 2:
            who = ", ".join(sorted(self.writers))
            return P9Error(f"permission denied: {ctx.user} may not write {self.name}; the writers are {who} "
                           f"(start the scheduler with --writers to add users)", errno.EACCES)
        return super().refusal(ctx, need)


def build(sched: Scheduler, owner: str, writers: frozenset[str]) -> Dir:
    def ro(name: str, text: Callable[[Ctx], str]) -> File:
        return File(name, read=text, uid=owner)

    async def ctl(ctx: Ctx, data: bytes) -> str:
        try:
            return await sched.command(data.decode("utf-8", "replace"))
        except CommandError as e:
            raise P9Error(str(e), errno.EINVAL) from None

    async def policy(ctx: Ctx, data: bytes) -> str:
        try:
            return await sched.set_policy(data.decode("utf-8", "replace"))
        except CommandError as e:
            raise P9Error(str(e), errno.EINVAL) from None

    def placement(name: str) -> Node | None:
        return ro(name, lambda ctx: sched.placement_text(name))

    def node_dir(name: str) -> Node | None:
        return Dir(name, [ro(what, lambda ctx, what=what: sched.node_field(name, what))  # type: ignore[misc]
                          for what in ("status", "addr", "resources", "containers", "health")], uid=owner)

    scheduler = Dir("scheduler", [
        ControlFile("ctl", lambda ctx: sched.summary(), ctl, owner, writers),
        ControlFile("policy", lambda ctx: sched.policy_text(), policy, owner, writers),
        DynamicDir("placements", names=lambda ctx: list(sched.records), make=placement,
                   exists=lambda n: n in sched.records, uid=owner),
        ro("log", lambda ctx: sched.log_text()),
    ], uid=owner)
    nodes = DynamicDir("nodes", names=lambda ctx: list(sched.cluster.nodes), make=node_dir,
                       exists=lambda n: n in sched.cluster.nodes, uid=owner)
    return Dir("", [Dir("cluster", [scheduler, nodes], uid=owner)], uid=owner)

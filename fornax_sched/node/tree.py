"""The /cluster tree a node exports, as Fornax defines it (see docs/fornax-node.4.md).

A thin map from files to the daemon: every file reads or calls one method.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..fs.tree import Ctx, Dir, DynamicDir, File, Node

if TYPE_CHECKING:
    from .daemon import NodeDaemon

WRITERS = "writers"  # the group whose members may write ctl files


def build(node: NodeDaemon) -> Dir:
    owner = node.owner

    def ro(name: str, text: Callable[[Ctx], str | bytes]) -> File:
        return File(name, read=text, uid=owner)

    def ctl(name: str, read: Callable[[Ctx], str], write: Callable[[Ctx, bytes], Awaitable[str]]) -> File:
        return File(name, read=read, write=write, uid=owner, gid=WRITERS, mode=0o664)

    self_dir = Dir("self", [
        ro("id", lambda ctx: node.id + "\n"),
        ro("name", lambda ctx: node.name + "\n"),
        ro("addr", lambda ctx: node.addr + "\n"),
        ro("resources", lambda ctx: node.resources_text()),
        ro("images", lambda ctx: node.images_text()),
        ro("containers", lambda ctx: node.all_status_text()),
    ], uid=owner)

    def peer_dir(peer_id: str) -> Node | None:
        return Dir(peer_id, [
            ro("name", lambda ctx: node.peer_field(peer_id, "name")),
            ro("addr", lambda ctx: node.peer_field(peer_id, "addr")),
            ro("resources", lambda ctx: node.peer_field(peer_id, "resources")),
            ro("status", lambda ctx: node.peer_field(peer_id, "status")),
            ro("containers", lambda ctx: node.peer_field(peer_id, "containers")),
        ], uid=owner)

    def container_dir(cid: str) -> Node | None:
        async def write(ctx: Ctx, data: bytes) -> str:
            return await node.container_ctl(ctx, cid, data)

        return Dir(cid, [
            ro("status", lambda ctx: node.runtime.get(cid).status()),
            ctl("ctl", lambda ctx: "commands: stop | kill | destroy\n", write),
            ro("log", lambda ctx: node.runtime.log(cid)),
        ], uid=owner)

    nodes = DynamicDir("nodes", names=lambda ctx: node.node_ids(), make=peer_dir,
                       exists=lambda n: n in node.node_ids(), uid=owner)
    containers = DynamicDir("containers", names=lambda ctx: [c.id for c in node.runtime.list()],
                            make=container_dir, exists=node.has_container, uid=owner)
    cluster = Dir("cluster", [
        self_dir, nodes, containers,
        ctl("ctl", lambda ctx: node.ctl_text(), node.ctl),
    ], uid=owner)
    return Dir("", [cluster], uid=owner)

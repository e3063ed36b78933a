"""fornax-node: runs containers as real processes and exports /cluster over 9P.

The daemon joins three parts: the container runtime, UDP gossip with its
peers, and the 9P server of the /cluster tree.  Its identity (hex id, name,
labels) lives in the state directory, so a restarted daemon is the same
node to its peers and adopts the containers it left running.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fs.errors import P9Error
from ..fs.server import Server
from ..fs.tree import Ctx
from ..signals import until_stopped
from . import ctl as ctlparse
from . import tree
from .gossip import Gossip, SelfInfo
from .runtime import Container, ContainerError, Runtime, format_size

if TYPE_CHECKING:
    from ..persys.node import PersysSide
    from ..web.http import HttpServer
    from .metrics import NodeMetrics

log = logging.getLogger("fornax_sched.node")


@dataclass
class NodeConfig:
    name: str
    listen: str  # 9P dial string
    images: Path
    state: Path
    cpus: int | None = None
    mem: int | None = None  # bytes
    labels: dict[str, str] = field(default_factory=dict)
    gossip: tuple[str, int] = ("0.0.0.0", 9710)
    peers: list[tuple[str, int]] = field(default_factory=list)
    broadcast: str | None = None
    interval: float = 5.0
    suspect_after: float = 15.0
    dead_after: float = 30.0
    remove_after: float = 60.0
    writers: list[str] = field(default_factory=list)
    grace: float = 5.0
    advertise: str | None = None  # the 9P address peers should dial, if not the listen one
    persys: Any = None  # a persys.node.PersysConfig: also serve Persys' AgentService
    http: str | None = None  # HOST:PORT of /health and /metrics (None: off)


def machine_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


class NodeDaemon:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.owner = getpass.getuser()
        cfg.state.mkdir(parents=True, exist_ok=True)
        ident = self._load_identity()
        self.id: str = ident.get("id") or secrets.token_hex(4)
        self.name: str = cfg.name or ident.get("name") or f"fornax-{self.id[:4]}"
        self.labels: dict[str, str] = {**ident.get("labels", {}), **cfg.labels}
        self.cpus = cfg.cpus or os.cpu_count() or 1
        self.mem = cfg.mem or machine_memory()
        self.addr = cfg.advertise or cfg.listen
        self.runtime = Runtime(cfg.images, cfg.state, node=self.name, grace=cfg.grace)
        self.gossip = Gossip(self.self_info, listen=cfg.gossip, peers=cfg.peers, broadcast=cfg.broadcast,
                             interval=cfg.interval, suspect_after=cfg.suspect_after, dead_after=cfg.dead_after,
                             remove_after=cfg.remove_after, on_event=self._on_gossip)
        writers = frozenset({self.owner, *cfg.writers})
        self.metrics: NodeMetrics | None = None  # counted only when served (--http)
        self.http: HttpServer | None = None
        self.http_address: str | None = None
        if cfg.http is not None:
            from .metrics import NodeMetrics

            self.metrics = NodeMetrics()
        m = self.metrics
        self.server = Server(tree.build(self), groups={tree.WRITERS: writers},
                             observe=m.ninep if m is not None else None)
        self.joined = True
        self.persys: PersysSide | None = None
        if cfg.persys is not None:
            from ..persys.node import PersysSide  # (grpc is imported only by nodes that serve it)

            self.persys = PersysSide(self, cfg.state, cfg.persys, observe=m.grpc_in if m is not None else None)
        if m is not None:
            m.watch(self)
        self._save_identity()

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        for line in await self.runtime.start():
            log.warning("%s", line)
        listener = await self.server.listen(self.cfg.listen)
        if self.cfg.advertise is None:
            self.addr = str(listener.address)
        await self.gossip.start()
        if self.persys is not None:  # after the runtime's fork server: grpc starts threads
            await self.persys.start()
        if self.metrics is not None and self.cfg.http is not None:
            from ..web import node_app
            from ..web.http import HttpServer

            server = HttpServer(node_app.build(self, self.metrics))
            try:
                self.http_address = await server.start(self.cfg.http)
            except OSError as e:  # given on the command line: serve it or fail
                err = OSError(f"--http {self.cfg.http}: {e.strerror or e}")
                err.errno = e.errno
                raise err from None
            self.http = server
        self._save_identity()
        (self.cfg.state / "pid").write_text(f"{os.getpid()}\n")  # for scripts that play machine failure
        log.info("node %s (%s) serving %s, gossip on port %d", self.name, self.id, self.addr, self.gossip.port)

    async def stop(self) -> None:
        """Clean shutdown: say LEAVE, stop every container, close the server."""
        if self.http is not None:
            await self.http.close()
        await self.gossip.stop()
        if self.persys is not None:
            await self.persys.stop()
        await self.runtime.shutdown()
        await self.server.close()
        (self.cfg.state / "pid").unlink(missing_ok=True)

    # ------------------------------------------------------------ identity
    def _identity_path(self) -> Path:
        return self.cfg.state / "node.json"

    def _load_identity(self) -> dict:
        try:
            return json.loads(self._identity_path().read_text())
        except (OSError, ValueError):
            return {}

    def _save_identity(self) -> None:
        path = self._identity_path()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": self.id, "name": self.name, "labels": self.labels, "addr": self.addr}))
        os.replace(tmp, path)

    # ------------------------------------------------------------ what the tree shows
    def running(self) -> list[Container]:
        return [c for c in self.runtime.list() if c.state == "running"]

    def mem_free(self) -> int:
        """Memory not promised to running containers: the sum of their limits, or their use if larger."""
        promised = sum(c.limits.mem or 0 for c in self.running())
        return max(self.mem - max(promised, self.runtime.mem_used()), 0)

    def self_info(self) -> SelfInfo:
        return SelfInfo(id=self.id, name=self.name, addr=self.addr, cpus=self.cpus, mem_total=self.mem,
                        mem_free=self.mem_free(), containers=len(self.running()), load=os.getloadavg()[0])

    def resources_text(self) -> str:
        lines = [
            f"cpus {self.cpus}",
            f"mem {format_size(self.mem)}",
            f"mem_free {format_size(self.mem_free())}",
            f"containers {len(self.running())}",
            f"load {os.getloadavg()[0]:.2f}",
        ]
        lines += [f"label.{k} {v}" for k, v in sorted(self.labels.items())]
        return "\n".join(lines) + "\n"

    def node_ids(self) -> list[str]:
        return [self.id] + [p.id for p in self.gossip.peers()]

    def peer_field(self, peer_id: str, what: str) -> str:
        """The files of /cluster/nodes/<id>; this node lists itself too."""
        if peer_id == self.id:
            values = {
                "name": self.name, "addr": self.addr, "status": "online",
                "resources": self.resources_text().rstrip("\n"),
                "containers": self._containers_text().rstrip("\n"),
            }
            return values[what] + "\n"
        p = self.gossip.table.get(peer_id)
        if p is None:
            raise P9Error("file does not exist", errno.ENOENT)
        values = {
            "name": p.name, "addr": p.addr, "status": p.status,
            "resources": (f"cpus {p.cpus}\nmem {format_size(p.mem_total)}\nmem_free {format_size(p.mem_free)}\n"
                          f"containers {p.containers}\nload {p.load:.2f}"),
            "containers": f"count {p.containers}",
        }
        return values[what] + "\n"

    def images_text(self) -> str:
        """self/images: one image name per line, those run would accept (a scheduler checks before placing)."""
        return "".join(f"{name}\n" for name in self.runtime.images())

    def all_status_text(self) -> str:
        """self/containers: every container's status, each followed by a blank line, in id order.

        The same text as each containers/ID/status, made from the same records
        at the same moment, so one read gives a scheduler the whole node.
        """
        return "".join(c.status() + "\n" for c in self.runtime.list())

    def _containers_text(self) -> str:
        running = self.running()
        lines = [f"count {len(running)}"] + [f"{c.id} {c.image} {c.state}" for c in running]
        return "\n".join(lines) + "\n"

    def has_container(self, cid: str) -> bool:
        try:
            self.runtime.get(cid)
            return True
        except ContainerError:
            return False

    def ctl_text(self) -> str:
        return (f"id {self.id}\nname {self.name}\naddr {self.addr}\n"
                f"{'joined' if self.joined else 'left'}\ncontainers {len(self.running())}\n\n{ctlparse.USAGE}")

    # ------------------------------------------------------------ commands
    async def ctl(self, ctx: Ctx, data: bytes) -> str:
        """One write to /cluster/ctl; the returned text is read back on the same fid."""
        try:
            cmd = ctlparse.parse(data.decode("utf-8", "replace"))
        except ctlparse.CtlError as e:
            raise P9Error(str(e), errno.EINVAL) from None
        try:
            return await self._do(cmd)
        except ContainerError as e:
            raise P9Error(str(e), errno.EINVAL) from None

    async def _do(self, cmd: ctlparse.Command) -> str:
        if cmd.verb == "run":
            c = await self.runtime.run(cmd.image, cmd.args, cmd.limits, name=cmd.name, labels=cmd.labels,
                                       env=cmd.env)
            log.info("run %s: container %s pid %s", cmd.image, c.id, c.pid)
            return f"{c.id}\n"
        if cmd.verb in ("stop", "kill", "destroy"):
            return await self._container_verb(cmd.verb, cmd.target)
        if cmd.verb == "join":
            self.joined = True
            self.gossip.join()
            return "joined\n"
        if cmd.verb == "leave":
            self.joined = False
            self.gossip.leave()
            return "left\n"
        if cmd.verb == "name":
            self.name = cmd.target
            self.runtime.node = self.name  # FORNAX_NODE of containers started from now on
            self._save_identity()
            self.gossip.announce()
            return f"name {self.name}\n"
        if cmd.verb == "label":
            self.labels[cmd.target] = cmd.value
            self._save_identity()
            return f"label {cmd.target}={cmd.value}\n"
        if cmd.verb == "unlabel":
            if self.labels.pop(cmd.target, None) is None:
                raise P9Error(f"no label {cmd.target!r}", errno.EINVAL)
            self._save_identity()
            return f"unlabel {cmd.target}\n"
        raise AssertionError(cmd.verb)

    async def _container_verb(self, verb: str, cid: str) -> str:
        if verb == "stop":
            c = await self.runtime.stop(cid)
        elif verb == "kill":
            c = await self.runtime.kill(cid)
        else:
            await self.runtime.destroy(cid)
            return f"destroyed {cid}\n"
        return f"{c.id} {c.state}\n"

    async def container_ctl(self, ctx: Ctx, cid: str, data: bytes) -> str:
        verb = data.decode("utf-8", "replace").strip()
        if verb not in ("stop", "kill", "destroy"):
            raise P9Error(f"unknown command {verb!r}: want stop, kill or destroy", errno.EINVAL)
        try:
            return await self._container_verb(verb, cid)
        except ContainerError as e:
            raise P9Error(str(e), errno.EINVAL) from None

    def _on_gossip(self, event: object) -> None:
        log.info("gossip: %s", event)


async def serve_forever(cfg: NodeConfig) -> None:
    node = NodeDaemon(cfg)
    await node.start()
    persys = f", persys {node.persys.address}" if node.persys is not None else ""
    persys += f", HTTP http://{node.http_address}/" if node.http_address else ""
    await until_stopped(lambda: print(f"fornax-node {node.name} ({node.id}) serving {node.addr}{persys}", flush=True))
    await node.stop()

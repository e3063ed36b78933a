"""Node backends: one interface for every kind of node the scheduler drives.

Placing, migrating and evacuating are written once against ``Backend``;
``FornaxNode`` implements it by mounting a node's /cluster tree over 9P (the
Fornax "mount"), and a Persys (gRPC) backend will implement it for Persys
compute agents.  Every failure to reach a node is a ``NodeUnreachable``
naming the node; every refusal by a reachable node is a ``NodeRefused``
carrying the node's own words.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ..fs.client import Client
from ..fs.errors import P9Error
from ..units import SizeError, format_size, parse_size

T = TypeVar("T")


class BackendError(Exception):
    pass


class NodeUnreachable(BackendError):
    """The node could not be reached (dead, restarting, network)."""


class NodeRefused(BackendError):
    """The node answered with an error (unknown image, bad limits, ...)."""


@dataclass
class ContainerInfo:
    """What a node says about one of its containers."""

    id: str  # the node's own id for it
    name: str
    image: str
    state: str  # created | running | stopped | exited | failed
    exit_code: int | None = None
    reason: str = ""


@dataclass
class NodeInfo:
    """What a node says about itself."""

    id: str
    name: str
    addr: str
    cpus: float
    mem: int
    mem_free: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class PeerInfo:
    """A node as another node's discovery sees it."""

    id: str
    name: str
    addr: str
    status: str


class Backend(Protocol):
    name: str
    addr: str

    async def info(self) -> NodeInfo: ...

    async def run(self, image: str, args: tuple[str, ...], cpus: float, mem: int, name: str) -> str: ...

    async def stop(self, cid: str) -> None: ...

    async def destroy(self, cid: str) -> None: ...

    async def status(self, cid: str) -> ContainerInfo | None: ...

    async def containers(self) -> list[ContainerInfo]: ...

    async def peers(self) -> list[PeerInfo]: ...

    async def close(self) -> None: ...


def parse_kv(text: str) -> dict[str, str]:
    """``key value`` lines into a dict (later keys win)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = value.strip()
    return out


class FornaxNode:
    """A Fornax node, driven through its /cluster tree over one 9P connection."""

    # 9P2000.u: the node's error text (what a user must see) travels with the errno.
    def __init__(self, addr: str, name: str = "", *, timeout: float = 5.0, version: str = "9P2000.u") -> None:
        self.addr = addr
        self.name = name or addr
        self.timeout = timeout
        self.version = version
        self._client: Client | None = None
        self._connecting = asyncio.Lock()

    async def _c(self) -> Client:
        if self._client is not None and self._client._gone is None:
            return self._client
        async with self._connecting:
            if self._client is None or self._client._gone is not None:
                try:
                    client = await Client.connect(self.addr, version=self.version, timeout=self.timeout)
                    if self.name == self.addr:  # learn what the node calls itself
                        self.name = (await client.read_file("cluster/self/name")).decode().strip() or self.addr
                except (ConnectionError, TimeoutError, P9Error) as e:
                    raise NodeUnreachable(f"node {self.name} at {self.addr}: {e}") from None
                self._client = client
            return self._client

    async def _do(self, what: str, op: Callable[[Client], Awaitable[T]]) -> T:
        c = await self._c()
        try:
            return await op(c)
        except P9Error as e:
            raise NodeRefused(f"node {self.name}: {what}: {e}") from None
        except (ConnectionError, TimeoutError) as e:
            self._client = None
            raise NodeUnreachable(f"node {self.name} at {self.addr}: {what}: {e}") from None

    async def _read(self, path: str) -> str:
        data = await self._do(f"read {path}", lambda c: c.read_file(path))
        return data.decode("utf-8", "replace")

    async def _ctl(self, path: str, command: str) -> str:
        data = await self._do(command, lambda c: c.write_file(path, command.encode(), read_reply=True))
        return data.decode("utf-8", "replace")

    async def info(self) -> NodeInfo:
        res = parse_kv(await self._read("cluster/self/resources"))
        node_id = (await self._read("cluster/self/id")).strip()
        name = (await self._read("cluster/self/name")).strip()
        self.name = name or self.name
        try:
            mem = parse_size(res.get("mem", "0"), "mem", allow_zero=True)
            free = parse_size(res.get("mem_free", "0"), "mem_free", allow_zero=True)
            cpus = float(res.get("cpus", "0"))
        except (SizeError, ValueError) as e:
            raise NodeRefused(f"node {self.name}: unreadable resources: {e}") from None
        labels = {k[len("label."):]: v for k, v in res.items() if k.startswith("label.")}
        return NodeInfo(node_id, name, self.addr, cpus, mem, free, labels)

    async def run(self, image: str, args: tuple[str, ...], cpus: float, mem: int, name: str) -> str:
        options = ([f"mem={format_size(mem)}"] if mem else []) + ([f"cpu={cpus:g}"] if cpus else [])
        options.append(f"name={name}")
        # Options go before "--", so no argument is ever taken for one.
        words = ["run", image, *options, "--", *args] if args else ["run", image, *options]
        cid = (await self._ctl("cluster/ctl", " ".join(shlex.quote(w) for w in words))).strip()
        if not cid.isdigit():
            raise NodeRefused(f"node {self.name}: run answered {cid!r}, not a container id")
        return cid

    async def stop(self, cid: str) -> None:
        await self._ctl("cluster/ctl", f"stop {cid}")

    async def destroy(self, cid: str) -> None:
        await self._ctl("cluster/ctl", f"destroy {cid}")

    async def status(self, cid: str) -> ContainerInfo | None:
        try:
            text = await self._read(f"cluster/containers/{cid}/status")
        except NodeRefused:
            return None  # the node does not know it (destroyed, or never ran there)
        return _container(parse_kv(text))

    async def containers(self) -> list[ContainerInfo]:
        entries = await self._do("list containers", lambda c: c.ls("cluster/containers"))
        out = []
        for e in entries:
            info = await self.status(e.name)
            if info is not None:
                out.append(info)
        return out

    async def peers(self) -> list[PeerInfo]:
        entries = await self._do("list nodes", lambda c: c.ls("cluster/nodes"))
        out = []
        for e in entries:
            try:
                name = (await self._read(f"cluster/nodes/{e.name}/name")).strip()
                addr = (await self._read(f"cluster/nodes/{e.name}/addr")).strip()
                status = (await self._read(f"cluster/nodes/{e.name}/status")).strip()
            except NodeRefused:
                continue  # the peer went away while we listed
            out.append(PeerInfo(e.name, name, addr, status))
        return out

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _container(kv: dict[str, str]) -> ContainerInfo:
    code = kv.get("exit_code")
    return ContainerInfo(kv.get("id", ""), kv.get("name", ""), kv.get("image", ""), kv.get("state", "unknown"),
                         int(code) if code and code.lstrip("-").isdigit() else None, kv.get("reason", ""))

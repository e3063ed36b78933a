"""Simulated nodes in this process: the backend for benchmarks at 10,000 nodes and a second
implementation for the conformance suite.

A ``SimCluster`` holds ``SimState`` nodes by name; ``SimNode("sim!NAME")``
drives one of them through the Backend interface.  A simulated node runs
nothing: a container is a record whose state changes when told.  What a
real node does that matters to the scheduler is reproduced: unknown images
and containers are refused with the node's words, a node that is ``down``
cannot be reached, a ``hung`` one answers nothing until the caller's
timeout, and ``shutdown`` stops every container the way a node's SIGTERM does.

A node's peers are a gossip view, not the whole cluster: in a cluster of more than ``FULL_VIEW``
nodes each one names those 1, 2, 4, 8, ... places after and before it (in the order they were
added), so every node is found in a few hops from one seed, and the scheduler's look at peers
costs O(log N) a node instead of O(N) (10,000 nodes each naming 10,000 peers every few
seconds held a scheduler's loop for good and took gigabytes).
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import secrets
from dataclasses import dataclass, field

from .base import ContainerInfo, Health, NodeInfo, NodeRefused, NodeUnreachable, NoSuchContainer, PeerInfo, Spec

PREFIX = "sim!"
FULL_VIEW = 64  # clusters up to this size: every node names every other as its peer


@dataclass
class SimState:
    """One simulated node: what it offers and what it holds."""

    name: str
    cpus: float = 8.0
    mem: int = 16 << 30
    labels: dict[str, str] = field(default_factory=dict)
    images: tuple[str, ...] = ("hello", "web")
    id: str = field(default_factory=lambda: secrets.token_hex(4))
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    specs: dict[str, Spec] = field(default_factory=dict)
    down: bool = False  # unreachable: every call fails at once
    hung: bool = False  # every call waits for the caller's timeout, then fails
    calls: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def run(self, spec: Spec) -> str:
        if spec.image not in self.images:
            raise NodeRefused(f"node {self.name}: run {spec.name}: unknown image {spec.image!r} "
                              f"(images: {', '.join(self.images) or 'none'})")
        cid = str(next(self._ids))
        self.containers[cid] = ContainerInfo(cid, spec.name, spec.image, "running", labels=dict(spec.labels))
        self.specs[cid] = spec
        return cid

    def end(self, cid: str, state: str, exit_code: int | None = None, reason: str = "") -> None:
        """What happens to a container on its own (tests and benchmarks make it happen)."""
        c = self._get(cid)
        c.state, c.exit_code, c.reason = state, exit_code, reason

    def shutdown(self) -> None:
        for c in self.containers.values():
            if c.alive:
                c.state, c.reason = "stopped", "stopped: node shutting down"

    def wipe(self) -> None:
        """The node lost its state: it knows none of its containers any more."""
        self.containers.clear()
        self.specs.clear()

    def _get(self, cid: str) -> ContainerInfo:
        c = self.containers.get(cid)
        if c is None:
            raise NoSuchContainer(f"node {self.name}: unknown container {cid}")
        return c

    def used(self) -> tuple[float, int]:
        specs = [self.specs[cid] for cid, c in self.containers.items() if c.alive and cid in self.specs]
        return sum(s.cpus for s in specs), sum(s.mem for s in specs)


class SimCluster:
    """Simulated nodes by name; ``SimNode`` finds them in ``CLUSTER`` unless given another."""

    def __init__(self) -> None:
        self.nodes: dict[str, SimState] = {}
        self._order: list[str] = []  # the names in the order added (see view)
        self._place: dict[str, int] = {}

    def add(self, name: str, **kw: object) -> SimState:
        st = SimState(name, **kw)  # type: ignore[arg-type]
        self.nodes[name] = st
        return st

    def clear(self) -> None:
        self.nodes.clear()

    def view(self, name: str) -> builtins.list[SimState]:
        """The peers ``name`` knows of: all nodes in a small cluster, else a logarithmic ring view."""
        nodes = self.nodes
        if len(nodes) <= FULL_VIEW:
            return list(nodes.values())
        if len(self._order) != len(nodes) or name not in self._place:
            self._order = list(nodes)
            self._place = {n: i for i, n in enumerate(self._order)}
        i, n = self._place.get(name, 0), len(self._order)
        out, step = [nodes[name]] if name in nodes else [], 1
        seen = {name}  # (by name: comparing SimStates compares every container they hold)
        while step < n:
            for j in ((i + step) % n, (i - step) % n):
                peer = self._order[j]
                st = nodes.get(peer)
                if st is not None and peer not in seen:
                    seen.add(peer)
                    out.append(st)
            step *= 2
        return out


CLUSTER = SimCluster()


class SimNode:
    """The Backend (and Discovery) of a simulated node, at ``sim!NAME``."""

    kind = "sim"

    def __init__(self, addr: str, *, timeout: float = 5.0, cluster: SimCluster | None = None) -> None:
        if not addr.startswith(PREFIX):
            raise ValueError(f"not a simulated node's address: {addr!r}")
        self.addr = addr
        self.name = addr[len(PREFIX):]
        self.timeout = timeout
        self.cluster = cluster or CLUSTER

    @property
    def longest(self) -> float:
        return self.timeout  # (a hung node holds a call for the caller's timeout)

    async def _node(self) -> SimState:
        st = self.cluster.nodes.get(self.name)
        if st is None or st.down:
            raise NodeUnreachable(f"node {self.name} at {self.addr}: connection refused")
        if st.hung:
            await asyncio.sleep(self.timeout)
            raise NodeUnreachable(f"node {self.name} at {self.addr}: timed out after {self.timeout:g}s")
        st.calls += 1
        return st

    async def info(self) -> NodeInfo:
        st = await self._node()
        free = st.mem - st.used()[1]
        return NodeInfo(st.id, st.name, self.addr, st.cpus, st.mem, max(free, 0), dict(st.labels), st.images, self.kind)

    async def health(self) -> Health:
        st = await self._node()
        return Health(True, "", 0.0, max(st.mem - st.used()[1], 0), sum(1 for c in st.containers.values() if c.alive))

    async def run(self, spec: Spec) -> str:
        return (await self._node()).run(spec)

    async def stop(self, cid: str) -> None:
        c = (await self._node())._get(cid)
        if c.alive:
            c.state, c.reason = "stopped", "stopped by request"

    async def destroy(self, cid: str) -> None:
        st = await self._node()
        st._get(cid)
        del st.containers[cid]
        st.specs.pop(cid, None)

    async def status(self, cid: str) -> ContainerInfo:
        c = (await self._node())._get(cid)
        return ContainerInfo(c.id, c.name, c.image, c.state, c.exit_code, c.reason, dict(c.labels))

    async def list(self) -> list[ContainerInfo]:
        st = await self._node()
        return [ContainerInfo(c.id, c.name, c.image, c.state, c.exit_code, c.reason, dict(c.labels))
                for c in st.containers.values()]

    async def peers(self) -> builtins.list[PeerInfo]:
        await self._node()
        return [PeerInfo(n.id, n.name, PREFIX + n.name, "dead" if n.down else "online")
                for n in self.cluster.view(self.name)]

    async def close(self) -> None:
        return None

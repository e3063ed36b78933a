"""What every kind of node looks like to the scheduler.

Placing, migrating and evacuating are written once against ``Backend``:
``fornax.FornaxNode`` drives a Fornax node by mounting its /cluster tree
over 9P, ``sim.SimNode`` is a node in this process (for benchmarks at
10,000 nodes and for the conformance suite), and a Persys agent over gRPC
comes next.  A backend reports three kinds of failure apart: the node could
not be reached (``NodeUnreachable``), it refused (``NodeRefused``, with its
own words), or it does not know the container (``NoSuchContainer``, which
reconciliation treats as "already gone").  Finding other nodes is a
separate interface, ``Discovery``, that a backend may also implement.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

CLUSTER_LABEL = "fornax.sched/cluster"  # on every container the scheduler starts: the store's identity
REVISION_LABEL = "fornax.sched/revision"  # the spec's revision


class BackendError(Exception):
    pass


class NodeUnreachable(BackendError):
    """The node could not be reached or did not answer in time (dead, hung, restarting, network)."""


class NodeRefused(BackendError):
    """The node answered with an error (unknown image, bad limits, ...): the message is its words."""


class NoSuchContainer(NodeRefused):
    """The node does not know the container (destroyed, or never ran there)."""


@dataclass(frozen=True, slots=True)
class Spec:
    """What to run: the same for every kind of node."""

    name: str
    image: str
    args: tuple[str, ...] = ()
    cpus: float = 0.0
    mem: int = 0  # bytes
    labels: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    revision: str = ""  # a hash of everything above but the name (see with_revision)

    def with_revision(self) -> Spec:
        """The spec with its revision filled in: equal specs (names aside) have equal revisions."""
        labels = tuple(kv for kv in self.labels if kv[0] != REVISION_LABEL)
        rev = _revision(self.image, self.args, self.cpus, self.mem, self.env, labels)
        return Spec(self.name, self.image, self.args, self.cpus, self.mem, labels + ((REVISION_LABEL, rev),),
                    self.env, rev)


@functools.lru_cache(maxsize=4096, typed=True)
def _revision(image: str, args: tuple[str, ...], cpus: float, mem: int, env: tuple[tuple[str, str], ...],
              labels: tuple[tuple[str, str], ...]) -> str:
    """A hash of what a spec runs (every replica of a place asks for the same one)."""
    body = json.dumps([image, list(args), cpus, mem, sorted(env), sorted(labels)], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(slots=True)
class ContainerInfo:
    """What a node says about one of its containers."""

    id: str  # the node's own id for it
    name: str
    image: str
    state: str  # created | running | stopped | exited | failed
    exit_code: int | None = None
    reason: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.state in ("created", "running")


@dataclass(slots=True)
class NodeInfo:
    """What a node says about itself."""

    id: str
    name: str
    addr: str
    cpus: float
    mem: int
    mem_free: int
    labels: dict[str, str] = field(default_factory=dict)
    images: tuple[str, ...] | None = None  # None: the node does not say
    kind: str = "fornax"


@dataclass(slots=True)
class Health:
    ok: bool
    detail: str = ""
    load: float | None = None
    mem_free: int | None = None
    containers: int | None = None


@dataclass(slots=True)
class PeerInfo:
    """A node as another node's discovery sees it."""

    id: str
    name: str
    addr: str
    status: str  # online | suspect | dead


class Backend(Protocol):
    kind: str
    addr: str
    name: str  # what the node calls itself, once known (the address until then)

    @property
    def longest(self) -> float:
        """Seconds one call (run, stop, destroy) may take at most, its own retries and waits included."""
        ...

    async def info(self) -> NodeInfo: ...

    async def health(self) -> Health: ...

    async def run(self, spec: Spec) -> str:
        """Start a container; its id on the node."""
        ...

    async def stop(self, cid: str) -> None: ...

    async def destroy(self, cid: str) -> None: ...

    async def status(self, cid: str) -> ContainerInfo: ...

    async def list(self) -> list[ContainerInfo]: ...

    async def close(self) -> None: ...


@runtime_checkable
class Discovery(Protocol):
    """A backend that can name other nodes (a Fornax node's gossip)."""

    async def peers(self) -> builtins.list[PeerInfo]: ...


@runtime_checkable
class Logs(Protocol):
    """A backend whose node keeps its containers' output (a Fornax node's containers/CID/log)."""

    async def log(self, cid: str) -> bytes:
        """The container's output as the node keeps it (the newest part, if the node trims it)."""
        ...

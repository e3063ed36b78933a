"""Node backends: one interface for every kind of node, chosen by the form of its address.

    backend = connect("tcp!10.0.0.3!564")     # a Fornax node over 9P
    backend = connect("sim!node-0042")        # a simulated node in this process
    backend = connect("persys!10.0.0.4:50051")  # a Persys agent over gRPC (persys.py)

``KINDS`` maps an address form to the backend that serves it; a new kind
is one more entry and one more file.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import (
    CLUSTER_LABEL,
    REVISION_LABEL,
    Backend,
    BackendError,
    ContainerInfo,
    Discovery,
    Health,
    Logs,
    NodeInfo,
    NodeRefused,
    NodeUnreachable,
    NoSuchContainer,
    PeerInfo,
    Spec,
)
from .fornax import FornaxNode
from .persys import PersysAgent
from .sim import CLUSTER, SimCluster, SimNode, SimState

__all__ = [
    "CLUSTER", "CLUSTER_LABEL", "KINDS", "REVISION_LABEL", "Backend", "BackendError", "ContainerInfo", "Discovery",
    "FornaxNode", "Health", "Logs", "NoSuchContainer", "NodeInfo", "NodeRefused", "NodeUnreachable", "PeerInfo",
    "PersysAgent", "SimCluster", "SimNode", "SimState", "Spec", "connect", "kind_of",
]

# (how an address of this kind starts, the backend's factory: address, timeout -> Backend)
KINDS: list[tuple[str, Callable[[str, float], Backend]]] = [
    ("tcp!", lambda addr, timeout: FornaxNode(addr, timeout=timeout)),
    ("unix!", lambda addr, timeout: FornaxNode(addr, timeout=timeout)),
    ("sim!", lambda addr, timeout: SimNode(addr, timeout=timeout)),
    ("persys!", lambda addr, timeout: PersysAgent(addr, timeout=timeout)),
]


def kind_of(addr: str) -> Callable[[str, float], Backend] | None:
    for prefix, factory in KINDS:
        if addr.startswith(prefix):
            return factory
    return None


def connect(addr: str, *, timeout: float = 5.0) -> Backend:
    """The backend for a node at ``addr``; ValueError naming the forms known if none serves it."""
    factory = kind_of(addr)
    if factory is None:
        forms = ", ".join(p + "..." for p, _ in KINDS)
        raise ValueError(f"unknown node address {addr!r}: want one of {forms}")
    return factory(addr, timeout)

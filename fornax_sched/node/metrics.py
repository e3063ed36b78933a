"""A node's Prometheus metrics (docs/fornax-node.8.md lists them): containers by state, starts,
exits and start latency, the 9P requests it serves and, with --persys, the gRPC calls.

Counted through the hooks of the runtime (``on_start``, ``on_end``), the 9P server (``observe``)
and the gRPC handler (``RpcObserve``); containers by state are counted at each scrape (a node
runs tens of containers, not thousands).  Labels are bounded: no container names.
"""

from __future__ import annotations

from collections import Counter as Count
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..web.metrics import SLOW, DaemonMetrics, Labelled, Tally

if TYPE_CHECKING:
    from .daemon import NodeDaemon

PREFIX = "fornax_node_"
STATES = ("created", "running", "stopped", "exited", "failed")


class _NodeCollector(Collector):
    def __init__(self, node: NodeDaemon) -> None:
        self.node = node

    def collect(self) -> Iterator[GaugeMetricFamily]:
        n = self.node
        by = Count(c.state for c in n.runtime.list())
        g = GaugeMetricFamily(PREFIX + "containers", "Containers the node keeps, by state.", labels=["state"])
        for state in (*STATES, *sorted(set(by) - set(STATES))):
            g.add_metric([state], float(by.get(state, 0)))
        yield g
        yield GaugeMetricFamily(PREFIX + "cpus", "CPUs the node offers.", value=float(n.cpus))
        yield GaugeMetricFamily(PREFIX + "memory_bytes", "Memory the node offers.", value=float(n.mem))
        yield GaugeMetricFamily(PREFIX + "memory_free_bytes", "Memory not promised to or used by containers.",
                                value=float(n.mem_free()))
        yield GaugeMetricFamily(PREFIX + "joined", "1 while the node takes new containers.",
                                value=1.0 if n.joined else 0.0)


class NodeMetrics(DaemonMetrics):
    """One node's metrics (9P and gRPC in, the process: see web/metrics.py) and its containers'."""

    def __init__(self) -> None:
        super().__init__(PREFIX, "node")
        r = self.registry
        self._starts = Tally(r, PREFIX + "container_starts", "Container starts, by result (running, failed).",
                             PREFIX + "container_start_duration_seconds", "Time from a run request to the container "
                             "running (or failing to).", (), ("result",), SLOW)
        self._exits = Labelled(Counter(PREFIX + "container_exits", "Containers that ended while the node ran, by "
                                       "final state (exited, failed, stopped; a start that failed too).",
                                       ["state"], registry=r))

    def watch(self, node: NodeDaemon) -> None:
        node.runtime.on_start = self.start
        node.runtime.on_end = self.end
        self.registry.register(_NodeCollector(node))

    def start(self, result: str, seconds: float) -> None:
        self._starts((), (result,), seconds)

    def end(self, state: str) -> None:
        self._exits(state).inc()

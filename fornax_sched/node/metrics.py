"""A node's Prometheus metrics (docs/fornax-node.8.md lists them): containers by state, starts,
exits and start latency, the 9P requests it serves and, with --persys, the gRPC calls.

Counted through the hooks of the runtime (``on_start``, ``on_end``), the 9P server (``observe``)
and the gRPC handler (``RpcObserve``); containers by state are counted at each scrape (a node
runs tens of containers, not thousands).  Labels are bounded: no container names.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..sched.metrics import FAST, SLOW, _Labelled
from ..web.process import add_process_collectors

if TYPE_CHECKING:
    from .daemon import NodeDaemon

PREFIX = "fornax_node_"
STATES = ("created", "running", "stopped", "exited", "failed")


class _NodeCollector(Collector):
    def __init__(self, node: NodeDaemon) -> None:
        self.node = node

    def collect(self) -> Iterator[GaugeMetricFamily]:
        n = self.node
        by = Tally(c.state for c in n.runtime.list())
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


class NodeMetrics:
    """One node's registry (its own: tests run several nodes in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        add_process_collectors(r, PREFIX)
        self._starts = _Labelled(Counter(PREFIX + "container_starts", "Container starts, by result (running, "
                                         "failed).", ["result"], registry=r))
        self._start_s = Histogram(PREFIX + "container_start_duration_seconds", "Time from a run request to the "
                                  "container running (or failing to).", buckets=SLOW, registry=r)
        self._exits = _Labelled(Counter(PREFIX + "container_exits", "Containers that ended while the node ran, by "
                                        "final state (exited, failed, stopped; a start that failed too).",
                                        ["state"], registry=r))
        self._ninep = _Labelled(Counter(PREFIX + "ninep_requests", "9P requests answered, by operation and result "
                                        "(ok, error, flushed).", ["op", "result"], registry=r))
        self._ninep_s = _Labelled(Histogram(PREFIX + "ninep_request_duration_seconds", "Time from a 9P request's "
                                            "arrival to its reply, by operation.", ["op"], buckets=FAST, registry=r))
        self._render = Histogram(PREFIX + "metrics_render_seconds", "Time the node took to make a /metrics "
                                 "exposition (this one not yet counted).", buckets=FAST, registry=r)
        self._grpc = _Labelled(Counter(PREFIX + "grpc_server_handled", "gRPC calls served (AgentService, with "
                                       "--persys), by service, method and status code.",
                                       ["grpc_service", "grpc_method", "grpc_code"], registry=r))
        self._grpc_s = _Labelled(Histogram(PREFIX + "grpc_server_handling_seconds", "Time a gRPC call served took.",
                                           ["grpc_service", "grpc_method"], buckets=SLOW, registry=r))

    def watch(self, node: NodeDaemon) -> None:
        node.runtime.on_start = self.start
        node.runtime.on_end = self.end
        self.registry.register(_NodeCollector(node))

    def exposition(self) -> bytes:
        began = time.perf_counter()
        try:
            return generate_latest(self.registry)
        finally:
            self._render.observe(time.perf_counter() - began)

    def start(self, result: str, seconds: float) -> None:
        self._starts(result).inc()
        self._start_s.observe(seconds)

    def end(self, state: str) -> None:
        self._exits(state).inc()

    def ninep(self, op: str, result: str, seconds: float) -> None:
        self._ninep(op, result).inc()
        self._ninep_s(op).observe(seconds)

    def grpc_in(self, service: str, method: str, code: str, seconds: float) -> None:
        self._grpc(service, method, code).inc()
        self._grpc_s(service, method).observe(seconds)

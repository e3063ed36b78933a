"""What every daemon's /metrics has (the scheduler's in sched/metrics.py, a node's in node/metrics.py).

``DaemonMetrics`` is a registry of the daemon's own (not the process-wide default: tests run
several daemons in one process) with the 9P requests it serves, the gRPC calls it serves, the
time its exposition takes, prometheus-client's process, platform and GC collectors, and the
pauses of Python's garbage collector (what holds an event loop longest when a scheduler keeps
100,000 placements: a full collection walks every object).

The pauses are timed once per process (``gc.callbacks`` is the interpreter's) and shown by every
registry that asks, so several daemons in one process share one count.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a tenth of a millisecond (a 9P read from memory) to ten seconds (a slow store or node).
FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Commands and calls to other machines: a millisecond to a minute.
SLOW = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # garbage collector pauses


class _Pauses:
    """Per generation: counts by bucket (the last one +Inf) and the sum of seconds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = [[0] * (len(BUCKETS) + 1) for _ in range(3)]
        self.sums = [0.0, 0.0, 0.0]
        self.began = 0.0
        self.installed = False

    def install(self) -> None:
        with self.lock:
            if not self.installed:
                gc.callbacks.append(self.callback)
                self.installed = True

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.began = time.perf_counter()
            return
        seconds = time.perf_counter() - self.began
        g = min(int(info.get("generation", 0)), 2)
        self.counts[g][bisect.bisect_left(BUCKETS, seconds)] += 1  # (the GIL is held: no lock needed)
        self.sums[g] += seconds


PAUSES = _Pauses()
# No ``_created`` series beside every counter and histogram: twice the series, nothing a query needs.
disable_created_metrics()


class _PauseCollector(Collector):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def collect(self) -> Iterator[HistogramMetricFamily]:
        h = HistogramMetricFamily(self.prefix + "gc_pause_seconds", "Pauses of Python's garbage collector (the "
                                  "event loop stands still meanwhile), by generation.", labels=["generation"])
        for g in range(3):
            counts, total, acc = PAUSES.counts[g], PAUSES.sums[g], 0
            buckets = []
            for le, c in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                acc += c
                buckets.append((le, float(acc)))
            h.add_metric([str(g)], buckets, total)
        yield h


def add_process_collectors(registry: CollectorRegistry, prefix: str) -> None:
    """process_* (CPU, memory, descriptors), python_info, python_gc_*, and PREFIXgc_pause_seconds."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    PAUSES.install()
    registry.register(_PauseCollector(prefix))


class Tally(Collector):
    """A counter of events by labels and a histogram of their seconds, kept in plain ints for code
    on the event loop alone (every 9P request, every look at 10,000 nodes): a dict look-up and a
    bisect, no lock, a fraction of prometheus-client's cost (its Counter and Histogram lock on
    every update, 10 us a 9P request where a request costs the server 50).  Not for threads.

    The counter is ``NAME_total`` by ``labels + extra`` (extra: the result, the code), the
    histogram ``HNAME`` by ``labels``.
    """

    def __init__(self, registry: CollectorRegistry, name: str, doc: str, hname: str, hdoc: str,
                 labels: tuple[str, ...], extra: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.hname, self.hdoc = name, doc, hname, hdoc
        self.labels, self.extra, self.buckets = labels, extra, buckets
        self.counts: dict[tuple[str, ...], int] = {}
        self.hists: dict[tuple[str, ...], list[float]] = {}  # labels -> counts by bucket (+Inf last), then sum
        self._les = (*(repr(float(b)) for b in buckets), "+Inf")
        registry.register(self)

    def count(self, key: tuple[str, ...], extra: tuple[str, ...]) -> None:
        """An event counted without a duration (one that took no time of its own)."""
        counted = key + extra
        self.counts[counted] = self.counts.get(counted, 0) + 1

    def __call__(self, key: tuple[str, ...], extra: tuple[str, ...], seconds: float) -> None:
        self.count(key, extra)
        h = self.hists.get(key)
        if h is None:
            h = self.hists[key] = [0.0] * (len(self.buckets) + 2)
        h[bisect.bisect_left(self.buckets, seconds)] += 1
        h[-1] += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        c = CounterMetricFamily(self.name, self.doc, labels=[*self.labels, *self.extra])
        for key, n in sorted(self.counts.items()):
            c.add_metric(list(key), float(n))
        yield c
        h = HistogramMetricFamily(self.hname, self.hdoc, labels=list(self.labels))
        for key, row in sorted(self.hists.items()):
            acc, buckets = 0.0, []
            for le, count in zip(self._les, row, strict=False):  # (the sum, last in row, has no le)
                acc += count
                buckets.append((le, acc))
            h.add_metric(list(key), buckets, row[-1])
        yield h


class Labelled:
    """A metric's children by label values, looked up once: ``labels()`` takes a lock and builds a
    tuple each time, which 10,000 nodes' rounds a second would pay."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


SLICE = 0.0005  # seconds of rendering between two turns of the event loop (DaemonMetrics.render)


class _Families:
    """One metric family as a registry, for generate_latest."""

    def __init__(self, family: Any) -> None:
        self.family = family

    def collect(self) -> Iterator[Any]:
        yield self.family


class DaemonMetrics:
    """A daemon's registry (names under ``prefix``) with what every daemon counts."""

    def __init__(self, prefix: str, what: str) -> None:
        self.prefix = prefix
        r = self.registry = CollectorRegistry(auto_describe=False)
        add_process_collectors(r, prefix)
        self._render = Histogram(prefix + "metrics_render_seconds", f"Time the {what} took to make a /metrics "
                                 "exposition (this one not yet counted).", buckets=FAST, registry=r)
        self._ninep = Tally(r, prefix + "ninep_requests", "9P requests answered, by operation (read, walk, ...) and "
                            "result (ok, error, flushed).", prefix + "ninep_request_duration_seconds", "Time from a "
                            "9P request's arrival to its reply, by operation.", ("op",), ("result",), FAST)
        self._grpc_in = Tally(r, prefix + "grpc_server_handled", f"gRPC calls the {what} served, by service, method "
                              "and status code.", prefix + "grpc_server_handling_seconds", "Time a gRPC call served "
                              "took.", ("grpc_service", "grpc_method"), ("grpc_code",), SLOW)

    async def render(self, slice_s: float = SLICE) -> bytes:
        """The text exposition, made a metric family at a time, the event loop let go after every
        ``slice_s`` of work: a 9P request that comes during a scrape waits for one slice, not for
        the whole render (3-4 ms at 10,000 nodes).  The families are read one after another, as
        Prometheus' own clients do; the work time (not the wall time, what a scrape costs the loop)
        is in the next one."""
        parts: list[bytes] = []
        spent, t = 0.0, time.perf_counter()
        for family in self.registry.collect():
            parts.append(generate_latest(_Families(family)))
            now = time.perf_counter()
            if now - t >= slice_s:
                spent += now - t
                await asyncio.sleep(0)
                t = time.perf_counter()
        spent += time.perf_counter() - t
        self._render.observe(spent)
        return b"".join(parts)

    def ninep(self, op: str, result: str, seconds: float) -> None:
        """The 9P server's hook (fs.session.Observe)."""
        self._ninep((op,), (result,), seconds)

    def grpc_in(self, service: str, method: str, code: str, seconds: float) -> None:
        """A gRPC server's hook (persys.protos.RpcObserve)."""
        self._grpc_in((service, method), (code,), seconds)

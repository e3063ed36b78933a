"""Process-wide metrics for any daemon's registry: prometheus-client's process, platform and GC
collectors, and the pauses of Python's garbage collector (what holds an event loop longest when
a scheduler keeps 100,000 placements: a full collection walks every object).

The pauses are timed once per process (``gc.callbacks`` is the interpreter's) and shown by every
registry that asks, so several daemons in one process (the tests) share one count.
"""

from __future__ import annotations

import bisect
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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

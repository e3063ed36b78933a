"""The scheduler's Prometheus metrics (docs/http.8.md lists them).

Gauges of what the state holds are read off the scheduler when Prometheus scrapes (a
collector), so nothing has to keep them current; counters and histograms of what happens
are updated where it happens.  Every label has a bounded set of values: no container or
node names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .modes import DEGRADED, NORMAL, RECOVERY

if TYPE_CHECKING:
    from .service import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StateCollector(Collector):
    """Gauges computed from the scheduler's state at each scrape."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.sched
        mode = GaugeMetricFamily("fornax_sched_mode", "The operating mode: 1 for the current one.", labels=["mode"])
        for name in (NORMAL, DEGRADED, RECOVERY):
            mode.add_metric([name], 1.0 if s.mode.name == name else 0.0)
        yield mode
        yield GaugeMetricFamily("fornax_sched_mode_since_seconds",
                                "When the operating mode last changed (Unix time).", value=s.mode.since)
        yield GaugeMetricFamily("fornax_sched_leader", "1 while this scheduler decides and acts on nodes.",
                                value=1.0 if s.leading else 0.0)
        nodes = GaugeMetricFamily("fornax_sched_nodes", "Nodes known, by kind and status.",
                                  labels=["kind", "status"])
        counts: Counter[tuple[str, str]] = Counter()
        for name, n in s.state.cluster.nodes.items():
            meta = s.state.nodes.get(name)
            counts[(meta.kind if meta else "", n.status)] += 1
        for (kind, status), c in sorted(counts.items()):
            nodes.add_metric([kind, status], float(c))
        yield nodes
        placements = GaugeMetricFamily("fornax_sched_placements", "Placements, by status.", labels=["status"])
        for status, c in sorted(Counter(r.status for r in s.state.records.values()).items()):
            placements.add_metric([status], float(c))
        yield placements


class SchedMetrics:
    """One scheduler's registry (its own, not the process-wide default: tests run several in one process)."""

    def __init__(self, sched: Scheduler) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(sched))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

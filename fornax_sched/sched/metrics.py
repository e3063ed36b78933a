"""The scheduler's Prometheus metrics (docs/http.8.md lists them).

What happens (9P requests, ctl commands, decisions, looks at nodes, reconciliation steps, commits,
gRPC calls) is counted where it happens, through the hooks the layers offer: ``SchedMetrics`` is
the scheduler's ``Observer`` (observe.py), the 9P server's ``observe`` and the gRPC ``RpcObserve``
of AgentControl and of the calls to agents.  What the state holds (mode, leadership, nodes by
kind and status, placements by status, drift) is read when Prometheus scrapes, from counts the
state keeps as it changes (core.Cluster.counts, State.statuses): a scrape never walks 100,000
placements.  Every label has a bounded set of values: no container or node names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..web.metrics import CONTENT_TYPE, FAST, SLOW, DaemonMetrics, Labelled, Tally
from .drift import KINDS as DRIFT_KINDS
from .modes import DEGRADED, NORMAL, RECOVERY
from .observe import Observer

if TYPE_CHECKING:
    from .service import Scheduler

PREFIX = "fornax_sched_"


class _StateCollector(Collector):
    """Gauges of what the scheduler's state holds, made at each scrape from counts kept as it changes."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.sched
        mode = GaugeMetricFamily(PREFIX + "mode", "The operating mode: 1 for the current one.", labels=["mode"])
        for name in (NORMAL, DEGRADED, RECOVERY):
            mode.add_metric([name], 1.0 if s.mode.name == name else 0.0)
        yield mode
        yield GaugeMetricFamily(PREFIX + "mode_since_seconds",
                                "When the operating mode last changed (Unix time).", value=s.mode.since)
        yield CounterMetricFamily(PREFIX + "store_slow_looks", "Tries of a look at the store late while the "
                                  "scheduler's own loop stood still, asked again at once (after 4: degraded).",
                                  value=float(s.store_slow_looks))
        yield GaugeMetricFamily(PREFIX + "node_look_interval_seconds", "Seconds between looks at each node, paced "
                                "by the cluster's size (at most --max-looks a second in all).", value=s.look_every)
        yield GaugeMetricFamily(PREFIX + "node_dead_after_seconds", "Seconds without an answer before a node "
                                "is dead, scaled with the look interval.", value=s.liveness.dead_after)
        yield GaugeMetricFamily(PREFIX + "leader", "1 while this scheduler decides and acts on nodes.",
                                value=1.0 if s.leading else 0.0)
        nodes = GaugeMetricFamily(PREFIX + "nodes", "Nodes known, by kind and status.", labels=["kind", "status"])
        for (kind, status), c in sorted(s.state.cluster.counts.items()):
            nodes.add_metric([kind, status], float(c))
        yield nodes
        placements = GaugeMetricFamily(PREFIX + "placements", "Placements, by status.", labels=["status"])
        for status, c in sorted(s.state.statuses.items()):
            placements.add_metric([status], float(c))
        yield placements
        book = s.drift
        drift = GaugeMetricFamily(PREFIX + "drift", "Drift findings, by kind, open (not yet resolved) or resolved.",
                                  labels=["kind", "state"])
        counts = dict.fromkeys(((k, st) for k in DRIFT_KINDS for st in ("open", "resolved")), 0)
        for d in book.entries.values():
            key = (d.kind, "open" if d.resolved is None else "resolved")
            counts[key] = counts.get(key, 0) + 1
        for (kind, state), c in counts.items():
            drift.add_metric([kind, state], float(c))
        yield drift
        yield CounterMetricFamily(PREFIX + "drift_passes", "Drift comparisons of a node's listing with the "
                                  "placements.", value=float(book.passes))


class SchedMetrics(DaemonMetrics, Observer):
    """One scheduler's metrics.  Made before the scheduler (its hooks go to the servers and backends
    made with it); ``watch`` adds the gauges of its state."""

    def __init__(self, store: str = "") -> None:
        super().__init__(PREFIX, "scheduler")
        r = self.registry
        self.store = store  # the store's kind (sqlite, etcd), a label of the commit metrics
        # On the event loop alone: plain counts (web.metrics.Tally).
        self._ctl = Tally(r, PREFIX + "ctl_commands", "ctl commands, by verb and result (ok, refused, store, "
                          "frozen, error).", PREFIX + "ctl_command_duration_seconds", "Time a ctl command took to "
                          "answer (committed and acted on), by verb.", ("verb",), ("result",), SLOW)
        self._polls = Tally(r, PREFIX + "node_polls", "Looks at a node (its listing, info and health), by result "
                            "(ok, unreachable).", PREFIX + "node_poll_duration_seconds", "Time one look at a node "
                            "took.", (), ("result",), SLOW)
        self._rounds = Tally(r, PREFIX + "reconcile_rounds", "Reconciliation rounds (one listing of a node planned, "
                             "committed and acted on), by result (acted, unchanged, skipped, store, error).",
                             PREFIX + "reconcile_round_duration_seconds", "Time one reconciliation round took.", (),
                             ("result",), SLOW)
        self._commits = Tally(r, PREFIX + "store_commits", "Store transactions of the commit path, by store and "
                              "result (ok, conflict, not_leader, busy, compacted, cancelled, error).",
                              PREFIX + "store_commit_duration_seconds", "Time one store transaction took, failed "
                              "ones too.", ("store",), ("result",), FAST)
        self._grpc_out = Tally(r, PREFIX + "grpc_client_handled", "gRPC calls made to Persys agents, by service, "
                               "method and status code.", PREFIX + "grpc_client_handling_seconds", "Time a gRPC call "
                               "to an agent took.", ("grpc_service", "grpc_method"), ("grpc_code",), SLOW)
        # Also on the decider's thread: prometheus-client's own (locked) metrics.
        self._decide_s = Labelled(Histogram(PREFIX + "decision_duration_seconds", "Time one placement decision "
                                            "took, by the kind of policy that made it (rules, lua, yaml, platform).",
                                            ["kind"], buckets=FAST, registry=r))
        self._fallback = Labelled(Counter(PREFIX + "policy_fallbacks", "Decisions a programmable policy did not "
                                          "make, by reason.", ["reason"], registry=r))

    def watch(self, sched: Scheduler) -> None:
        """Count what ``sched`` does, and show what its state holds."""
        self.store = sched.store.kind
        sched.observed_by(self)
        self.registry.register(_StateCollector(sched))

    # ------------------------------------------------------------ the hooks
    def grpc_out(self, service: str, method: str, code: str, seconds: float) -> None:
        self._grpc_out((service, method), (code,), seconds)

    def ctl(self, verb: str, result: str, seconds: float) -> None:
        self._ctl((verb,), (result,), seconds)

    def decision(self, kind: str, seconds: float) -> None:
        self._decide_s(kind).observe(seconds)

    def fallback(self, reason: str) -> None:
        self._fallback(reason).inc()

    def round(self, result: str, seconds: float) -> None:
        self._polls((), (result,), seconds)

    def reconcile(self, result: str, seconds: float) -> None:
        if result == "skipped":  # (no round took place: no duration to count)
            self._rounds.count((), (result,))
        else:
            self._rounds((), (result,), seconds)

    def commit(self, result: str, seconds: float) -> None:
        self._commits((self.store,), (result,), seconds)


__all__ = ["CONTENT_TYPE", "PREFIX", "SchedMetrics"]

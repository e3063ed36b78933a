"""The scheduler's state in memory: the rows of the store, and the one way they change.

Every change to what the scheduler knows goes through ``State.apply``:
committed rows after a command or a reconciliation step, rows loaded at
start, rows a follower learns from a watch.  Two copies are kept the same
way: the one the file tree reads (on the event loop) and the one decisions
are planned on (in the decider's thread); neither is ever changed by a
plan before its rows are durable.

A placement's row holds the user's intent apart from what nodes report:
``want`` is what the user asked for (``run``, ``stop``, ``remove``) and
only a command changes it; ``status`` is what was last seen or done
(pending, starting, running, exited, ...).  A node that shuts down, a
crash or a restart changes the status, never the intent, so whatever is
meant to run is started again.

Liveness (online, suspect, dead) and the names of containers a node runs
that the scheduler did not place are observed, not stored: they are set
with ``set_status`` and ``observe_foreign``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .core import Cluster, Placement
from .model import NodeFacts, Request

WANTS = ("run", "stop", "remove")
ALIVE = ("created", "running")  # container states that count as running on a node
ENDED = ("stopped", "succeeded", "exited", "failed")  # (exited: what succeeded was called before)
WAITING = ("pending", "unschedulable", "lost")  # placed as soon as a node can take it

Change = tuple[str, str, Any]  # (table, key, the row, or None: deleted)


@dataclass(slots=True)
class Record:
    """What the scheduler keeps about one placement beyond the core's view."""

    group: str  # the replica set it belongs to (scale works on groups)
    want: str = "run"  # the user's intent: run | stop | remove
    status: str = "pending"  # pending unschedulable lost starting running stopping stopped succeeded failed removing
    cid: str = ""  # the node's id for the container
    since: float = 0.0  # when the status last changed
    detail: str = ""  # the node's reason (exit code, memory limit), or why it is pending
    created: float = 0.0
    restarts: int = 0  # restarts on its node since it last ran for a while (restart=)
    restarted: float = 0.0  # when it was last restarted


@dataclass(slots=True)
class NodeMeta:
    """What the scheduler keeps about a node beyond its facts: where it is and what it has."""

    addr: str
    kind: str = "fornax"
    images: tuple[str, ...] | None = None  # None: the node does not say


@dataclass
class State:
    cluster: Cluster = field(default_factory=Cluster)
    records: dict[str, Record] = field(default_factory=dict)
    nodes: dict[str, NodeMeta] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)  # next replica number per name stem
    policies: dict[str, Any] = field(default_factory=dict)  # the policies table, as stored
    pending: dict[str, None] = field(default_factory=dict)  # placements whose status is pending, oldest first
    foreign: dict[str, set[str]] = field(default_factory=dict)  # node -> names it runs that we did not place
    # node -> (liveness, since) as the leading replica last recorded it (meta liveness/NODE): what a
    # follower shows, since only the leader watches the nodes; never used to decide
    reported: dict[str, tuple[str, float]] = field(default_factory=dict)
    # Placements by status, kept as they change (a scrape must not walk 100,000 records to count them).
    statuses: dict[str, int] = field(default_factory=dict)
    # node -> a number that grows whenever anything a node's listing is compared with changes: its
    # row, a placement meant for it (or moved off it), what it runs that we did not place.  A node
    # whose number and listing are both as they were needs no new plan (service._quiet).
    versions: dict[str, int] = field(default_factory=dict)
    _version: int = 0
    _requests: dict[Request, Request] = field(default_factory=dict)  # one copy of each request
    _text: dict[str, str] = field(default_factory=dict)  # one copy of each repeated string
    _known: tuple[set[str] | None, set[str]] | None = field(default=None, repr=False)  # see _facts

    # ------------------------------------------------------------ drafts
    @contextmanager
    def draft(self) -> Iterator[State]:
        """Rows applied inside (and the cluster's changes) are undone on leaving: a group of plans
        is computed one on top of the other, each seeing the rows of those before it.  The undo
        steps of the rows go into the cluster's draft, so one journal holds both, in order."""
        with self.cluster.draft():
            yield self

    def savepoint(self) -> int:
        return self.cluster.savepoint()

    def rollback_to(self, point: int) -> None:
        """Undo what the open draft did since ``savepoint`` (a plan that failed half way)."""
        self.cluster.rollback_to(point)

    def _keep(self, table: str, key: str) -> None:
        """In a draft: remember what a row's memory was, to put it back."""
        if not self.cluster.drafting:
            return
        remember = self.cluster.remember
        if table == "placements":
            r = self.records.get(key)
            was = copy.copy(r) if r is not None else None
            pending = key in self.pending

            def placement() -> None:
                now = self.records.get(key)
                self._count(now.status if now is not None else None, was.status if was is not None else None)
                if was is None:
                    self.records.pop(key, None)
                else:
                    self.records[key] = was
                if pending:
                    self.pending[key] = None
                else:
                    self.pending.pop(key, None)

            remember(placement)
        elif table == "nodes":
            remember(_put_back(self.nodes, key))
        elif table == "meta":
            remember(_put_back(self.seq, key[4:]))
        elif table == "policies":
            remember(_put_back(self.policies, key))

    # ------------------------------------------------------------ rows
    def placement_row(self, name: str) -> dict[str, Any]:
        p = self.cluster.placements[name]
        r = self.records[name]
        return {"request": request_to_json(p.request), "node": p.node, "reason": p.reason, "group": r.group,
                "want": r.want, "status": r.status, "cid": r.cid, "since": r.since, "detail": r.detail,
                "created": r.created, "restarts": r.restarts, "restarted": r.restarted}

    def node_row(self, name: str) -> dict[str, Any]:
        n = self.cluster.nodes[name]
        m = self.nodes.get(name) or NodeMeta("")
        return {"addr": m.addr, "kind": m.kind, "cpus": n.facts.cpus, "mem": n.facts.mem,
                "labels": dict(n.facts.labels), "cordoned": n.cordoned,
                "images": list(m.images) if m.images is not None else None}

    def apply(self, changes: Iterable[Change]) -> None:
        """Make committed rows true in memory (nodes before the placements that name them)."""
        changes = list(changes)
        if self.cluster.drafting:
            for table, key, _ in changes:
                self._keep(table, key)
        for table, key, value in changes:
            if table == "nodes":
                self._node(key, value)
        for table, key, value in changes:
            if table == "placements":
                self._placement(key, value)
            elif table == "meta":
                self._meta(key, value)
            elif table == "policies":
                if value is None:
                    self.policies.pop(key, None)
                else:
                    self.policies[key] = value

    def touch(self, node: str | None) -> None:
        if node:
            self._version += 1
            self.versions[node] = self._version

    def _node(self, name: str, d: dict[str, Any] | None) -> None:
        c = self.cluster
        self._known = None
        self.touch(name)
        if d is None:
            if name in c.nodes:
                c.remove_node(name)
            self.nodes.pop(name, None)
            return
        facts = NodeFacts(name, float(d["cpus"]), int(d["mem"]), dict(d.get("labels") or {}),
                          str(d.get("kind", "fornax")))
        old = c.nodes.get(name)
        if old is None or old.facts != facts:
            c.add_node(facts, old.status if old is not None else "unknown")
        if c.nodes[name].cordoned != bool(d.get("cordoned")):
            c.cordon(name, bool(d.get("cordoned")))
        images = d.get("images")
        self.nodes[name] = NodeMeta(self._one(str(d.get("addr", ""))), self._one(str(d.get("kind", "fornax"))),
                                    tuple(images) if isinstance(images, list) else None)

    def _placement(self, name: str, d: dict[str, Any] | None) -> None:
        c = self.cluster
        was_on = c.placements[name].node if name in c.placements else None
        self.touch(was_on)
        if d is not None and d.get("node") != was_on:
            self.touch(d.get("node"))
        if d is None:
            if name in c.placements:
                c.forget(name)
            gone = self.records.pop(name, None)
            if gone is not None:
                self._count(gone.status, None)
            self.pending.pop(name, None)
            return
        req = request_from_json(d["request"])
        req = self._requests.setdefault(req, req)
        p: Placement | None = c.placements.get(name)
        if p is not None and p.request != req:
            c.forget(name)
            p = None
        if p is None:
            p = c.add(name, req)
        node = d.get("node")
        reason = self._one(str(d.get("reason", "")))
        if node and node in c.nodes:
            c.assign(name, node, reason, force=True)
        else:
            c.unassign(name, reason)
            c.set_reason(name, reason)
        status = str(d.get("status", "pending"))
        status = "succeeded" if status == "exited" else status  # (a store from before the name)
        want = d.get("want") or _want_of(status)
        r = self.records.get(name)
        was: str | None = None
        if r is None:
            r = self.records[name] = Record(self._one(str(d.get("group", name))))
        else:
            was = r.status
        r.group = self._one(str(d.get("group", name)))
        r.want = want if want in WANTS else "run"
        r.status = self._one("pending" if node and node not in c.nodes else status)
        self._count(was, r.status)
        r.cid = str(d.get("cid", ""))
        r.since = float(d.get("since", 0.0))
        r.detail = self._one(str(d.get("detail", "")))
        r.created = float(d.get("created", 0.0))
        r.restarts = int(d.get("restarts", 0))
        r.restarted = float(d.get("restarted", 0.0))
        if r.status in WAITING:
            self.pending.setdefault(name, None)
        else:
            self.pending.pop(name, None)

    def _meta(self, key: str, value: Any) -> None:
        if key.startswith("seq/"):
            if value is None:
                self.seq.pop(key[4:], None)
            else:
                self.seq[key[4:]] = int(value)
        elif key.startswith("liveness/"):
            if isinstance(value, dict):
                self.reported[key[9:]] = (self._one(str(value.get("status", "unknown"))), float(value.get("since", 0)))
            else:
                self.reported.pop(key[9:], None)
        elif key == "seq" and isinstance(value, dict):  # stores from before one row a stem
            for stem, n in value.items():
                self.seq.setdefault(stem, int(n))

    def _count(self, was: str | None, now: str | None) -> None:
        """A placement's status went from ``was`` to ``now`` (None: absent) in ``statuses``."""
        if was == now:
            return
        st = self.statuses
        if was is not None:
            left = st.get(was, 0) - 1
            if left > 0:
                st[was] = left
            else:
                st.pop(was, None)
        if now is not None:
            st[now] = st.get(now, 0) + 1

    def _one(self, s: str) -> str:
        return self._text.setdefault(s, s)

    def sort_pending(self) -> None:
        """Oldest first (after a load, whose rows come in key order)."""
        self.pending = dict.fromkeys(sorted(self.pending, key=lambda n: self.records[n].created))

    # ------------------------------------------------------------ observed, not stored
    def set_status(self, node: str, status: str) -> None:
        if node in self.cluster.nodes and self.cluster.nodes[node].status != status:
            self.cluster.set_status(node, status)

    def observe_foreign(self, node: str, names: set[str]) -> None:
        self.touch(node)
        if self.cluster.drafting:
            self.cluster.remember(_put_back(self.foreign, node))
        if names:
            self.foreign[node] = set(names)
        else:
            self.foreign.pop(node, None)

    # ------------------------------------------------------------ questions planners ask
    def name_taken(self, name: str) -> bool:
        """A name the scheduler must not give: placed already, or a container it did not place."""
        return name in self.records or any(name in names for names in self.foreign.values())

    def members(self, group: str) -> list[str]:
        """The replicas of a group that are not being removed, in replica order."""
        return sorted((n for n, r in self.records.items() if r.group == group and r.want != "remove"),
                      key=replica_order)

    def images(self) -> set[str] | None:
        """Every image some node says it has; None if a node does not say (then any may exist)."""
        return self._facts()[0]

    def label_keys(self) -> set[str]:
        return self._facts()[1]

    def _facts(self) -> tuple[set[str] | None, set[str]]:
        """(images, label keys) of all the nodes, worked out again only after a node changed."""
        if self._known is None:
            images: set[str] | None = set()
            for name in self.cluster.nodes:
                m = self.nodes.get(name)
                if m is None or m.images is None:
                    images = None
                    break
                assert images is not None
                images.update(m.images)
            keys = {k for n in self.cluster.nodes.values() for k in n.facts.labels}
            self._known = (images, keys)
        return self._known


_IMMUTABLE = (int, float, str, bool, tuple, frozenset, type(None))


def _put_back(d: dict[Any, Any], key: Any) -> Callable[[], None]:
    """An undo step: ``d[key]`` as it is now (absent if it is absent now)."""
    missing = key not in d
    was = d.get(key)
    if type(was) not in _IMMUTABLE:  # (copy.copy of an int costs more than the rest of the step)
        was = copy.copy(was)

    def undo() -> None:
        if missing:
            d.pop(key, None)
        else:
            d[key] = was

    return undo


def _want_of(status: str) -> str:
    """The intent of a row written before intents were kept apart."""
    if status in ("stopping", "stopped"):
        return "stop"
    if status == "removing":
        return "remove"
    return "run"


def replica_order(name: str) -> tuple[int, str]:
    stem, _, n = name.rpartition("-")
    return (int(n), stem) if n.isdigit() else (0, name)


def request_to_json(r: Request) -> dict[str, Any]:
    return {"image": r.image, "args": list(r.args), "name": r.name, "replicas": r.replicas, "cpus": r.cpus,
            "mem": r.mem, "labels": [list(kv) for kv in r.labels], "include": list(r.include),
            "exclude": list(r.exclude), "avoid": list(r.avoid),
            **({"restart": r.restart} if r.restart != "never" else {}),
            **({"env": [list(kv) for kv in r.env]} if r.env else {})}


def request_from_json(d: dict[str, Any]) -> Request:
    return Request(image=d["image"], args=tuple(d.get("args", ())), name=d.get("name", ""),
                   replicas=int(d.get("replicas", 1)), cpus=float(d.get("cpus", 0)), mem=int(d.get("mem", 0)),
                   labels=tuple((k, v) for k, v in d.get("labels", ())), include=tuple(d.get("include", ())),
                   exclude=tuple(d.get("exclude", ())), avoid=tuple(d.get("avoid", ())),
                   restart=str(d.get("restart", "never")), env=tuple((k, v) for k, v in d.get("env", ())))



_second: list[Any] = [None, ""]  # the last whole second stamped, and its text


def stamp(t: float) -> str:
    """A time as the log shows it, to the millisecond (UTC).  The second's text is made once:
    every log line is stamped, and strftime took a sixtieth of a place's CPU."""
    whole = int(t // 1)
    if whole != _second[0]:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int(t * 1000) % 1000:03d}Z"

"""The deciding core of the scheduler: pure functions over the cluster's state.

No sockets, no clocks, no files: the file tree, the node drivers and the
store call in with facts and carry out what comes back.  That is what lets
a benchmark drive 10,000 simulated nodes in one process and lets hypothesis
check the invariants (capacity never exceeded, nothing placed twice).

A decision is a feasibility filter followed by a ranking, as in Nomad and
the kube-scheduler: a node is *feasible* for a request when it is online and
not cordoned, the request's name globs and labels allow it, it has room for
the request's cpu and memory, and it runs nothing the request must avoid.
Feasible nodes are ranked by the policy: first by affinity (nodes matching
the earlier affinity rules first), then, for a container whose name matches
an anti-affinity rule, by how few matching containers the node already
runs, then by the base order (spread: fewest containers; pack: most), and
last by name, so that decisions are reproducible.

Nodes are kept in buckets by container count within each affinity class, so
the usual decision looks at a handful of nodes, not all of them.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol

from .model import Affinity, AntiAffinity, NodeFacts, Policy, Request

EPSILON = 1e-9
USABLE = "online"


@dataclass(slots=True)
class NodeState:
    facts: NodeFacts
    status: str = USABLE  # online | suspect | dead
    cordoned: bool = False
    used_cpus: float = 0.0
    used_mem: int = 0
    containers: dict[str, None] = field(default_factory=dict)  # placement names, in arrival order
    klass: int = 0  # affinity class under the current policy: lower is preferred

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def usable(self) -> bool:
        return self.status == USABLE and not self.cordoned

    def room_for(self, req: Request) -> bool:
        return (self.used_cpus + req.cpus <= self.facts.cpus + EPSILON
                and self.used_mem + req.mem <= self.facts.mem)

    def runs_any(self, globs: Iterable[str]) -> int:
        """How many of this node's containers match any of the globs."""
        globs = tuple(globs)
        return sum(1 for c in self.containers if any(fnmatchcase(c, g) for g in globs))


@dataclass(slots=True)
class Placement:
    name: str
    request: Request
    node: str | None = None  # None: pending
    reason: str = ""  # why it is pending, or how it got where it is


@dataclass(frozen=True, slots=True)
class Decision:
    name: str
    node: str | None  # None: unschedulable now
    reason: str
    candidates: int  # feasible nodes looked at

    def line(self) -> str:
        """``web-1 -> node-3: why`` or ``web-1 pending: why`` (simulations show these)."""
        return f"{self.name} -> {self.node}: {self.reason}" if self.node else f"{self.name} pending: {self.reason}"


class Program(Protocol):
    """A programmable policy (a Lua program, say) that decides in place of the built-in ranking.

    It sees the whole cluster; ``cluster.changed`` names the nodes whose facts,
    status or load changed since it last looked (it clears the set), so it
    can keep its own copy up to date cheaply.  It must return a Decision whose
    node is feasible (``cluster.feasible``) and not excluded, or None for the
    node; on any failure of its own it falls back to ``cluster.decide_builtin``.
    """

    def decide(self, cluster: Cluster, name: str, req: Request, exclude: frozenset[str]) -> Decision: ...


def simple(req: Request) -> bool:
    """A request the cluster's indexes answer alone (at most one label, no name globs, no
    anti-affinity): deciding it, even when nothing fits, never looks at every node."""
    return len(req.labels) <= 1 and not (req.include or req.exclude or req.avoid)


class _Index:
    """Nodes by affinity class, then container count, in name order within a bucket (so a tie
    goes to the first node by name, as in platform.lua), with a bound per bucket on the room its
    nodes have free: a decision skips a bucket of full nodes at once (pack meets them first, and
    they pile up)."""

    __slots__ = ("buckets", "room", "size", "down", "cordoned")

    def __init__(self) -> None:
        self.buckets: dict[int, dict[int, list[str]]] = {}
        self.room: dict[tuple[int, int], list[float]] = {}  # at least the most any node there has free
        self.size = 0
        self.down = 0  # nodes not online
        self.cordoned = 0  # online nodes that are cordoned

    def tally(self, n: NodeState, sign: int) -> None:
        if n.status != USABLE:
            self.down += sign
        elif n.cordoned:
            self.cordoned += sign

    def insert(self, n: NodeState) -> None:
        count = len(n.containers)
        bisect.insort(self.buckets.setdefault(n.klass, {}).setdefault(count, []), n.name)
        self.size += 1
        self.tally(n, 1)
        free_cpus, free_mem = n.facts.cpus - n.used_cpus, n.facts.mem - n.used_mem
        room = self.room.get((n.klass, count))
        if room is None:
            self.room[(n.klass, count)] = [free_cpus, free_mem]
        else:
            room[0] = max(room[0], free_cpus)
            room[1] = max(room[1], free_mem)

    def remove(self, n: NodeState) -> None:
        counts = self.buckets.get(n.klass, {})
        bucket = counts.get(len(n.containers))
        if bucket is None:
            return
        i = bisect.bisect_left(bucket, n.name)
        if i < len(bucket) and bucket[i] == n.name:
            del bucket[i]
            self.size -= 1
            self.tally(n, -1)
            if not bucket:
                del counts[len(n.containers)]
                self.room.pop((n.klass, len(n.containers)), None)

    def names(self) -> Iterator[str]:
        for counts in self.buckets.values():
            for bucket in counts.values():
                yield from bucket

    def order(self, nodes: dict[str, NodeState], pack: bool, req: Request | None) -> Iterator[NodeState]:
        """Nodes in policy order: class, then base order, then name.  Given a request, only nodes
        with the room it needs; a bucket gone through without one gets its bound lowered."""
        for klass in sorted(self.buckets):
            counts = self.buckets[klass]
            for count in sorted(counts, reverse=pack):
                room = self.room.get((klass, count))
                if req is not None and room is not None and (room[0] + EPSILON < req.cpus or room[1] < req.mem):
                    continue
                top_cpus, top_mem, fitted = 0.0, 0, False
                for name in counts[count]:
                    n = nodes[name]
                    if req is not None:
                        free_cpus, free_mem = n.facts.cpus - n.used_cpus, n.facts.mem - n.used_mem
                        top_cpus, top_mem = max(top_cpus, free_cpus), max(top_mem, free_mem)
                        if free_cpus + EPSILON < req.cpus or free_mem < req.mem:
                            continue
                        fitted = True
                    yield n
                if req is not None and not fitted and room is not None:
                    room[0], room[1] = top_cpus, top_mem


class Cluster:
    """Nodes, placements and what each node has reserved; every change goes through here."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.nodes: dict[str, NodeState] = {}
        self.placements: dict[str, Placement] = {}
        self.policy = policy or Policy()
        self.program: Program | None = None
        self.changed: set[str] = set()  # nodes changed since the program last looked
        self._index = _Index()  # every node
        self._largest: tuple[float, int] | None = None  # the most cpus and memory any node has (None: work it out)
        self._labelled: dict[tuple[str, str], _Index] = {}  # the nodes with each label, to decide among
        self._journal: list[Callable[[], object]] | None = None  # undo steps while a draft is open
        self.policy_kind = "rules"  # what the program is (lua, yaml, platform), for whoever counts decisions
        self._observe: Callable[[str, float], None] | None = None  # see observe_decisions
        self._timer: Callable[[], float] = lambda: 0.0
        # Nodes by (kind, status), kept as they change: a count that 10,000 nodes need not be walked for.
        self.counts: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ drafts
    @contextmanager
    def draft(self) -> Iterator[Cluster]:
        """Changes made inside are undone on leaving: a planner decides against the cluster
        (each decision seeing the ones before it) and the cluster is as it was afterwards.

        What the draft undoes is the state decisions depend on (assignments, reservations,
        statuses, cordons, placements); the order nodes are visited in may differ.
        """
        if self._journal is not None:  # within a draft: back to here on leaving
            point = self.savepoint()
            try:
                yield self
            finally:
                self.rollback_to(point)
            return
        self._journal = []
        try:
            yield self
        finally:
            journal, self._journal = self._journal, None
            for undo in reversed(journal):
                undo()

    @property
    def drafting(self) -> bool:
        return self._journal is not None

    def _undo(self, step: Callable[[], object]) -> None:
        """In a draft: ``step`` puts back what is about to change (others, the State, add theirs)."""
        if self._journal is not None:
            self._journal.append(step)

    remember = _undo

    def savepoint(self) -> int:
        """Where the open draft is now, to roll back to (``rollback_to``) without closing it."""
        if self._journal is None:
            raise RuntimeError("no draft is open")
        return len(self._journal)

    def rollback_to(self, point: int) -> None:
        """Undo what the open draft did since ``savepoint`` returned ``point``."""
        journal = self._journal
        if journal is None:
            raise RuntimeError("no draft is open")
        undo, journal[point:] = journal[point:], []
        self._journal = None
        try:
            for step in reversed(undo):
                step()
        finally:
            self._journal = journal

    # ------------------------------------------------------------ policy
    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._reindex()

    def set_program(self, program: Program | None) -> None:
        """Let ``program`` decide (None: the built-in policy again); it first sees every node."""
        self.program = program
        self.changed = set(self.nodes) if program is not None else set()

    def _changed(self, node: str) -> None:
        if self.program is not None:
            self.changed.add(node)

    def _affinities(self) -> list[Affinity]:
        return [r for r in self.policy.rules if isinstance(r, Affinity)]

    def _klass(self, facts: NodeFacts) -> int:
        """0 if the node matches the first affinity rule, 1 the second, ...; len(rules) if none."""
        rules = self._affinities()
        for i, rule in enumerate(rules):
            if all(c.holds(facts) for c in rule.conditions):
                return i
        return len(rules)

    def _reindex(self) -> None:
        self._index = _Index()
        self._labelled = {}
        for n in self.nodes.values():
            n.klass = self._klass(n.facts)
            self._insert(n)

    def _insert(self, n: NodeState) -> None:
        self._index.insert(n)
        for kv in n.facts.labels.items():
            self._labelled.setdefault(kv, _Index()).insert(n)

    def _unindex(self, n: NodeState) -> None:
        self._index.remove(n)
        for kv in n.facts.labels.items():
            ix = self._labelled.get(kv)
            if ix is not None:
                ix.remove(n)
                if not ix.size:
                    del self._labelled[kv]

    def _among(self, req: Request) -> _Index | None:
        """The smallest index holding every node the request's labels allow (None: no node has them)."""
        if not req.labels:
            return self._index
        best: _Index | None = None
        for kv in req.labels:
            ix = self._labelled.get(kv)
            if ix is None:
                return None
            if best is None or ix.size < best.size:
                best = ix
        return best

    # ------------------------------------------------------------ nodes
    def add_node(self, facts: NodeFacts, status: str = USABLE) -> NodeState:
        old = self.nodes.get(facts.name)
        if self._journal is not None:
            if old is None:
                self._undo(lambda: self.remove_node(facts.name))
            else:
                was_facts, was_status = old.facts, old.status
                self._undo(lambda: self.add_node(was_facts, was_status))
        self._largest = None
        if old is not None:
            self._unindex(old)
            self._count(old, -1)
            old.facts = facts
            old.status = status
            old.klass = self._klass(facts)
            self._insert(old)
            self._count(old, 1)
            self._changed(old.name)
            return old
        n = NodeState(facts, status, klass=self._klass(facts))
        self.nodes[facts.name] = n
        self._insert(n)
        self._count(n, 1)
        self._changed(n.name)
        return n

    def _count(self, n: NodeState, sign: int) -> None:
        key = (n.facts.kind, n.status)
        left = self.counts.get(key, 0) + sign
        if left:
            self.counts[key] = left
        else:
            self.counts.pop(key, None)

    def _tally(self, n: NodeState, sign: int) -> None:
        """Count a node's status in every index it is in (around a change of status or cordon)."""
        self._index.tally(n, sign)
        for kv in n.facts.labels.items():
            ix = self._labelled.get(kv)
            if ix is not None:
                ix.tally(n, sign)

    def set_status(self, name: str, status: str) -> None:
        n = self._node(name)
        was = n.status
        self._undo(lambda: self.set_status(name, was))
        self._tally(n, -1)
        self._count(n, -1)
        n.status = status
        self._tally(n, 1)
        self._count(n, 1)
        self._changed(name)

    def cordon(self, name: str, on: bool = True) -> None:
        n = self._node(name)
        was = n.cordoned
        self._undo(lambda: self.cordon(name, was))
        self._tally(n, -1)
        n.cordoned = on
        self._tally(n, 1)
        self._changed(name)

    def remove_node(self, name: str) -> list[str]:
        """Forget a node; returns the placements that were on it (now pending)."""
        if self._journal is not None:
            raise RuntimeError("remove_node cannot be undone: not in a draft")
        n = self._node(name)
        moved = list(n.containers)
        for p in moved:
            self.unassign(p, reason=f"node {name} removed")
        self._unindex(n)
        self._count(n, -1)
        del self.nodes[name]
        self._largest = None
        self._changed(name)
        return moved

    def _node(self, name: str) -> NodeState:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"unknown node {name!r}") from None

    # ------------------------------------------------------------ placements
    def add(self, name: str, request: Request) -> Placement:
        """Record a placement (pending until assigned)."""
        if name in self.placements:
            raise KeyError(f"container {name!r} exists")
        p = Placement(name, request, None, "not yet placed")
        self.placements[name] = p
        self._undo(lambda: self.forget(name))
        return p

    def set_reason(self, name: str, reason: str) -> None:
        p = self.placements[name]
        was = p.reason
        self._undo(lambda: setattr(p, "reason", was))
        p.reason = reason

    def assign(self, name: str, node: str, reason: str = "", force: bool = False) -> None:
        """Put a placement on a node, reserving its cpu and memory there.

        Refuses (ValueError) to overfill a node unless ``force`` (for what a
        node reports running that the scheduler must account for).
        """
        p = self.placements[name]
        n = self._node(node)
        if p.node == node:
            if reason:
                self.set_reason(name, reason)
            return
        if not force and not n.room_for(p.request):
            raise ValueError(f"{node} has no room for {name}")
        if p.node is not None:
            self.unassign(name)
        if self._journal is not None:
            was = p.reason
            self._undo(lambda: self.unassign(name, was))
        self._unindex(n)
        n.containers[name] = None
        n.used_cpus += p.request.cpus
        n.used_mem += p.request.mem
        self._insert(n)
        self._changed(node)
        p.node = node
        p.reason = reason

    def unassign(self, name: str, reason: str = "") -> None:
        """Take a placement off its node (it becomes pending)."""
        p = self.placements[name]
        if p.node is None:
            return
        if self._journal is not None:
            was_node, was_reason = p.node, p.reason
            self._undo(lambda: self.assign(name, was_node, was_reason, force=True))
        n = self.nodes.get(p.node)
        if n is not None:
            self._unindex(n)
            del n.containers[name]
            n.used_cpus = max(0.0, n.used_cpus - p.request.cpus)
            n.used_mem = max(0, n.used_mem - p.request.mem)
            self._insert(n)
            self._changed(n.name)
        p.node = None
        p.reason = reason

    def forget(self, name: str) -> None:
        self.unassign(name)
        p = self.placements.pop(name)
        self._undo(lambda: self.placements.__setitem__(name, p))

    def pending(self) -> list[Placement]:
        return [p for p in self.placements.values() if p.node is None]

    # ------------------------------------------------------------ deciding
    def _order(self, req: Request | None = None) -> Iterator[NodeState]:
        """Nodes in policy order (affinity class, then base order, then name); given a request,
        only those with its labels and the room it needs."""
        ix = self._among(req) if req is not None else self._index
        if ix is not None:
            yield from ix.order(self.nodes, self.policy.base == "pack", req)

    def feasible(self, n: NodeState, req: Request) -> bool:
        return n.usable and n.room_for(req) and req.allows(n.facts) and not (req.avoid and n.runs_any(req.avoid))

    def observe_decisions(self, observe: Callable[[str, float], None] | None, timer: Callable[[], float]) -> None:
        """Tell ``observe`` of every decision: the policy's kind (``policy_kind``, or rules when the
        built-in decides) and the seconds of ``timer`` it took."""
        self._observe, self._timer = observe, timer

    def decide(self, name: str, req: Request, exclude: Iterable[str] = ()) -> Decision:
        """Where ``name`` should run now, without changing anything."""
        observe = self._observe
        if observe is None:
            if self.program is not None:
                return self.program.decide(self, name, req, frozenset(exclude))
            return self.decide_builtin(name, req, exclude)
        began = self._timer()
        if self.program is not None:
            try:
                return self.program.decide(self, name, req, frozenset(exclude))
            finally:
                observe(self.policy_kind, self._timer() - began)
        try:
            return self.decide_builtin(name, req, exclude)
        finally:
            observe("rules", self._timer() - began)

    def decide_builtin(self, name: str, req: Request, exclude: Iterable[str] = ()) -> Decision:
        """The built-in policy's decision (spread or pack, refined by the rules)."""
        skip = set(exclude)
        spread_globs = tuple(r.glob for r in self.policy.rules
                             if isinstance(r, AntiAffinity) and fnmatchcase(name, r.glob))
        best: NodeState | None = None
        best_key: tuple[int, int] | None = None
        looked = 0
        for n in self._order(req):
            if n.name in skip or not self.feasible(n, req):
                continue
            looked += 1
            if not spread_globs:
                best = n
                break
            # Anti-affinity spreading: fewest matching containers first; the first
            # node (in policy order) with none cannot be beaten within its class.
            key = (n.klass, n.runs_any(spread_globs))
            if best_key is None or key < best_key:
                best, best_key = n, key
            if key[1] == 0:
                break
        if best is None:
            return Decision(name, None, self._why_not(req, skip), 0)
        why = "fewest" if self.policy.base == "spread" else "most"
        rule = f", affinity rule {best.klass + 1}" if best.klass < len(self._affinities()) else ""
        apart = f", {best.runs_any(spread_globs)} matching {'/'.join(spread_globs)}" if spread_globs else ""
        return Decision(name, best.name, f"{self.policy.base}: {best.name} ({len(best.containers)} containers, "
                        f"{why}{rule}{apart}); {looked} feasible examined of {len(self.nodes)} nodes", looked)

    def _why_not(self, req: Request, skip: set[str]) -> str:
        """A short account of why no node took the request.

        Nodes are counted under the first reason that applies: excluded, down,
        cordoned, filtered (names, labels), full, avoid (anti-affinity).  With
        labels in the request only the nodes that have them are looked at; the
        rest are counted from the cluster's tallies.
        """
        if not self.nodes:
            return "no nodes"
        need = req.constraints()
        if self._largest is None:
            self._largest = (max(n.facts.cpus for n in self.nodes.values()),
                             max(n.facts.mem for n in self.nodes.values()))
        if req.cpus > self._largest[0] + EPSILON or req.mem > self._largest[1]:
            # Too big for every node, whatever its liveness or cordon: it waits for a bigger node
            # (unschedulable), not for room, and says so the same way while nodes come and go.
            return (f"no node fits{' ' + need if need else ''}: {len(self.nodes)} too small "
                    f"(it asks for more than any node offers)")
        counts = {"down": 0, "cordoned": 0, "filtered": 0, "full": 0, "avoid": 0, "excluded": 0}

        def classify(n: NodeState) -> str:
            if n.name in skip:
                return "excluded"
            if n.status != USABLE:
                return "down"
            if n.cordoned:
                return "cordoned"
            if not req.allows(n.facts):
                return "filtered"
            if not n.room_for(req):
                return "full"
            return "avoid"

        ix = self._among(req)
        if simple(req) or (req.labels and ix is None):
            # Every node of the index (all, or those with the one label) is allowed and, none
            # having been chosen, lacks room; every other node is filtered out: all from the tallies.
            listed = [self.nodes[name] for name in skip if name in self.nodes]
            mine = [n for n in listed if ix is not None
                    and (not req.labels or n.facts.labels.get(req.labels[0][0]) == req.labels[0][1])]
            theirs = [n for n in listed if n not in mine]

            def tallied(nodes: list[NodeState]) -> tuple[int, int]:
                return (sum(1 for n in nodes if n.status != USABLE),
                        sum(1 for n in nodes if n.status == USABLE and n.cordoned))

            (md, mc), (td, tc) = tallied(mine), tallied(theirs)
            in_down, in_cordoned, size = (ix.down, ix.cordoned, ix.size) if ix is not None else (0, 0, 0)
            counts["excluded"] = len(listed)
            counts["down"] = self._index.down - md - td
            counts["cordoned"] = self._index.cordoned - mc - tc
            counts["full"] = size - len(mine) - (in_down - md) - (in_cordoned - mc)
            counts["filtered"] = len(self.nodes) - len(listed) - counts["down"] - counts["cordoned"] - counts["full"]
        elif req.labels and ix is not None:
            names = set(ix.names())
            for name in names:
                counts[classify(self.nodes[name])] += 1
            others = [self.nodes[name] for name in skip if name in self.nodes and name not in names]
            counts["excluded"] += len(others)
            down = self._index.down - sum(1 for name in names if self.nodes[name].status != USABLE) \
                - sum(1 for n in others if n.status != USABLE)
            cordoned = self._index.cordoned - sum(1 for name in names if self.nodes[name].status == USABLE
                                                  and self.nodes[name].cordoned) \
                - sum(1 for n in others if n.status == USABLE and n.cordoned)
            counts["down"] += down
            counts["cordoned"] += cordoned
            counts["filtered"] += len(self.nodes) - len(names) - len(others) - down - cordoned
        else:
            for n in self.nodes.values():
                counts[classify(n)] += 1
        parts = [f"{v} {k}" for k, v in counts.items() if v]
        return f"no node fits{' ' + need if need else ''}: " + ", ".join(parts)

    def place(self, name: str, req: Request) -> Decision:
        """Record and assign in one step (or leave pending with the reason)."""
        self.add(name, req)
        d = self.decide(name, req)
        if d.node is None:
            self.set_reason(name, d.reason)
        else:
            self.assign(name, d.node, d.reason)
        return d

    def simulate(self, names: Iterable[str], req: Request) -> list[Decision]:
        """What placing ``names`` would decide, one after the other, leaving the cluster as it was."""
        out: list[Decision] = []
        added: list[str] = []
        try:
            for name in names:
                self.add(name, req)
                added.append(name)
                d = self.decide(name, req)
                if d.node is not None:
                    self.assign(name, d.node, d.reason)
                out.append(d)
        finally:
            for name in added:
                self.forget(name)
        return out

    def _rebalance_program(self, max_moves: int, movable: Callable[[str], bool],
                           per_move: int = 50) -> list[tuple[str, str, str]]:
        """Rebalance under a program, whose preferences only its decisions show.

        A container moves when the program, placing it afresh (taken off its
        node), picks another node, and would pick that node again once it is
        there: a tie that would send it back on the next rebalance is no
        reason to move.  At most ``per_move`` containers are examined per
        move allowed (two decisions each), which bounds the time it takes.
        """
        moves: list[tuple[str, str, str]] = []
        examined = 0
        for name, p in list(self.placements.items()):
            if len(moves) >= max_moves or examined >= per_move * max_moves:
                break
            if p.node is None or not self.nodes[p.node].usable or not movable(name):
                continue
            examined += 1
            src, reason = p.node, p.reason
            self.unassign(name)
            d = self.decide(name, p.request)
            if d.node is not None and d.node != src:
                self.assign(name, d.node)
                self.unassign(name)
                again = self.decide(name, p.request)
                if again.node == d.node:
                    self.assign(name, d.node, f"rebalance from {src}")
                    moves.append((name, src, d.node))
                    continue
            self.assign(name, src, reason, force=True)
        return moves

    # ------------------------------------------------------------ plans
    def evacuate(self, node: str) -> list[Decision]:
        """Cordon ``node`` and move everything off it, one decision at a time.

        What finds no other home becomes pending (with the reason); the
        caller carries out the moves (stop here, start there).
        """
        self.cordon(node)
        out = []
        for name in list(self._node(node).containers):
            d = self.decide(name, self.placements[name].request, exclude=[node])
            if d.node is None:
                self.unassign(name, f"evacuated from {node}; {d.reason}")
            else:
                self.assign(name, d.node, f"evacuated from {node}")
            out.append(d)
        return out

    def retry_pending(self) -> list[Decision]:
        """Try every pending placement again, oldest first; assigns those that now fit."""
        out = []
        for p in self.pending():
            d = self.decide(p.name, p.request)
            if d.node is not None:
                self.assign(p.name, d.node, d.reason)
            else:
                self.set_reason(p.name, d.reason)
            out.append(d)
        return out

    def node_lost(self, node: str) -> list[str]:
        """A node went dead: its placements become pending (retry_pending re-places them)."""
        n = self._node(node)
        self.set_status(node, "dead")
        names = list(n.containers)
        for name in names:
            self.unassign(name, reason=f"node {node} died")
        return names

    def rebalance(self, max_moves: int, movable: Callable[[str], bool] = lambda name: True,
                  ) -> list[tuple[str, str, str]]:
        """Up to ``max_moves`` (container, from, to) moves toward what the policy prefers.

        A container moves when the policy, deciding afresh, would put it on
        another node and that node would end up no worse off than the one
        it leaves (so spread never oscillates); moves are applied here.
        Only containers ``movable`` allows are considered.
        """
        if self.program is not None:
            return self._rebalance_program(max_moves, movable)
        moves: list[tuple[str, str, str]] = []
        for name, p in list(self.placements.items()):
            if len(moves) >= max_moves:
                break
            if p.node is None or not movable(name):
                continue
            src = self.nodes[p.node]
            d = self.decide(name, p.request, exclude=[p.node])
            if d.node is None:
                continue
            dst = self.nodes[d.node]
            before = len(src.containers)
            after = len(dst.containers) + 1
            better = after < before if self.policy.base == "spread" else after > before
            if dst.klass < src.klass or (dst.klass == src.klass and better):
                self.assign(name, d.node, f"rebalance from {p.node}")
                moves.append((name, src.name, dst.name))
        return moves


def unschedulable(reason: str) -> bool:
    """Whether a reason of _why_not says no node could take the request as the cluster stands
    (every node too small for it or not matching its constraints), rather than none having room
    now (full, down, cordoned, kept off by anti-affinity): the one waits for the cluster to change,
    the other for room."""
    head, sep, parts = reason.partition(": ")
    if not sep or not head.startswith("no node fits"):
        return False
    kinds = {part.split(" ", 1)[1] if " " in part else part for part in parts.split(", ")}
    return bool(kinds) and kinds <= {"too small (it asks for more than any node offers)", "filtered"}

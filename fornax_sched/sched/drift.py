"""Drift: what a node runs compared with what the scheduler placed there, as Persys' scheduler defines it.

``plan_drift`` is a pure planner, one node at a time (as reconcile.plan_node),
over the state, the node's listing and the drift already known.  Four kinds,
for every kind of node:

- ``orphan_on_agent``: a container the node runs that this scheduler did not
  place (no cluster label of this store, no placement of that name on the
  node): reported, never stopped or destroyed (an operator's business);
- ``state_mismatch``: a placement meant to run whose container is there but
  stopped behind the scheduler's back (one that ended on its own is not
  drift: its status records it, its restart policy decides), or one meant
  stopped that runs; remedy: the status is aligned and the container
  started (or stopped) again, as reconciliation does;
- ``revision_mismatch``: the container of a placement runs another revision
  than the placement's spec (re-applied behind the scheduler's back);
  remedy: re-apply (the old one destroyed, the placement's spec run again);
- ``missing_on_agent``: a placement meant to run on the node whose container
  the node does not list, or lists as missing; remedy: retry once the grace
  window (the agent's own reconcile) has passed, which the backend and the
  reconciliation do: the drift stays listed until the container is back.

Each finding is a row ``meta/drift/NODE/NAME`` in the store (kind, detail,
since), logged when it is first seen and when it is resolved; the plan's
rows delete the ones no longer found.  Placements being acted on, or acted
on since the listing began, are left out of the comparison (the listing may
not show what was done).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .backends import CLUSTER_LABEL, REVISION_LABEL, ContainerInfo
from .plans import Plan, Stop
from .state import State, stamp

ORPHAN, STATE, REVISION, MISSING = "orphan_on_agent", "state_mismatch", "revision_mismatch", "missing_on_agent"
KINDS = (ORPHAN, STATE, REVISION, MISSING)
AGENT_REVISION = "persys.agent/revision"  # a Persys agent's own revision label (what it last applied)
PREFIX = "drift/"
KEEP_RESOLVED = 200  # resolved findings kept (store and file), newest first; the oldest go


@dataclass(frozen=True)
class Drift:
    kind: str
    node: str
    name: str
    detail: str
    since: float
    resolved: float | None = None  # when it was last found gone (kept listed a while: KEEP_RESOLVED)

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.node}/{self.name}"

    def row(self) -> dict[str, Any]:
        return {"kind": self.kind, "node": self.node, "name": self.name, "detail": self.detail, "since": self.since,
                "resolved": self.resolved}

    def line(self) -> str:
        end = f" resolved={stamp(self.resolved)}" if self.resolved is not None else ""
        return f"{self.kind} {self.node} {self.name} since={stamp(self.since)}{end} {self.detail}"


def revision_of(c: ContainerInfo) -> str:
    """The revision a node runs for a container: the agent's own record of it, else our label."""
    return c.labels.get(AGENT_REVISION) or c.labels.get(REVISION_LABEL, "")


def plan_drift(state: State, node: str, listing: list[ContainerInfo], *, cluster: str, now: float,
               listed_at: float, busy: frozenset[str] | set[str], acted: Mapping[str, float],
               known: Mapping[str, Drift], revision: Callable[[str], str]) -> tuple[Plan, list[Drift]]:
    """The drift on ``node`` (the plan recording it, remedying it; the findings)."""
    plan = Plan(now)
    found: list[Drift] = []

    def fresh(name: str) -> bool:
        return name not in busy and acted.get(name, -1.0) < listed_at

    def add(kind: str, name: str, detail: str) -> None:
        old = known.get(f"{PREFIX}{node}/{name}")
        since = old.since if old is not None and old.kind == kind and old.resolved is None else now
        found.append(Drift(kind, node, name, detail, since))

    placed = state.cluster.nodes[node].containers if node in state.cluster.nodes else {}
    by_name: dict[str, list[ContainerInfo]] = {}
    for c in listing:
        by_name.setdefault(c.name, []).append(c)
    for name, copies in sorted(by_name.items()):
        ours = any(c.labels.get(CLUSTER_LABEL) == cluster for c in copies)
        if name not in placed:
            if not ours and name not in state.records:
                add(ORPHAN, name, f"{copies[0].image or '-'} {copies[0].state}: not placed by this scheduler; "
                                  f"left alone")
            continue
        if not fresh(name):
            continue
        r = state.records[name]
        want = revision(name)
        live = [c for c in copies if c.alive]
        c = live[0] if live else copies[0]
        have = revision_of(c)
        if c.reason.startswith("missing on the agent"):
            add(MISSING, name, c.reason)
        elif want and have and have != want and c.state != "created":
            add(REVISION, name, f"runs revision {have}, placed {want}: re-applying")
            plan.stops.append(Stop(node, name, c.id, destroy=True))
            if r.want == "run":
                plan.edit(state, name, status="starting", cid="", detail=f"re-applied: it ran revision {have}")
                plan.starts.append(name)
        elif r.want == "run" and not live and c.state == "stopped":  # (one that ended on its own is recorded so)
            add(STATE, name, f"{c.state}, placed to run: starting it again")
        elif r.want == "stop" and live:
            add(STATE, name, f"{c.state}, placed stopped: stopping it")
    for name in placed:
        rec = state.records.get(name)
        if rec is None or name in by_name or not fresh(name) or rec.want != "run":
            continue
        if rec.status == "running" or (rec.status == "starting" and rec.cid):
            add(MISSING, name, f"not listed by {node} (was {rec.status}): placed again after the grace window")
    now_keys = {d.key: d for d in found}
    for key, d in now_keys.items():
        old = known.get(key)
        if old is None or old.kind != d.kind or old.resolved is not None:
            plan.note(f"drift {d.kind} on {node}: {d.name}: {d.detail}")
        if old is None or old.row() != d.row():
            plan.put("meta", key, d.row())
    prefix = f"{PREFIX}{node}/"
    for key, d in known.items():
        if key.startswith(prefix) and key not in now_keys and d.resolved is None and (
                fresh(d.name) or d.kind == ORPHAN):
            plan.put("meta", key, {**d.row(), "resolved": now})
            plan.note(f"drift {d.kind} on {node}: {d.name}: resolved")
    resolved = sorted((d.resolved or 0.0, k) for k, d in known.items() if d.resolved is not None and k not in now_keys)
    for _, key in resolved[:max(len(resolved) - KEEP_RESOLVED, 0)]:
        plan.delete("meta", key)
    return plan, found


class DriftBook:
    """The drift the scheduler knows (what /cluster/scheduler/drift lists)."""

    def __init__(self) -> None:
        self.entries: dict[str, Drift] = {}
        self.passes = 0
        self.last: float | None = None

    def load(self, rows: Mapping[str, Any]) -> None:
        for key, v in rows.items():
            if key.startswith(PREFIX) and isinstance(v, dict) and v.get("kind") in KINDS:
                res = v.get("resolved")
                self.entries[key] = Drift(str(v["kind"]), str(v["node"]), str(v["name"]), str(v.get("detail", "")),
                                          float(v.get("since", 0.0)), float(res) if res is not None else None)

    def apply(self, plan: Plan) -> None:
        for (table, key), row in plan.changes.items():
            if table == "meta" and key.startswith(PREFIX):
                if row is None:
                    self.entries.pop(key, None)
                else:
                    self.load({key: row})

    def text(self) -> str:
        """The open findings by node and name, then the resolved ones, newest first."""
        open_ = sorted((d for d in self.entries.values() if d.resolved is None), key=lambda d: (d.node, d.name))
        done = sorted((d for d in self.entries.values() if d.resolved is not None), key=lambda d: -(d.resolved or 0))
        head = (f"drift {len(open_)} resolved {len(done)} passes {self.passes}"
                + (f" last {stamp(self.last)}" if self.last is not None else "") + "\n")
        return head + "".join(d.line() + "\n" for d in open_ + done)

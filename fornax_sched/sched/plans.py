"""Plans: what a command or a reconciliation step will change, computed before anything changes.

A planner is a function of the state, the command and ``now``; it returns a
``Plan``: the rows to write (each a whole row, so applying one twice does
no harm), the log lines, and what to do to nodes once the rows are
durable.  The service commits the rows in one batch, applies them to
memory, and only then acts.  A planner that decides where containers go
runs on the decider's copy of the state, inside a draft of its cluster
(``Cluster.draft``): each decision sees the ones before it, and the draft
is undone before the plan is committed.  No planner does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..units import format_size
from . import lang
from .core import Decision, NodeState, unschedulable
from .model import Request
from .state import ENDED, WAITING, State, request_to_json

BUSY_STATUSES = ("starting", "stopping", "removing")


class CommandError(Exception):
    """A command that cannot be carried out; the message is what its writer reads."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop (and with ``destroy`` forget) one container on a node, once the plan is durable."""

    node: str
    name: str
    cid: str
    destroy: bool


def waiting(reason: str) -> str:
    """The status of what no node took: ``unschedulable`` if none could as the cluster stands
    (too small for every node, or matching none), else ``pending`` (none has room now)."""
    return "unschedulable" if unschedulable(reason) else "pending"


@dataclass
class Plan:
    now: float
    changes: dict[tuple[str, str], Any] = field(default_factory=dict)  # (table, key) -> row (None: delete)
    log: list[str] = field(default_factory=list)
    starts: list[str] = field(default_factory=list)  # placements to start, once durable
    stops: list[Stop] = field(default_factory=list)  # containers to stop, before the starts
    report: list[str] = field(default_factory=list)  # placements whose status the answer reports, after acting
    answer: str = ""
    statuses: list[tuple[str, str]] = field(default_factory=list)  # (node, liveness): observed, not stored
    foreign: dict[str, set[str]] = field(default_factory=dict)  # node -> names it runs we did not place
    kick: bool = False  # capacity may have appeared: try the pending placements again
    # New placements to start (name -> node, request): may be started while the plan commits,
    # since a container of ours with no record is stopped by reconciliation (see service._start_early)
    placing: dict[str, tuple[str, Request]] = field(default_factory=dict)

    # ------------------------------------------------------------ building
    def put(self, table: str, key: str, value: Any) -> None:
        self.changes[(table, key)] = value

    def delete(self, table: str, key: str) -> None:
        self.changes[(table, key)] = None

    def note(self, line: str) -> None:
        self.log.append(line)

    def row(self, state: State, name: str) -> dict[str, Any] | None:
        """The placement's row as this plan leaves it so far (None: deleted by it)."""
        key = ("placements", name)
        if key in self.changes:
            return self.changes[key]
        return state.placement_row(name) if name in state.records else None

    def edit(self, state: State, name: str, **fields: Any) -> None:
        """Change fields of a placement's row; a new status starts a new ``since``."""
        base = self.row(state, name)
        assert base is not None, name
        new = {**base, **fields}
        if new["status"] != base["status"]:
            new["since"] = self.now
        self.changes[("placements", name)] = new

    def create(self, name: str, req: Request, group: str, d: Decision) -> None:
        self.changes[("placements", name)] = {
            "request": request_to_json(req), "node": d.node, "reason": d.reason if d.node else "", "group": group,
            "want": "run", "status": "starting" if d.node else waiting(d.reason), "cid": "", "since": self.now,
            "detail": "" if d.node else d.reason, "created": self.now, "restarts": 0, "restarted": 0.0}
        if d.node:
            self.starts.append(name)
            self.placing[name] = (d.node, req)

    # ------------------------------------------------------------ reading
    @property
    def durable(self) -> bool:
        return bool(self.changes or self.log)

    def rows(self) -> list[tuple[str, str, Any]]:
        return [(t, k, v) for (t, k), v in self.changes.items()]

    def __bool__(self) -> bool:
        return bool(self.changes or self.log or self.starts or self.stops or self.statuses or self.foreign)

    def extend(self, other: Plan) -> None:
        self.changes.update(other.changes)
        self.log += other.log
        self.starts += other.starts
        self.stops += other.stops
        self.statuses += other.statuses
        self.foreign.update(other.foreign)
        self.placing.update(other.placing)
        self.kick = self.kick or other.kick


# ---------------------------------------------------------------- checks


def check_request(state: State, req: Request, marked: tuple[str, ...] = ()) -> None:
    """Refuse what cannot be meant: an image no node has, a label no node carries (a typo such as
    ``nam=x``), unless the label is marked ``label:KEY=VALUE`` (wait for a node that has it)."""
    if not state.cluster.nodes:
        return
    images = state.images()
    if images is not None and req.image not in images:
        have = ", ".join(sorted(images)) or "none"
        raise CommandError(f"unknown image {req.image!r}: no node has it (images: {have})")
    known = state.label_keys()
    for k, v in req.labels:
        if k not in known and k not in marked:
            labels = ", ".join(sorted(known)) or "none"
            raise CommandError(f"unknown constraint {k + '=' + v!r}: no node has a label {k!r} (labels: {labels}); "
                               f"write label:{k}={v} to wait for a node that has it")


def next_names(state: State, req: Request, count: int) -> tuple[str, list[str], int | None]:
    """The group, the names for ``count`` new replicas, and the stem's next number (None: not numbered).

    A name is never one already placed nor one a node runs that the
    scheduler did not place.
    """
    if req.name and req.replicas == 1 and count == 1:
        if req.name in state.records:
            raise CommandError(f"container {req.name!r} exists")
        if state.name_taken(req.name):
            raise CommandError(f"a container named {req.name!r} runs on a node and was not placed by this "
                               "scheduler: choose another name")
        return req.name, [req.name], None
    stem = req.name or req.image
    n = state.seq.get(stem, 1)
    names: list[str] = []
    while len(names) < count:
        candidate = f"{stem}-{n}"
        n += 1
        if not state.name_taken(candidate):
            names.append(candidate)
    return (req.name or names[0] if count == 1 else stem), names, n


def placement(state: State, name: str) -> tuple[Any, Any]:
    p = state.cluster.placements.get(name)
    if p is None:
        raise CommandError(f"no container {name!r}")
    return p, state.records[name]


def targets(state: State, word: str) -> list[str]:
    """The placements a command names: one container, or every replica of a group (``place ... name=web``
    makes the group ``web``; ``start web``, ``stop web``, ``remove web`` act on all of it)."""
    if word in state.cluster.placements:
        return [word]
    members = state.members(word)
    if members:
        return members
    raise CommandError(f"no container or group {word!r} (ls /cluster/scheduler/placements lists them)")


def plan_each(state: State, word: str, now: float, one: Callable[[str], Plan]) -> Plan:
    """One plan of ``one`` for each placement ``word`` names (see ``targets``)."""
    names = targets(state, word)
    if names == [word]:
        return one(word)
    plan = Plan(now)
    for name in names:
        sub = one(name)
        plan.extend(sub)
        plan.answer += sub.answer
        plan.report += sub.report
    return plan


def node_of(state: State, name: str) -> NodeState:
    n = state.cluster.nodes.get(name)
    if n is None:
        raise CommandError(f"no node {name!r}")
    return n


def decided_line(d: Decision, what: str, policy: str) -> str:
    if d.node is None:
        return f"{what}: pending: {d.reason} (policy {policy})"
    return f"{what}: -> {d.node}: {d.reason} (policy {policy})"


def fit_report(n: NodeState, req: Request) -> str:
    if not req.allows(n.facts):
        return f"constraints {req.constraints()} exclude it"
    if req.avoid and n.runs_any(req.avoid):
        return f"it runs a container matching {' '.join(req.avoid)}"
    free_cpu = n.facts.cpus - n.used_cpus
    free_mem = n.facts.mem - n.used_mem
    return f"free cpu {free_cpu:g}, mem {format_size(max(free_mem, 0))}"


# ---------------------------------------------------------------- commands that decide (decider's thread)


def plan_place(state: State, req: Request, count: int, now: float, policy: str, group: str = "",
               marked: tuple[str, ...] = ()) -> Plan:
    check_request(state, req, marked)
    first, names, seq = next_names(state, req, count)
    plan = Plan(now)
    if seq is not None:
        plan.put("meta", f"seq/{req.name or req.image}", seq)
    group = group or first
    for name in names:
        d = state.cluster.place(name, req)
        plan.create(name, req, group, d)
        plan.note(decided_line(d, f"place {name} ({lang.format_place(req)})", policy))
    plan.report = names
    return plan


def plan_scale(state: State, group: str, want: int, now: float, policy: str) -> Plan:
    members = state.members(group)
    if not members:
        raise CommandError(f"no group {group!r}: a group is the name= of a place (place IMAGE name={group} "
                           f"replicas=N), or the name of a container placed alone")
    if want <= len(members):
        drop = members[want:]
        plan = Plan(now)
        for name in drop:
            plan_remove_into(plan, state, name)
        plan.answer = f"{group} scaled to {want}: removed {' '.join(drop) or 'nothing'}\n"
        return plan
    template = state.cluster.placements[members[0]].request
    req = Request(**{**template.__dict__, "name": group, "replicas": want})
    return plan_place(state, req, want - len(members), now, policy, group, marked=tuple(k for k, _ in req.labels))


def plan_start(state: State, name: str, now: float, policy: str) -> Plan:
    p, r = placement(state, name)
    plan = Plan(now)
    if r.want == "run" and r.status in ("running", "starting"):
        plan.answer = f"{name} already {r.status}\n"
        return plan
    if r.want == "remove":
        raise CommandError(f"{name} is being removed")
    old_node, old_cid = p.node, r.cid
    c = state.cluster
    if p.node is None or not c.nodes[p.node].usable:
        c.unassign(name)
        d = c.decide(name, p.request)
        if d.node is not None:
            c.assign(name, d.node, d.reason)
        plan.note(decided_line(d, f"start {name}", policy))
        plan.edit(state, name, node=d.node, reason=d.reason if d.node else "", want="run",
                  status="starting" if d.node else waiting(d.reason), cid="", detail="" if d.node else d.reason)
        node = d.node
    else:
        plan.edit(state, name, want="run", status="starting", cid="", detail="")
        plan.note(f"start {name} on {p.node}")
        node = p.node
    if old_node and old_cid:  # the stopped instance goes before the new one starts
        plan.stops.append(Stop(old_node, name, old_cid, destroy=True))
    if node:
        plan.starts.append(name)
    plan.report = [name]
    return plan


def plan_evacuate(state: State, node: str, now: float, policy: str) -> Plan:
    n = node_of(state, node)
    c = state.cluster
    plan = Plan(now)
    names = list(n.containers)
    c.cordon(node)
    row = state.node_row(node)
    row["cordoned"] = True
    plan.put("nodes", node, row)
    plan.note(f"evacuate {node}: cordoned; {len(names)} containers to move")
    moved, pending = [], []
    for name in names:
        p, r = c.placements[name], state.records[name]
        old_cid = r.cid
        if r.want != "run" or r.status in ENDED:  # not running: it needs no new home, only to leave
            c.unassign(name, f"evacuated from {node}")
            plan.edit(state, name, node=None, reason=f"evacuated from {node}", cid="")
        else:
            d = c.decide(name, p.request, exclude=[node])
            plan.note(decided_line(d, f"evacuate {name}", policy))
            if d.node is None:
                c.unassign(name, f"evacuated from {node}; {d.reason}")
                plan.edit(state, name, node=None, reason="", status=waiting(d.reason), cid="", detail=d.reason)
                pending.append(name)
            else:
                c.assign(name, d.node, f"evacuated from {node}")
                plan.edit(state, name, node=d.node, reason=f"evacuated from {node}", status="starting", cid="",
                          detail="")
                plan.starts.append(name)
                moved.append(name)
        if old_cid:
            plan.stops.append(Stop(node, name, old_cid, destroy=True))
    plan.answer = (f"evacuated {node}: {len(moved)} moved, {len(pending)} pending\n"
                   + "".join(f"{m} -> {c.placements[m].node}\n" for m in moved)
                   + "".join(f"{m} pending: {plan.changes[('placements', m)]['detail']}\n" for m in pending))
    return plan


def plan_rebalance(state: State, limit: int, now: float, policy: str, busy: frozenset[str]) -> Plan:
    def movable(name: str) -> bool:
        r = state.records[name]
        return r.want == "run" and r.status == "running" and name not in busy

    plan = Plan(now)
    moves = state.cluster.rebalance(limit, movable)
    for name, src, dst in moves:
        plan.note(f"rebalance {name}: {src} -> {dst} (policy {policy})")
        old_cid = state.records[name].cid
        plan.edit(state, name, node=dst, reason=f"rebalance from {src}", status="starting", cid="", detail="")
        if old_cid:
            plan.stops.append(Stop(src, name, old_cid, destroy=True))
        plan.starts.append(name)
    plan.answer = f"rebalanced: {len(moves)} moved\n" + "".join(f"{n} {s} -> {d}\n" for n, s, d in moves)
    return plan


def plan_simulate(state: State, req: Request, now: float, policy: str, marked: tuple[str, ...] = ()) -> str:
    check_request(state, req, marked)
    _, names, _ = next_names(state, req, req.replicas)
    decisions = state.cluster.simulate(names, req)
    head = f"simulate {lang.format_place(req)} (policy {policy}): nothing changed\n"
    return head + "".join(d.line() + "\n" for d in decisions)


def plan_pending(state: State, now: float, policy: str, budget_left: Callable[[], bool]) -> Plan:
    """Place what waits, oldest first, while capacity allows and the budget lasts."""
    plan = Plan(now)
    c = state.cluster
    for name in list(state.pending):
        if not budget_left():
            break
        p, r = c.placements.get(name), state.records.get(name)
        if p is None or r is None or r.want != "run" or p.node is not None:
            continue
        d = c.decide(name, p.request)
        if d.node is None:
            status = r.status if r.status == "lost" else waiting(d.reason)  # lost stays lost until placed
            # (and keeps saying with which node: the why is refreshed, the what stays)
            lost = r.detail.partition("; ")[0] + "; " if status == "lost" and r.detail.startswith("lost with ") else ""
            detail = lost + d.reason
            if r.detail != detail or r.status != status:
                plan.edit(state, name, detail=detail, status=status)
            continue
        c.assign(name, d.node, d.reason)
        plan.note(decided_line(d, f"place pending {name}", policy))
        plan.edit(state, name, node=d.node, reason=d.reason, status="starting", cid="", detail="")
        plan.starts.append(name)
    return plan


def plan_node_dead(state: State, node: str, why: str, now: float, policy: str) -> Plan:
    """Everything of a dead node that should run is decided again, elsewhere."""
    c = state.cluster
    plan = Plan(now)
    if node not in c.nodes:
        return plan
    lost = list(c.nodes[node].containers)
    c.set_status(node, "dead")
    plan.statuses.append((node, "dead"))
    plan.note(f"node {node} dead ({why}): {len(lost)} containers to place again")
    for name in lost:
        r = state.records[name]
        c.unassign(name, f"node {node} died")
        if r.want == "remove":
            plan.delete("placements", name)
            plan.note(f"removed {name} (its node {node} died)")
            continue
        if r.want == "stop" or r.status in ENDED:  # it had ended: it stays ended, nowhere
            plan.edit(state, name, node=None, reason="", cid="",
                      status="stopped" if r.want == "stop" else r.status, detail=f"was on {node}, which died")
            continue
        d = c.decide(name, c.placements[name].request)
        plan.note(decided_line(d, f"re-place {name}", policy))
        if d.node is not None:
            c.assign(name, d.node, f"{node} died; {d.reason}")
            plan.edit(state, name, node=d.node, reason=f"{node} died; {d.reason}", status="starting", cid="",
                      detail="")
            plan.starts.append(name)
        else:
            plan.edit(state, name, node=None, reason="", status="lost", cid="", detail=f"lost with {node}; {d.reason}")
    return plan


# ---------------------------------------------------------------- commands that do not decide (event loop)


def plan_stop(state: State, name: str, now: float, user: str) -> Plan:
    p, r = placement(state, name)
    plan = Plan(now)
    if r.want == "remove":
        raise CommandError(f"{name} is being removed")
    if r.status in ENDED or r.status in WAITING:
        plan.edit(state, name, want="stop", status="stopped" if r.status in WAITING else r.status)
        plan.answer = f"{name} already {r.status}\n" if r.status not in WAITING else ""
        plan.note(f"stop {name} (by {user}): it was {r.status}")
        plan.report = [] if plan.answer else [name]
        return plan
    if r.want == "stop":
        plan.answer = f"{name} already {r.status}\n"
        return plan
    plan.edit(state, name, want="stop", status="stopping")
    plan.note(f"stop {name} on {p.node or '-'} (by {user})")
    if p.node and r.cid:
        plan.stops.append(Stop(p.node, name, r.cid, destroy=False))
    plan.report = [name]
    return plan


def plan_remove_into(plan: Plan, state: State, name: str) -> None:
    p, r = placement(state, name)
    if p.node is None or (not r.cid and r.status not in BUSY_STATUSES):
        plan.delete("placements", name)
        plan.note(f"removed {name}")
        plan.kick = True
        return
    plan.edit(state, name, want="remove", status="removing")
    plan.note(f"remove {name} from {p.node}")
    if r.cid:
        plan.stops.append(Stop(p.node, name, r.cid, destroy=True))


def plan_remove(state: State, name: str, now: float) -> Plan:
    plan = Plan(now)
    plan_remove_into(plan, state, name)
    plan.answer = f"removed {name}\n"
    return plan


def plan_migrate(state: State, name: str, src: str, dst: str, now: float) -> Plan:
    p, r = placement(state, name)
    c = state.cluster
    for node in (src, dst):
        node_of(state, node)
    if p.node != src:
        raise CommandError(f"{name} is on {p.node or 'no node (pending)'}, not {src}")
    if src == dst:
        raise CommandError(f"{name} is already on {dst}")
    n = c.nodes[dst]
    if not n.usable:
        raise CommandError(f"{dst} is {'cordoned' if n.cordoned else n.status}")
    if not c.feasible(n, p.request):
        raise CommandError(f"{name} does not fit on {dst} ({fit_report(n, p.request)})")
    plan = Plan(now)
    running = r.want == "run" and r.status not in ENDED
    plan.edit(state, name, node=dst, reason=f"migrated from {src}", cid="",
              status="starting" if running else r.status)
    plan.note(f"migrate {name}: {src} -> {dst}")
    if r.cid:
        plan.stops.append(Stop(src, name, r.cid, destroy=True))
    if running:
        plan.starts.append(name)
    plan.report = [name]
    return plan


def plan_cordon(state: State, node: str, on: bool, now: float) -> Plan:
    node_of(state, node)
    plan = Plan(now)
    row = state.node_row(node)
    row["cordoned"] = on
    plan.put("nodes", node, row)
    plan.note(f"{'cordon' if on else 'uncordon'} {node}")
    plan.kick = not on
    plan.answer = f"{node} {'cordoned' if on else 'uncordoned'}\n"
    return plan


def plan_forget(state: State, node: str, now: float, user: str = "-", replicated: bool = False,
                why: str = "") -> Plan:
    """A dead node dropped from the state (``forget NODE``): not followed, listed or dialled again.
    A dead node holds no placements (plan_node_dead took them all off it).  One that answers again
    later is found afresh (a seed, a join, a peer's word), as a new node."""
    n = node_of(state, node)
    if n.status != "dead":
        raise CommandError(f"forget {node}: it is {n.status}; a node is forgotten once it is dead (to take it "
                           f"out of use first: cordon {node}, evacuate {node}, then stop its daemon)")
    plan = Plan(now)
    plan.delete("nodes", node)
    if replicated:
        plan.delete("meta", f"liveness/{node}")
    meta = state.nodes.get(node)
    at = f"at {meta.addr}, " if meta is not None and meta.addr else ""
    plan.note(f"forget {node} ({at}by {user}): no longer followed" + (f"; {why}" if why else ""))
    plan.answer = f"{node} forgotten\n"
    return plan


# ---------------------------------------------------------------- what acting showed (event loop)


def plan_started(state: State, name: str, node: str, cid: str, now: float) -> Plan:
    """A start succeeded: running, unless the placement changed meanwhile (then that copy goes)."""
    plan = Plan(now)
    p, r = state.cluster.placements.get(name), state.records.get(name)
    if p is None or r is None or p.node != node:
        plan.note(f"started {name} on {node} as container {cid}, but it is "
                  + ("no longer placed" if p is None else f"now meant for {p.node or 'no node'}") + ": stopping it")
        plan.stops.append(Stop(node, name, cid, destroy=True))
        return plan
    if r.want != "run":  # stopped or removed while it started
        plan.edit(state, name, cid=cid)
        plan.stops.append(Stop(node, name, cid, destroy=r.want == "remove"))
        return plan
    plan.edit(state, name, status="running", cid=cid, detail="")
    plan.note(f"started {name} on {node} as container {cid}")
    return plan


def plan_refused(state: State, name: str, node: str, error: str, now: float) -> Plan:
    """A node refused to start it (its words say why): failed, with the words, for the user to see."""
    plan = Plan(now)
    p, r = state.cluster.placements.get(name), state.records.get(name)
    plan.note(f"start {name} on {node}: refused: {error}")
    if p is not None and r is not None and p.node == node and r.want == "run":
        plan.edit(state, name, status="failed", cid="", detail=f"refused by {node}: {error}")
    return plan


def plan_unreachable(state: State, name: str, node: str, error: str, now: float) -> Plan:
    """The node could not be reached: it stays starting (the node's reconciler, or its death, finishes it)."""
    plan = Plan(now)
    plan.note(f"start {name} on {node}: {error}; will retry")
    p, r = state.cluster.placements.get(name), state.records.get(name)
    if p is not None and r is not None and p.node == node and r.status == "starting":
        plan.edit(state, name, detail=f"node unreachable: {error}")
    return plan


def plan_stopped(state: State, s: Stop, error: str, now: float) -> Plan:
    """A stop (and destroy) finished, or failed with ``error``."""
    plan = Plan(now)
    p, r = state.cluster.placements.get(s.name), state.records.get(s.name)
    if error:
        plan.note(f"stop {s.name} on {s.node}: {error}; the reconciler tries again when the node answers")
        return plan
    if p is None or r is None or p.node not in (s.node, None):
        return plan
    if r.want == "remove" and s.destroy:
        plan.delete("placements", s.name)
        plan.note(f"removed {s.name}")
        plan.kick = True
    elif r.want == "stop" and r.status == "stopping":
        plan.edit(state, s.name, status="stopped", detail="stopped by the user")
        plan.note(f"stopped {s.name}")
    return plan


def plan_unplace(state: State, names: list[str], why: str, now: float) -> Plan:
    """A place the nodes refused for every replica keeps nothing: its rows go."""
    plan = Plan(now)
    for name in names:
        if name in state.records:
            plan.delete("placements", name)
    plan.note(f"place refused by the nodes, nothing kept: {why}")
    return plan


def plan_node_info(state: State, name: str, row: dict[str, Any], now: float) -> Plan:
    """What a node says of itself, recorded if it changed (its cordon is the scheduler's)."""
    plan = Plan(now)
    known = state.cluster.nodes.get(name)
    row = {**row, "cordoned": known.cordoned if known is not None else False}
    if known is not None and name in state.nodes and state.node_row(name) == row:
        return plan
    plan.put("nodes", name, row)
    if known is None:
        labels = ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items()))
        plan.note(f"node {name} ({row['kind']}) at {row['addr']}: cpus {row['cpus']:g}, mem {format_size(row['mem'])}"
                  + (f", labels {labels}" if labels else ""))
    plan.kick = True
    return plan

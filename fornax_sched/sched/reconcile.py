"""What a node's listing means: a pure planner, one node at a time.

Given the state, what one node says it runs (listed starting at
``listed_at``) and the names some command is acting on, ``plan_node``
returns the plan that moves what the node runs toward what should run
there.  The rules, in the manner of a Kubernetes controller (safe to
repeat, so a lost round costs nothing):

- A container is *ours* when it carries this store's cluster label (or,
  for one started before labels, when it is the recorded instance of a
  placement on this node).  Anything else is foreign: never stopped,
  destroyed or counted, only logged once, and its name is never given.
- Ours and meant for this node, with the intent ``run``: running becomes
  the status; a second live copy of the name is stopped; ended on its own
  (exited, failed) is recorded as such; stopped by someone other than the
  scheduler (the node shut down, a hand-written ``stop``) or gone entirely
  (the node lost its state) is started again: the intent is the user's.
- Ours with the intent ``stop`` or ``remove``: stopped (and destroyed), then
  recorded stopped, or the row deleted.
- Ours but meant for another node, or for no placement at all (removed,
  a scale down racing a start): stopped and destroyed.
- A placement being acted on by a command, or acted on since the listing
  began, is left alone this round: the listing may not show what was done.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from .backends import CLUSTER_LABEL, ContainerInfo
from .plans import Plan, Stop
from .state import WAITING, State


def ours(c: ContainerInfo, cluster: str, state: State, node: str) -> bool:
    """Whether the scheduler with this store (``cluster``) placed this container."""
    mark = c.labels.get(CLUSTER_LABEL)
    if mark is not None:
        return mark == cluster
    r = state.records.get(c.name)  # started before containers were labelled: the recorded instance only
    p = state.cluster.placements.get(c.name)
    return r is not None and p is not None and p.node == node and bool(r.cid) and r.cid == c.id


RESTART_BASE = 1.0  # seconds before the first restart; doubled for each further one
RESTART_CAP = 30.0  # the longest wait between restarts
RESTARTS_PER_NODE = 3  # restarts on one node in a row before it is placed on another
RESTART_RESET = 60.0  # a container that ran this long since its last restart starts counting afresh


def ended_as(node_state: str) -> str:
    """A placement's status for how its container ended on the node (the node's ``exited`` is exit 0)."""
    return "succeeded" if node_state == "exited" else node_state


def restart_wanted(policy: str, ended: str) -> bool:
    """Whether a container that ended (``succeeded``: exit code 0, ``failed``: anything else) runs again."""
    return policy == "always" or (policy == "on-failure" and ended == "failed")


def backoff(restarts: int) -> float:
    return min(RESTART_BASE * 2 ** restarts, RESTART_CAP)


def _restart(plan: Plan, state: State, name: str, node: str, now: float) -> None:
    """Run an ended container again: on its node, or, after RESTARTS_PER_NODE restarts there in a row
    (a crash loop), wherever else the policy puts it (on its node still if no other fits)."""
    r, c = state.records[name], state.cluster
    p = c.placements[name]
    why = r.detail.split("; ", 1)[0] or r.status
    if r.restarts >= RESTARTS_PER_NODE:
        reason = p.reason
        c.unassign(name)
        d = c.decide(name, p.request, exclude=(node,))
        if d.node is not None:
            c.assign(name, d.node, d.reason)
            plan.note(f"{name}: crash loop on {node} ({r.restarts} restarts, last: {why}): "
                      f"placing it on {d.node}: {d.reason}")
            plan.edit(state, name, node=d.node, reason=d.reason, status="starting", cid="", restarts=0,
                      restarted=now, detail=f"moved from {node} after {r.restarts} restarts ({why})")
            plan.starts.append(name)
            return
        c.assign(name, node, reason, force=True)
        plan.note(f"{name}: crash loop on {node} ({r.restarts} restarts); no other node fits ({d.reason}): "
                  f"restarting it there")
    plan.note(f"{name}: restart {r.restarts + 1} on {node} (restart={p.request.restart}; it ended: {why})")
    plan.edit(state, name, status="starting", cid="", restarts=r.restarts + 1, restarted=now,
              detail=f"restart {r.restarts + 1} after {why}")
    plan.starts.append(name)


def _newest(items: list[ContainerInfo]) -> ContainerInfo:
    return max(items, key=lambda i: (len(i.id), i.id))


def plan_node(state: State, node: str, listing: Sequence[ContainerInfo], *, cluster: str, now: float,
              listed_at: float, busy: frozenset[str] | set[str], acted: Mapping[str, float]) -> Plan:
    plan = Plan(now)

    def fresh(name: str) -> bool:
        return name not in busy and acted.get(name, -1.0) < listed_at

    mine: dict[str, list[ContainerInfo]] = {}
    foreign: set[str] = set()
    for c in listing:
        if ours(c, cluster, state, node):
            mine.setdefault(c.name, []).append(c)
        else:
            foreign.add(c.name)
    new_foreign = foreign - state.foreign.get(node, set())
    for name in sorted(new_foreign):
        plan.note(f"{name} on {node} was not placed by this scheduler; left alone")
    if foreign != state.foreign.get(node, set()):
        plan.foreign[node] = foreign

    placed_here = state.cluster.nodes[node].containers if node in state.cluster.nodes else {}
    # Our containers with no business here.
    for name, copies in mine.items():
        if name in placed_here or not fresh(name):
            continue
        p = state.cluster.placements.get(name)
        for c in copies:
            if c.alive:
                where = f"placed on {p.node or 'no node'}" if p is not None else "no longer placed"
                plan.note(f"{name} also runs on {node} ({where}): stopping it there")
            plan.stops.append(Stop(node, name, c.id, destroy=True))
    # What should be here.
    for name in list(placed_here):  # (a crash loop's move takes a name off this node)
        if not fresh(name):
            continue
        r = state.records[name]
        copies = mine.get(name, [])
        alive = [c for c in copies if c.alive]
        ended = [c for c in copies if not c.alive]
        if alive:
            keep = next((c for c in alive if c.id == r.cid), None) or _newest(alive)
            for extra in alive:
                if extra is not keep:
                    plan.stops.append(Stop(node, name, extra.id, destroy=True))
                    plan.note(f"{name} runs twice on {node} (containers {keep.id} and {extra.id}): "
                              f"stopping {extra.id}")
            if r.want == "run":
                if r.status != "running" or r.cid != keep.id or r.detail:
                    plan.edit(state, name, status="running", cid=keep.id, detail="")
            else:
                plan.stops.append(Stop(node, name, keep.id, destroy=r.want == "remove"))
            continue
        last = next((c for c in ended if c.id == r.cid), None) or (_newest(ended) if ended else None)
        if r.want == "remove":
            for c in ended:
                plan.stops.append(Stop(node, name, c.id, destroy=True))
            plan.delete("placements", name)
            plan.note(f"removed {name}")
            plan.kick = True
        elif r.want == "stop":
            if r.status != "stopped":
                plan.edit(state, name, status="stopped", cid=last.id if last else r.cid,
                          detail=last.reason if last else "")
        elif r.status in WAITING:
            continue
        elif (last is not None and last.state in ("exited", "failed") and last.id == r.cid) or \
                r.status in ("succeeded", "exited", "failed"):
            req = state.cluster.placements[name].request
            if last is not None and last.id == r.cid and r.status != ended_as(last.state):
                # The recorded instance ended on its own: recorded so (and run again only if its
                # restart policy says so, once its backoff has passed: the rounds after this one).
                how = f"exit code {last.exit_code}" if last.exit_code is not None else ""
                detail = "; ".join(x for x in (how, last.reason) if x and x not in how) or how
                restarts = r.restarts if now - r.restarted < RESTART_RESET else 0  # it ran a while: afresh
                status = ended_as(last.state)
                if restart_wanted(req.restart, status):
                    detail += (f"; restart {restarts + 1} in {backoff(restarts):g}s" if restarts < RESTARTS_PER_NODE
                               else f"; crash loop ({restarts} restarts): another node in {backoff(restarts):g}s")
                plan.edit(state, name, status=status, detail=detail, restarts=restarts)
                plan.note(f"{name} on {node}: {status}" + (f" ({detail})" if detail else ""))
            elif restart_wanted(req.restart, r.status) and now >= r.since + backoff(r.restarts):
                for c in ended:
                    plan.stops.append(Stop(node, name, c.id, destroy=True))
                _restart(plan, state, name, node, now)
        else:
            # Meant to run and not running: never started, stopped by someone else (the node's
            # shutdown, a hand-written stop), or lost with the node's state.  Start it again.
            if last is not None and last.state == "stopped":
                why = f"was stopped ({last.reason or 'not by the scheduler'})"
            elif r.status == "starting" and not r.cid:
                why = "not started yet"
            else:
                why = f"not found on {node}"
            for c in ended:
                plan.stops.append(Stop(node, name, c.id, destroy=True))
            if why != "not started yet":
                plan.note(f"{name}: {why}; starting it again on {node}")
            plan.edit(state, name, status="starting", cid="", detail="" if why == "not started yet" else why)
            plan.starts.append(name)
    return plan


def listing_key(listing: Sequence[ContainerInfo]) -> int:
    """A number for what a listing says (every field of every container, in order): two listings
    with the same number say the same (to one chance in 2**64).  Kept instead of the listing
    itself, it costs a node no objects between looks."""
    return hash(tuple((c.id, c.name, c.image, c.state, c.exit_code, c.reason, tuple(sorted(c.labels.items())))
                      for c in listing))


def steady(state: State, node: str, listing: Sequence[ContainerInfo], *, listed_at: float,
           busy: frozenset[str] | set[str], acted: Mapping[str, float]) -> bool:
    """Whether a plan of this listing that changed nothing would change nothing again, for as long
    as the listing and what the node's listing is compared with stay as they are: no name was
    passed over (acted on, or acted on since the listing began), and no placement here waits for
    its restart's backoff (which the clock alone ends)."""
    placed_here = state.cluster.nodes[node].containers if node in state.cluster.nodes else {}
    for name in itertools.chain(placed_here, (c.name for c in listing)):
        if name in busy or acted.get(name, -1.0) >= listed_at:
            return False
    for name in placed_here:
        r = state.records.get(name)
        p = state.cluster.placements.get(name)
        if r is None or p is None:
            return False
        if r.want == "run" and r.status in ("succeeded", "exited", "failed") and restart_wanted(p.request.restart,
                                                                                                r.status):
            return False
    return True

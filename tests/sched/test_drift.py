"""The drift planner (drift.py) over the synchronous world: each kind found, recorded, resolved."""

from __future__ import annotations

from fornax_sched.sched import drift, plans
from fornax_sched.sched.backends import CLUSTER_LABEL, REVISION_LABEL, ContainerInfo, Spec
from fornax_sched.sched.model import Request

from .world import CLUSTER, World


def compare(w: World, node: str, listing: list[ContainerInfo], book: drift.DriftBook,
            busy: frozenset[str] = frozenset()) -> tuple[plans.Plan, list[drift.Drift]]:
    def revision(name: str) -> str:
        req = w.state.cluster.placements[name].request
        return Spec(name, req.image, req.args, req.cpus, req.mem, labels=((CLUSTER_LABEL, CLUSTER),)).with_revision(
        ).revision

    plan, found = drift.plan_drift(w.state, node, listing, cluster=CLUSTER, now=w.now, listed_at=w.now, busy=busy,
                                   acted={}, known=book.entries, revision=revision)
    w.commit(plan)
    book.apply(plan)
    return plan, found


def placed(w: World, name: str) -> tuple[str, ContainerInfo]:
    plan = w.decide(lambda st: plans.plan_place(st, Request("hello", name=name), 1, w.now, "spread"))
    w.act(plan)
    node = w.state.cluster.placements[name].node
    assert node is not None
    c = next(c for c in w.nodes[node].containers.values() if c.name == name)
    return node, c


def test_each_kind_is_found_logged_recorded_and_resolved() -> None:
    w = World(nodes=1)
    book = drift.DriftBook()
    node, ok = placed(w, "ok")
    _, rev = placed(w, "rev")
    _, halt = placed(w, "halt")
    placed(w, "gone")
    stray = ContainerInfo("99", "stray", "hello", "running")
    other = ContainerInfo(rev.id, "rev", "hello", "running", labels={**rev.labels, REVISION_LABEL: "0ther"})
    stopped = ContainerInfo(halt.id, "halt", "hello", "stopped", reason="stopped by hand", labels=halt.labels)
    plan, found = compare(w, node, [ok, other, stopped, stray], book)
    assert {(d.kind, d.name) for d in found} == {("orphan_on_agent", "stray"), ("revision_mismatch", "rev"),
                                                ("state_mismatch", "halt"), ("missing_on_agent", "gone")}
    assert ("meta", f"drift/{node}/stray") in plan.changes and len(plan.log) == 4
    assert [s.name for s in plan.stops] == ["rev"] and plan.starts == ["rev"]  # re-applied
    assert not any(s.name == "stray" for s in plan.stops)  # an orphan is never touched
    assert "orphan_on_agent" in book.text() and book.text().startswith("drift 4 resolved 0")

    # the same again: nothing new to record or log
    w.now += 1
    plan, _ = compare(w, node, [ok, other, stopped, stray], book, busy=frozenset({"rev"}))
    assert not plan.log and not plan.changes

    # all put right but the orphan: three resolved, kept listed as such
    w.now += 1
    back = [ok, ContainerInfo(rev.id, "rev", "hello", "running", labels=rev.labels),
            ContainerInfo(halt.id, "halt", "hello", "running", labels=halt.labels),
            ContainerInfo("7", "gone", "hello", "running", labels=rev.labels), stray]
    plan, found = compare(w, node, back, book)
    assert [d.name for d in found] == ["stray"]
    assert sorted(line.split(": ")[1] for line in plan.log) == ["gone", "halt", "rev"]
    assert book.text().startswith("drift 1 resolved 3") and "resolved=" in book.text()


def test_a_placement_being_acted_on_is_left_out() -> None:
    w = World(nodes=1)
    book = drift.DriftBook()
    node, _ = placed(w, "busy")
    _, found = compare(w, node, [], book, busy=frozenset({"busy"}))
    assert found == []

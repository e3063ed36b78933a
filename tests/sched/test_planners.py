"""The planners as a whole, under hypothesis: every acknowledged placement persisted, at most one
running copy of a name once reconciled, nothing foreign touched, intent kept through anything
that happens to a node."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fornax_sched.sched import plans
from fornax_sched.sched.liveness import Liveness
from fornax_sched.sched.model import Request
from fornax_sched.sched.plans import CommandError

from .world import World

NAMES = st.sampled_from(["a", "b", "c", "g"])
NODES = st.sampled_from(["n1", "n2", "n3"])


class Planners(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = World()

    def _try(self, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except CommandError:
            pass  # refused: nothing may have changed (checked by the invariants)

    # ------------------------------------------------------------ commands
    @rule(stem=NAMES, replicas=st.integers(1, 3), cpu=st.sampled_from([0.0, 0.5, 1.0]))
    def place(self, stem: str, replicas: int, cpu: float) -> None:
        req = Request("hello", name=stem, replicas=replicas, cpus=cpu)

        def go() -> None:
            plan = self.w.decide(lambda s: plans.plan_place(s, req, replicas, self.w.now, "spread"))
            self.w.acknowledged.update(plan.report)
            self.w.act(plan)

        self._try(go)

    def _names(self) -> list[str]:
        return sorted(self.w.state.records)

    @precondition(lambda self: self.w.state.records)
    @rule(data=st.data(), verb=st.sampled_from(["stop", "start", "remove"]))
    def lifecycle(self, data: st.DataObject, verb: str) -> None:
        name = data.draw(st.sampled_from(self._names()))

        def go() -> None:
            if verb == "stop":
                plan = plans.plan_stop(self.w.state, name, self.w.now, "t")
                self.w.commit(plan)
            elif verb == "remove":
                plan = plans.plan_remove(self.w.state, name, self.w.now)
                self.w.commit(plan)
                self.w.acknowledged.discard(name)
            else:
                plan = self.w.decide(lambda s: plans.plan_start(s, name, self.w.now, "spread"))
            self.w.act(plan)

        self._try(go)

    @rule(group=NAMES, want=st.integers(0, 4))
    def scale(self, group: str, want: int) -> None:
        def go() -> None:
            plan = self.w.decide(lambda s: plans.plan_scale(s, group, want, self.w.now, "spread"))
            if plan.answer:
                for name in self.w.state.members(group)[want:]:
                    self.w.acknowledged.discard(name)
                for (t, k), v in plan.changes.items():
                    if t == "placements" and (v is None or v["want"] == "remove"):
                        self.w.acknowledged.discard(k)
            self.w.acknowledged.update(plan.report)
            self.w.act(plan)

        self._try(go)

    @rule(cmds=st.lists(st.tuples(st.sampled_from(["place", "stop", "remove", "cordon"]), NAMES,
                                   st.integers(1, 3)), min_size=2, max_size=5))
    def a_group_of_commands(self, cmds: list[tuple[str, str, int]]) -> None:
        """Several commands planned together, each on top of the others (as concurrent writers'
        are), committed once: the same invariants hold as for one at a time."""
        from fornax_sched.sched.service import Group, _Job, _plan_all

        w = self.w

        def planner(verb: str, name: str, n: int):  # type: ignore[no-untyped-def]
            if verb == "place":
                req = Request("hello", name=name, replicas=n, cpus=0.5)
                return lambda st, g: plans.plan_place(st, req, n, w.now, "spread")
            if verb == "stop":
                return lambda st, g: plans.plan_stop(st, f"{name}-{n}", w.now, "t")
            if verb == "remove":
                return lambda st, g: plans.plan_remove(st, f"{name}-{n}", w.now)
            return lambda st, g: plans.plan_cordon(st, f"n{n}", bool(n % 2), w.now)

        jobs = [_Job(planner(*c), True, None) for c in cmds]  # type: ignore[arg-type]
        results = _plan_all(w.state, jobs, Group(lambda: True, set(), {}))
        made = [r for r in results if isinstance(r, plans.Plan)]
        for r in results:
            assert isinstance(r, plans.Plan | CommandError), r
        merged = plans.Plan(w.now)
        for plan in made:
            merged.extend(plan)
        w.commit(merged)
        for plan, (verb, name, n) in zip(results, cmds, strict=True):
            if isinstance(plan, plans.Plan):
                if verb == "place":
                    w.acknowledged.update(plan.report)
                elif verb == "remove":
                    w.acknowledged.discard(f"{name}-{n}")
        for plan in made:
            w.act(plan)

    @rule(node=NODES)
    def evacuate(self, node: str) -> None:
        self._try(lambda: self.w.act(self.w.decide(lambda s: plans.plan_evacuate(s, node, self.w.now, "spread"))))

    @rule(node=NODES, on=st.booleans())
    def cordon(self, node: str, on: bool) -> None:
        plan = plans.plan_cordon(self.w.state, node, on, self.w.now)
        self.w.commit(plan)

    # ------------------------------------------------------------ what happens to nodes
    @precondition(lambda self: len(self.w.down) < 2)
    @rule(node=NODES)
    def node_dies(self, node: str) -> None:
        if node not in self.w.down:
            self.w.node_dies(node)

    @rule(node=NODES)
    def node_returns(self, node: str) -> None:
        if node in self.w.down:
            self.w.node_returns(node)

    @rule(node=NODES)
    def node_shuts_down_and_restarts(self, node: str) -> None:
        if node not in self.w.down:
            self.w.nodes[node].shutdown()  # its containers stopped, not by the user

    @rule(node=NODES)
    def node_loses_its_state(self, node: str) -> None:
        if node not in self.w.down:
            keep = {cid for n, cid in self.w.foreign if n == node}
            st_ = self.w.nodes[node]
            for cid in [c for c in st_.containers if c not in keep]:
                del st_.containers[cid]

    @rule(node=NODES, name=NAMES, n=st.integers(1, 3))
    def hand_start(self, node: str, name: str, n: int) -> None:
        if node not in self.w.down:
            self.w.hand_start(node, f"{name}-{n}")  # a name the scheduler may also give

    @rule(node=NODES)
    def reconcile(self, node: str) -> None:
        self.w.reconcile(node)

    @rule()
    def pending(self) -> None:
        self.w.pending()

    # ------------------------------------------------------------ what must hold
    @invariant()
    def the_store_holds_the_state(self) -> None:
        rows = {k: v for (t, k), v in self.w.store.items() if t == "placements"}
        assert set(rows) == set(self.w.state.records)
        for name in self.w.acknowledged:  # every acknowledged placement is durable
            assert name in rows, name
        for name, row in rows.items():
            assert row == self.w.state.placement_row(name)

    @invariant()
    def status_counts_match_the_records(self) -> None:
        """What /metrics shows of placements by status is kept as plans apply (and drafts undo)."""
        want: dict[str, int] = {}
        for r in self.w.state.records.values():
            want[r.status] = want.get(r.status, 0) + 1
        assert self.w.state.statuses == want

    @invariant()
    def nothing_foreign_is_touched(self) -> None:
        # (the world also fails the test if the scheduler ever stops or destroys one: World._stop)
        assert all(cid in self.w.nodes[n].containers for n, cid in self.w.foreign)

    @invariant()
    def reservations_fit(self) -> None:
        for n in self.w.state.cluster.nodes.values():
            assert n.used_cpus <= n.facts.cpus + 1e-9, (n.name, n.used_cpus)

    @invariant()
    def once_reconciled_each_name_runs_once_where_it_should(self) -> None:
        w = self.w
        saved = (dict(w.store), set(w.acknowledged))
        # settle: every reachable node reconciled twice (the second round sees the first's effects)
        w.reconcile_all()
        w.reconcile_all()
        # (a node that is down may still run an old copy: it is stopped once the node is back)
        alive = {n: [x for x in where if x not in w.down] for n, where in w.ours_alive().items()}
        alive = {n: where for n, where in alive.items() if where}
        for name, where in alive.items():
            assert len(where) == 1, (name, where)
            r = w.state.records.get(name)
            p = w.state.cluster.placements.get(name)
            assert r is not None and r.want == "run" and p is not None and p.node == where[0], (name, where, r)
        for name, r in w.state.records.items():
            p = w.state.cluster.placements[name]
            if r.want == "run" and p.node and p.node not in w.down and r.status not in ("succeeded", "failed") \
                    and w.state.cluster.nodes[p.node].status == "online":
                assert name in alive, (name, r)  # meant to run on a reachable node: it runs
        del saved


Planners.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
TestPlanners = Planners.TestCase


# ---------------------------------------------------------------- liveness


def test_liveness_from_the_clock_alone() -> None:
    t = Liveness(suspect_after=3, dead_after=10)
    t.add("a", 0.0)
    assert t.tick(5.0) == [] and t.status("a") == "unknown"
    assert [(m.was, m.now) for m in t.ok("a", 5.0)] == [("unknown", "online")]
    assert t.tick(7.9) == []
    assert [(m.now, m.why) for m in t.tick(8.0)] == [("suspect", "no answer for 3.0s")]  # hung: no call returns
    assert t.tick(14.9) == []
    moves = t.tick(15.0)
    assert [m.now for m in moves] == ["dead"] and moves[0].why.startswith("unreachable for 10.0s")
    assert t.tick(100.0) == []  # dead stays dead until it answers
    assert [(m.was, m.now) for m in t.ok("a", 101.0)] == [("dead", "online")]
    assert [m.now for m in t.failed("a", 101.5, "connection refused")] == ["suspect"]
    assert t.last_error("a") == "connection refused"
    assert [m.now for m in t.tick(111.0)] == ["dead"]


def test_liveness_never_reached_and_peers_say_dead() -> None:
    t = Liveness(suspect_after=3, dead_after=10)
    t.add("b", 0.0)
    assert [m.now for m in t.failed("b", 1.0, "refused")] == ["suspect"]
    assert [m.now for m in t.peers_say("b", "dead", 2.0)] == ["dead"]
    t.add("c", 0.0)
    t.ok("c", 1.0)
    assert t.peers_say("c", "dead", 2.0) == []  # reached since the start: its own answers count
    assert t.tick(10.9) == [] or t.status("c") == "suspect"
    assert t.status("c") in ("suspect", "online")


def test_forget_takes_a_dead_node_out_of_the_state_and_nothing_else() -> None:
    w = World()
    plan = w.decide(lambda s: plans.plan_place(s, Request("hello", name="f", replicas=3), 3, w.now, "spread"))
    w.act(plan)
    import pytest

    with pytest.raises(CommandError, match="forget n2: it is online; a node is forgotten once it is dead"):
        plans.plan_forget(w.state, "n2", w.now)
    with pytest.raises(CommandError, match="no node 'n9'"):
        plans.plan_forget(w.state, "n9", w.now)
    w.node_dies("n2")
    before = {k: v for k, v in w.store.items() if k[0] == "placements"}
    plan = plans.plan_forget(w.state, "n2", w.now, "op", replicated=True)
    assert "forget n2 (at sim!n2, by op): no longer followed" in plan.log
    assert dict(plan.changes) == {("nodes", "n2"): None, ("meta", "liveness/n2"): None}
    w.commit(plan)
    assert "n2" not in w.state.cluster.nodes and "n2" not in w.state.nodes
    assert {k: v for k, v in w.store.items() if k[0] == "placements"} == before  # every placement kept
    assert all(p.node in ("n1", "n3") for p in w.state.cluster.placements.values())
